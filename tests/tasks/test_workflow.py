"""train_and_evaluate: the sequence the CLI, the demo and suites share."""

from __future__ import annotations

import pytest

import finegrain.tasks.engine as engine
from finegrain.tasks.workflow import train_and_evaluate
from tests.conftest import tiny_config


@pytest.mark.slow
def test_trains_evaluates_and_does_not_train_a_finished_run_again(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, name="wf", train={"epochs": 1})
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs")
    assert run.is_finished() and metrics is not None and metrics["partial"] is False
    calls = []
    monkeypatch.setattr(engine, "fit", lambda *a, **k: calls.append(1))
    again, metrics2 = train_and_evaluate(cfg, tmp_path / "runs", resume=True)
    assert calls == [] and again.path == run.path
    assert metrics2["classification"]["top1"] == metrics["classification"]["top1"]


def test_a_knn_row_trains_nothing_and_can_skip_evaluation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "fit", lambda *a, **k: calls.append(1))
    cfg = tiny_config(tmp_path, name="knn", task="knn", eval={"k": 3})
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs", evaluate=False)
    assert calls == [] and metrics is None and run.config_file.is_file() and not run.metrics.is_file()
    _, metrics = train_and_evaluate(cfg, tmp_path / "runs", resume=True)
    assert calls == [] and 0 <= metrics["classification"]["top1"] <= 1
    assert metrics["protocol"]["method"].startswith("kNN")


@pytest.mark.slow
def test_export_onnx_exports_before_evaluating_and_evaluation_runs_the_export(tmp_path):
    import json

    import pytest

    pytest.importorskip("onnxruntime")
    cfg = tiny_config(tmp_path, name="onnx", train={"epochs": 1}, eval={"export_onnx": True})
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs")
    meta = json.loads((run.path / "export" / "model.json").read_text())
    assert metrics["inference"]["engine"] == "onnx" and metrics["model_checksum"] == meta["model_checksum"]
    plain, plain_metrics = train_and_evaluate(
        tiny_config(tmp_path, name="torch", train={"epochs": 1}), tmp_path / "runs"
    )
    assert plain_metrics["inference"]["engine"] == "torch" and not (plain.path / "export").exists()
    # the same training on both: the engines agree on every test image's class
    assert abs(metrics["classification"]["top1"] - plain_metrics["classification"]["top1"]) < 1e-9


@pytest.mark.slow
def test_a_failed_export_still_evaluates_with_pytorch(tmp_path, monkeypatch, caplog):
    import finegrain.tasks.workflow as workflow
    from finegrain.errors import FinegrainError

    def no_onnxruntime(*a, **k):
        raise FinegrainError("the onnx engine needs ONNX Runtime: pip install 'finegrain[serve]'")

    monkeypatch.setattr(workflow, "export_run", no_onnxruntime)  # where the workflow calls it
    cfg = tiny_config(tmp_path, name="noort", train={"epochs": 1}, eval={"export_onnx": True})
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs")
    assert metrics["inference"]["engine"] == "torch" and run.metrics.is_file()
    assert "not exported" in caplog.text and "ONNX Runtime" in caplog.text
