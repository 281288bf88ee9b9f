"""``finegrain demo``: the README's main command, end to end on the built-in synthetic data."""

from __future__ import annotations

import pytest
from rich.console import Console

from finegrain.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = run_demo(Console(file=open(tmp_path / "console.txt", "w")), runs_root=tmp_path / "runs", epochs=2)
    assert 0.0 <= out["classification"]["top1"] <= 1.0
    r = out["retrieval"]
    assert 0.0 <= r["recall@1"] <= r["recall@4"] <= 1.0
    runs = tmp_path / "runs"
    assert (runs / "demo-report.html").is_file()
    assert (runs / "demo-retrieval" / "index" / "meta.json").is_file()
    assert (runs / "demo-retrieval" / "report" / "sample_search.png").is_file()
    assert "done in" in (tmp_path / "console.txt").read_text()
