"""``finegrain demo``: the README's main command, end to end on the built-in synthetic data."""

from __future__ import annotations

import pytest
from rich.console import Console

from finegrain.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = run_demo(Console(file=open(tmp_path / "console.txt", "w")), runs_root=tmp_path / "runs", epochs=2)
    # Above chance after two epochs (24% and 27% when written): 16 classes give 6.25% top-1; in the 8
    # unseen test classes of 12 images, a random neighbour shares the query's class 11 times in 95.
    assert out["classification"]["top1"] > 2 / 16
    r = out["retrieval"]
    assert 11 / 95 < r["recall@1"] <= r["recall@4"] <= 1.0
    runs = tmp_path / "runs"
    assert (runs / "demo-report.html").is_file()
    assert (runs / "demo-retrieval" / "index" / "meta.json").is_file()
    assert (runs / "demo-retrieval" / "report" / "sample_search.png").is_file()
    assert "done in" in (tmp_path / "console.txt").read_text()
