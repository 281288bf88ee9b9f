"""The Lightning training engine: learning, resume after a crash, run directory, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.tasks import engine
from finegrain.tasks.evaluate import evaluate_run
from tests.conftest import ROOT, CrashAt, tiny_config, tiny_metric_config


@pytest.mark.slow
def test_tiny_cnn_learns_synthetic_classes(tmp_path):
    cfg = tiny_config(
        tmp_path, train={"epochs": 6}, optim={"lr": 0.003}, schedule={"name": "step", "step_size": 3, "gamma": 0.1}
    )
    run, zero = engine.fit(cfg, runs_root=tmp_path)
    assert zero
    m = evaluate_run(run.path)
    # 4 classes: chance is 25%. A model that does not learn stays near it.
    assert m["classification"]["top1"] >= 0.6, m["classification"]
    assert run.best_ckpt.is_file() and run.last_ckpt.is_file()
    rows = engine.read_history(run.history)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert {"train/loss", "val/acc", "val/loss", "seconds"} <= set(rows[0])
    # the learning rate each epoch trained with, once: 3 epochs at 0.003, then 3 at 0.0003
    lr_cols = [c for c in rows[0] if c.startswith("lr")]
    assert lr_cols and all(c.startswith("lr/") for c in lr_cols), lr_cols
    assert [float(r[lr_cols[0]]) for r in rows] == pytest.approx([3e-3] * 3 + [3e-4] * 3)
    saved = json.loads(run.metrics.read_text())
    assert saved["protocol"]["n_test"] == 4 * 8
    assert saved["protocol"]["format"] == "stanford_cars"  # detected, not the config's "auto"
    assert (run.path / "per_class.csv").is_file()
    assert (run.path / "config.yaml").read_text().count("\n") > 50  # every default written out


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run.last_ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.5])  # with an average of the weights, that average resumes too
def test_crash_mid_epoch_then_resume_equals_unbroken_run(tmp_path, monkeypatch, recwarn, ema):
    cfg = tiny_config(tmp_path, name="unbroken", train={"epochs": 3, "ema_decay": ema}, model={"dropout": 0.3})
    unbroken, _ = engine.fit(cfg, runs_root=tmp_path)

    crashed_cfg = cfg.model_copy(update={"name": "crashed"})
    original = engine.trainer_for

    def crashing_trainer(*args, **kwargs):
        t = original(*args, **kwargs)
        t.callbacks.append(CrashAt(epoch=1, batch=2))
        return t

    monkeypatch.setattr(engine, "trainer_for", crashing_trainer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(crashed_cfg, runs_root=tmp_path)
    run = unbroken.__class__(tmp_path / "crashed")
    # The checkpoint of the last finished epoch is there and loadable.
    state = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)
    assert state["epoch"] == 0
    monkeypatch.setattr(engine, "trainer_for", original)
    # Starting again without --resume is refused rather than overwriting.
    with pytest.raises(FinegrainError, match="--resume"):
        engine.fit(crashed_cfg, runs_root=tmp_path)
    recwarn.clear()
    resumed, _ = engine.fit(crashed_cfg, runs_root=tmp_path, resume=True)
    # history.csv is the one CSV log: no second logger warning about, or rewriting, logs/ on resume
    assert not [str(w.message) for w in recwarn if "logs directory" in str(w.message)]
    assert not (resumed.path / "logs" / "metrics.csv").exists()
    assert (resumed.path / "logs" / "hparams.yaml").is_file()  # what reports read class names from
    a, b = _weights(unbroken), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    ha, hb = engine.read_history(unbroken.history), engine.read_history(resumed.history)
    assert [r["epoch"] for r in hb] == ["1", "2", "3"]
    assert float(ha[-1]["val/acc"]) == pytest.approx(float(hb[-1]["val/acc"]), abs=1e-6)


@pytest.mark.slow
def test_an_average_of_the_weights_is_what_validates_and_is_saved(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    decay, seen = 0.6, []

    class Watch(Callback):  # the weights after every optimizer step
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(pl_module.model.classifier[1].weight.detach().clone())

    original = engine.trainer_for

    def watched_trainer(*args, **kwargs):
        t = original(*args, **kwargs)
        t.callbacks.append(Watch())
        return t

    monkeypatch.setattr(engine, "trainer_for", watched_trainer)
    run, _ = engine.fit(tiny_config(tmp_path, train={"epochs": 2, "ema_decay": decay}), runs_root=tmp_path)
    ema = seen[0]
    for w in seen[1:]:
        ema = decay * ema + (1 - decay) * w
    last = torch.load(run.last_ckpt, map_location="cpu", weights_only=True)
    torch.testing.assert_close(last["state_dict"]["model.classifier.1.weight"], ema)  # what is evaluated
    torch.testing.assert_close(last["current_model_state"]["model.classifier.1.weight"], seen[-1])
    assert not torch.allclose(ema, seen[-1])


@pytest.mark.slow
def test_resume_refuses_checkpoint_of_another_architecture(tmp_path):
    cfg = tiny_config(tmp_path, name="arch", train={"epochs": 1})
    run, _ = engine.fit(cfg, runs_root=tmp_path)
    other = tiny_config(tmp_path, model={"backbone": "cars_cnn3"})
    with pytest.raises(FinegrainError, match="another model architecture.*backbone"):
        engine.check_resumable(run.last_ckpt, other)

    # a checkpoint of an older finegrain, whose model config lacks a key added since, still resumes
    state = torch.load(run.last_ckpt, map_location="cpu", weights_only=True)
    del state["hyper_parameters"]["config"]["model"]["drop_path"]
    torch.save(state, run.last_ckpt)
    engine.check_resumable(run.last_ckpt, tiny_config(tmp_path, name="arch", model={"drop_path": 0.0}))


@pytest.mark.slow
@pytest.mark.parametrize("eval_sizes", [[], [[40, 40], [32, 32]]], ids=["train-size", "two-sizes"])
def test_metric_learning_trains_and_evaluates_retrieval(tmp_path, monkeypatch, eval_sizes):
    cfg = tiny_metric_config(tmp_path, name="ml", data={"eval_image_sizes": eval_sizes}, eval={"tta_flip": True})
    run, _ = engine.fit(cfg, runs_root=tmp_path)
    m = evaluate_run(run.path)
    r = m["retrieval"]
    assert 0.0 <= r["recall@1"] <= r["recall@2"] <= r["recall@4"] <= r["recall@8"] <= 1.0
    assert m["protocol"]["protocol"] == "retrieval"
    assert m["protocol"]["eval_image_sizes"] == (eval_sizes or [[32, 32]])
    saved = np.load(run.embeddings / "test.npz")
    if eval_sizes:  # the saved test embeddings are the mean of each size's
        from finegrain.data.module import FinegrainDataModule
        from finegrain.inference.encoder import Encoder
        from finegrain.inference.load import load_model

        encoder, dm = Encoder(load_model(run)), FinegrainDataModule(run.load_config())
        per_size = [encoder.run_loader(loader).embeddings for loader in dm.eval_loaders(dm.test_records)]
        assert not np.allclose(per_size[0], per_size[1], atol=1e-3)
        np.testing.assert_allclose(saved["embeddings"], np.mean(per_size, axis=0), atol=1e-5)

    # index the test split, search with a gallery image: itself first, the class named by the neighbours' vote
    import finegrain.retrieval.gallery as search_mod
    from finegrain.data.images import open_rgb
    from finegrain.errors import FinegrainError
    from finegrain.retrieval.gallery import build_index
    from finegrain.retrieval.searcher import Searcher

    embedded = []
    real_embed = search_mod.embed_records
    monkeypatch.setattr(search_mod, "embed_records", lambda *a, **k: embedded.append(1) or real_embed(*a, **k))
    build_index(run.path, gallery="test")
    assert embedded == []  # the test embeddings that evaluate saved, same model: reused
    sidecar = run.embeddings / "test.json"
    sidecar.write_text(sidecar.read_text().replace(m["model_checksum"], "0" * 64))
    build_index(run.path, gallery="test")
    assert embedded == [1]  # another model's embeddings: embedded again
    searcher = Searcher(run.path)
    query = searcher.index.paths[3]
    hits, top = searcher.search(open_rgb(query)[0], k=5)
    assert hits[0].path == query and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].same_image and not any(h.same_image for h in hits[1:])
    assert searcher.prediction_source == "neighbours"
    others = [h.label for h in hits[1:]]  # the query's own copy does not vote
    assert dict(top) == {label: others.count(label) / 4 for label in set(others)}
    with pytest.raises(FinegrainError, match="gallery size"):
        searcher.search(open_rgb(query)[0], k=searcher.gallery_size + 1)


def cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "finegrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_unknown_names_are_clear_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\ndata: {root: synthetic}\nmodel: {backbone: resnet5O}\n")
    r = cli("train", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert "resnet50" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "c").exists()  # a failed start leaves nothing that blocks the fix
    r = cli("train", str(cfg), "--set", "optim.name=adamm", cwd=tmp_path)
    assert r.returncode == 2 and "'adam'" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", str(cfg), "--set", "train.epoch=3", cwd=tmp_path)
    assert r.returncode == 2 and "train.epochs" in r.stderr


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    cfg = tiny_config(tmp_path, name="ddp", train={"epochs": 1, "accelerator": "cpu"})
    from finegrain.config import config_to_yaml

    path = tmp_path / "ddp.yaml"
    path.write_text(config_to_yaml(cfg))
    r = cli(
        "train",
        str(path),
        "--devices",
        "2",
        "--runs",
        str(tmp_path / "runs"),
        cwd=tmp_path,
        env_extra={"PYTHONPATH": str(ROOT / "src")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"]["n_test"] == 32
    assert 0 <= metrics["classification"]["top1"] <= 1
    assert (run / "checkpoints" / "last.ckpt").is_file()
    out = r.stderr + r.stdout
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out, out[-2000:]  # two processes joined


@pytest.mark.slow
def test_progress_is_logged_when_output_is_not_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FINEGRAIN_PROGRESS", "1")  # pytest's captured stdout is not a terminal
    cfg = tiny_config(tmp_path, name="plain", train={"epochs": 1})
    with caplog.at_level("INFO", logger="finegrain.tasks.engine"):
        engine.fit(cfg, runs_root=tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "finegrain.tasks.engine"]
    assert any(m.startswith("epoch 1/1: batch ") and "images/s, loss " in m for m in lines), lines
    assert any(m.startswith("epoch 1/1 done in ") and "val/acc " in m for m in lines), lines


def test_small_data_without_validation_trains_without_lightning_warnings(tmp_path, recwarn):
    # 80 images in batches of 16: 5 batches an epoch, fewer than the logging interval (10), and
    # no validation images: both are a user's ordinary choice, and Lightning warned about each.
    cfg = tiny_config(tmp_path, data={"val_fraction": 0.0}, train={"epochs": 1})
    engine.fit(cfg, runs_root=tmp_path)
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "logging interval" in m or "across ranks is zero" in m], said
