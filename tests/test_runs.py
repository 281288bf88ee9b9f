"""Run integrity: planted checkpoints run no code, run states (finished / partial), failed starts,
resume with another config, stale temporary files, the index saved as one unit, no import side effects."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.runs import RunDir, create_run
from tests.conftest import ROOT, CrashAt, tiny_config


class Plant:
    """Unpickling this creates ``marker``: what a checkpoint from a stranger could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``finegrain ARGS`` in this process: (exit code, stderr)."""
    from finegrain import cli

    monkeypatch.setattr(sys, "argv", ["finegrain", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def test_planted_checkpoint_runs_no_code(trained_run, tmp_path, monkeypatch, capsys):
    import uvicorn

    run = tmp_path / "runs" / "trained"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "pwned"
    good = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    planted = {**good, "callbacks": {"x": Plant(marker)}}
    for name in ("best.ckpt", "last.ckpt"):
        torch.save(planted, run / "checkpoints" / name)
    # the plant works: loading it the old way creates the marker
    torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert marker.is_file()
    marker.unlink()

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started on an unsafe checkpoint"))
    query = str(np.load(run / "embeddings" / "test.npz")["paths"][0])  # a test image of the run
    commands = {
        "search": ["search", str(run), query],
        "serve": ["serve", str(run)],
        "evaluate": ["evaluate", str(run)],
        "index": ["index", str(run)],
        "train --resume": ["train", str(run / "config.yaml"), "--resume", "--runs", str(run.parent)],
    }
    for what, args in commands.items():
        code, err = run_cli(monkeypatch, capsys, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (what, err)
        assert "Traceback" not in err, (what, err)
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, err)
        assert "unsafe" in lines[0] and ("last.ckpt" in lines[0] or "best.ckpt" in lines[0]), (what, err)
        assert not marker.exists(), what


@pytest.mark.slow
def test_interrupted_run_evaluates_as_partial_and_the_suite_finishes_it(tmp_path, monkeypatch):
    from finegrain.config import config_to_yaml
    from finegrain.experiments import run_suite
    from finegrain.report.tables import comparison_rows, markdown_table
    from finegrain.tasks import engine
    from finegrain.tasks.evaluate import evaluate_run

    cfg = tiny_config(tmp_path, name="cut", train={"epochs": 2})
    original = engine.trainer_for

    def crashing(*args, **kwargs):
        t = original(*args, **kwargs)
        t.callbacks.append(CrashAt(epoch=1, batch=1))
        return t

    monkeypatch.setattr(engine, "trainer_for", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(cfg, runs_root=tmp_path / "runs")
    monkeypatch.setattr(engine, "trainer_for", original)
    run = RunDir(tmp_path / "runs" / "cut")
    assert run.training_state()["status"] == "training"
    (run.path / "DONE").write_text("written by an older finegrain\n")  # what the bug left behind

    m = evaluate_run(run.path)
    assert m["partial"] is True and (m["epochs_done"], m["epochs_planned"]) == (1, 2)
    assert json.loads(run.metrics.read_text())["partial"] is True
    assert not run.done_marker.exists() and not run.is_finished()
    md = markdown_table(comparison_rows([run.path]))
    assert "**cut** (*partial: 1 of 2 epochs*)" in md

    configs = tmp_path / "cut.yaml"
    configs.write_text(config_to_yaml(cfg))
    fits: list[bool] = []
    real_fit = engine.fit
    monkeypatch.setattr(engine, "fit", lambda *a, **k: fits.append(k.get("resume")) or real_fit(*a, **k))
    run_suite([str(configs)], runs_root=tmp_path / "runs")
    assert fits == [True]  # resumed, not skipped
    state = json.loads(run.state_file.read_text())
    assert state["status"] == "finished" and state["epochs_done"] == 2 and not state["stopped_early"]
    final = json.loads(run.metrics.read_text())
    assert final["partial"] is False and final["epochs_done"] == 2
    assert run.is_finished() and "partial" not in markdown_table(comparison_rows([run.path]))
    fits.clear()
    run_suite([str(configs)], runs_root=tmp_path / "runs")
    assert fits == []  # finished: skipped


def test_failed_start_does_not_block_the_corrected_command(tmp_path):
    from finegrain.tasks import engine

    # a config that loads but fails when the model is built (an unknown backbone now fails at load)
    bad = tiny_config(tmp_path, name="r", model={"weights": str(tmp_path / "no-such-weights.pt")})
    with pytest.raises(FinegrainError, match="file not found"):
        engine.fit(bad, runs_root=tmp_path)
    assert not (tmp_path / "r").exists()
    missing = tiny_config(tmp_path, name="r", data={"root": str(tmp_path / "no-such-data")})
    with pytest.raises(FinegrainError):
        engine.fit(missing, runs_root=tmp_path)
    assert not (tmp_path / "r").exists()
    # a start killed before its first step (SIGKILL: no cleanup) left its config: the fix takes its place
    create_run(bad, tmp_path)
    good = tiny_config(tmp_path, name="r")
    for resume in (False, True):
        run = create_run(good, tmp_path, resume=resume)
        assert "cars_cnn4" in run.config_file.read_text() and "no-such-weights" not in run.config_file.read_text()
        create_run(bad, tmp_path)


def test_resume_with_another_config_names_the_keys(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, name="r")
    run = create_run(cfg, tmp_path / "runs")
    run.write_state("training", 1, 2)  # it has trained
    changed = tiny_config(tmp_path, name="r", optim={"lr": 0.01})
    with pytest.raises(FinegrainError, match=r"optim.lr: 0.003 -> 0.01.*--override-stored"):
        create_run(changed, tmp_path / "runs", resume=True)
    assert "lr: 0.003" in run.config_file.read_text()
    code, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        str(run.config_file),
        "--resume",
        "--runs",
        str(tmp_path / "runs"),
        "--set",
        "optim.lr=0.01",
    )
    assert code == 2 and "optim.lr: 0.003 -> 0.01" in err and "Traceback" not in err
    create_run(changed, tmp_path / "runs", resume=True, override_stored=True)
    assert "lr: 0.01" in run.config_file.read_text()


def test_knn_train_honours_resume_and_no_evaluate(tmp_path, monkeypatch, capsys):
    from finegrain.config import config_to_yaml

    knn = tiny_config(tmp_path, name="k", task="knn", model={"backbone": "cars_cnn4"})
    path = tmp_path / "k.yaml"
    path.write_text(config_to_yaml(knn))
    runs = tmp_path / "runs"
    code, err = run_cli(monkeypatch, capsys, "train", str(path), "--runs", str(runs), "--no-evaluate")
    assert code == 0, err
    assert (runs / "k" / "config.yaml").is_file() and not (runs / "k" / "metrics.json").exists()
    (runs / "k" / "metrics.json").write_text(json.dumps({"partial": False}))  # as if evaluated
    (runs / "k" / "DONE").write_text("x\n")
    code, err = run_cli(monkeypatch, capsys, "train", str(path), "--runs", str(runs), "--no-evaluate")
    assert code == 2 and "--resume" in err  # finished: not redone without --resume
    code, err = run_cli(
        monkeypatch, capsys, "train", str(path), "--runs", str(runs), "--resume", "--no-evaluate", "--set", "eval.k=3"
    )
    assert code == 2 and "eval.k: 10 -> 3" in err


def test_a_run_trained_with_set_says_so_in_its_description(tmp_path, monkeypatch, capsys):
    """The config file's description describes the file; a run made with --set names what it changed."""
    import yaml

    from finegrain.config import config_to_yaml

    knn = tiny_config(tmp_path, name="k", task="knn", model={"backbone": "cars_cnn4"}, description="kNN on cnn4")
    path = tmp_path / "k.yaml"
    path.write_text(config_to_yaml(knn))
    runs = tmp_path / "runs"
    code, err = run_cli(
        monkeypatch, capsys, "train", str(path), "--runs", str(runs), "--no-evaluate", "--name", "plain"
    )
    assert code == 0, err
    assert yaml.safe_load((runs / "plain" / "config.yaml").read_text())["description"] == "kNN on cnn4"
    code, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        str(path),
        "--runs",
        str(runs),
        "--no-evaluate",
        "--name",
        "changed",
        "--set",
        "eval.k=3",
        "--set",
        "eval.metric=cosine",
    )
    assert code == 0, err
    stored = yaml.safe_load((runs / "changed" / "config.yaml").read_text())
    assert stored["eval"]["k"] == 3
    assert stored["description"] == "kNN on cnn4; with --set eval.k=3, eval.metric=cosine"


def test_stale_temporary_files_are_removed_on_start_and_resume(tmp_path):
    cfg = tiny_config(tmp_path, name="t")
    run = create_run(cfg, tmp_path)
    run.write_state("training", 1, 2)
    orphans = [run.checkpoints / ".last.ckpt.k2j3.tmp", run.path / ".history.csv.x9.tmp"]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    keep = run.checkpoints / "last.ckpt"
    keep.write_bytes(b"ckpt")
    create_run(cfg, tmp_path, resume=True)
    assert not any(p.exists() for p in orphans) and keep.read_bytes() == b"ckpt"


def _index(n: int, seed: int):
    from finegrain.retrieval.index import GalleryIndex

    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return GalleryIndex.build(x, np.arange(n) % 3, [f"{i}.jpg" for i in range(n)], model_checksum="m")


def test_index_save_keeps_the_old_index_until_the_new_one_is_whole(tmp_path, monkeypatch):
    import finegrain.retrieval.index as index_mod
    from finegrain.retrieval.index import GalleryIndex

    d = tmp_path / "index"
    _index(20, 0).save(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def broken(path, obj):  # the process dies while writing meta.json of the new index
        raise OSError("disk full")

    monkeypatch.setattr(index_mod, "atomic_write_json", broken)
    with pytest.raises(OSError):
        _index(30, 1).save(d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert GalleryIndex.load(d).n == 20
    assert not list(tmp_path.glob(".index.*.tmp"))  # a write that fails (not a kill) removes the unfinished one
    # a kill between moving the old index aside and the new one in: the next reader completes the swap
    real_rename, calls = os.rename, []

    def die_after_first(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(index_mod.os, "rename", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        _index(40, 2).save(d)
    monkeypatch.undo()
    assert not d.exists()
    assert GalleryIndex.load(d).n == 40
    _index(50, 3).save(d)
    assert GalleryIndex.load(d).n == 50
    assert not list(tmp_path.glob(".index.*"))  # nothing left over
    # a labels file swapped under a good meta.json is caught
    np.save(d / "labels.npy", np.zeros(50, np.int64))
    with pytest.raises(FinegrainError, match="labels.npy: its sha256"):
        GalleryIndex.load(d)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FinegrainError, match="other files"):
        _index(5, 0).save(tmp_path / "other")


@pytest.mark.slow
def test_importing_finegrain_changes_no_global_state():
    code = """
import logging, warnings, pkgutil, importlib
import lightning, lightning.pytorch
logging.basicConfig()
def snap():
    names = ["", "lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero"]
    return (list(warnings.filters), [(list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters))
                                     for n in names])
before = snap()
import finegrain
for m in pkgutil.walk_packages(finegrain.__path__, "finegrain."):
    if m.name.rsplit(".", 1)[-1] not in ("__main__",):
        importlib.import_module(m.name)
after = snap()
assert before == after, [x for x in after[0] if x not in before[0]] or after[1]
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_an_empty_config_in_a_run_says_so(tmp_path):
    from finegrain.runs import RunDir

    (tmp_path / "config.yaml").write_text("\n")
    with pytest.raises(FinegrainError, match=r"config\.yaml: empty config") as e:
        RunDir(tmp_path).load_config()
    assert len(str(e.value)) < 300


def test_a_bad_index_kind_or_metric_is_refused_before_anything_is_embedded(tmp_path):
    from finegrain.retrieval.gallery import build_index

    # the run does not even exist: the options are checked first
    with pytest.raises(FinegrainError, match="kind"):
        build_index(tmp_path / "no-run", kind="bogus")
    with pytest.raises(FinegrainError, match="metric"):
        build_index(tmp_path / "no-run", metric="manhattan")
