"""The run report shows right and wrong test predictions with their maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_the_report_shows_right_and_wrong_predictions_with_their_maps(tmp_path):
    from finegrain.report.html import write_report
    from finegrain.tasks import engine
    from finegrain.tasks.evaluate import evaluate_run

    cfg = tiny_config(
        tmp_path,
        name="why-report",
        model={"backbone": "timm:test_efficientnet"},
        data={"image_size": [32, 64], "synthetic": {"image_size": [32, 64]}},  # wide, as photos of cars are
        train={"epochs": 1},
    )
    run, _ = engine.fit(cfg, runs_root=tmp_path)
    evaluate_run(run.path)
    page = write_report(run.path).read_text()
    assert "What the model looked at" in page and "class activation map" in page
    assert "Maps of right and wrong predictions</b>: not drawn" not in page
    png = run.report / "explained_predictions.png"
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.std() > 10  # images with their maps, not a blank figure
    blank_rows = (pixels.min(axis=(1, 2)) > 250).mean()
    assert blank_rows < 0.35, blank_rows  # rows shaped to the images: wide ones in square rows left 60% blank


def test_a_backbone_without_maps_says_why_in_the_report(trained_run, caplog):
    """The session's tiny CNN has dense layers after pooling: the report says so, and the rest is drawn."""
    import logging
    import shutil

    from finegrain.report.html import write_report

    run = shutil.copytree(trained_run, trained_run.parent / "no-maps-copy", dirs_exist_ok=True)
    with caplog.at_level(logging.INFO):
        page = write_report(run).read_text()
    # a fact of the model, not a failure: no WARNING (the demo's CNN printed one per report)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("computes more after pooling" in r.getMessage() for r in caplog.records)
    assert "Maps of right and wrong predictions</b>: not drawn" in page and "computes more after pooling" in page
    assert "Retrieval gallery" in page
