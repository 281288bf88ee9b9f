"""Fault injection: ``finegrain train``, ``index`` and ``data prepare`` killed with SIGKILL at chosen
points (``FINEGRAIN_FAULT``, read by tests/fault_hook/sitecustomize.py, which these tests put on
``PYTHONPATH``: the shipped package has no fault hook), then run again.

Every run must end with the numbers of an uninterrupted one, nothing half-written and no
orphan files. Tiny synthetic data, a few seconds per process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.config import config_to_yaml
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow


def finegrain(*args: str, fault: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    hook = ROOT / "tests" / "fault_hook"  # its sitecustomize injects the fault
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0", "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT / "src")])}
    env.pop("FINEGRAIN_FAULT", None)
    if fault:
        env["FINEGRAIN_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "finegrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def killed(r: subprocess.CompletedProcess) -> bool:
    return r.returncode == -signal.SIGKILL


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of unfinished writes anywhere below ``folder``."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_train_killed_in_a_checkpoint_write_and_mid_epoch_resumes_to_the_same_result(tmp_path):
    from finegrain.tasks import engine
    from finegrain.tasks.evaluate import evaluate_run

    cfg = tiny_config(tmp_path, name="k", train={"epochs": 3})
    reference, _ = engine.fit(cfg, runs_root=tmp_path / "reference")
    expected = evaluate_run(reference.path)
    config = tmp_path / "k.yaml"
    config.write_text(config_to_yaml(cfg))
    runs = tmp_path / "runs"
    run = runs / "k"

    # 1. killed while writing epoch 2's last.ckpt: epoch 1's survives whole, beside half a temporary file
    r = finegrain("train", str(config), "--runs", str(runs), fault="write:last.ckpt@2", cwd=tmp_path)
    assert killed(r), r.stderr[-2000:]
    orphans = list((run / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert len(orphans) == 1 and 0 < orphans[0].stat().st_size < (run / "checkpoints" / "last.ckpt").stat().st_size
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert json.loads((run / "state.json").read_text())["status"] == "training"
    partial = evaluate_run(run)  # evaluating it is allowed, and says what it is
    assert partial["partial"] and partial["epochs_planned"] == 3 and not (run / "DONE").exists()

    # 2. resumed, then killed in the middle of epoch 3: the orphan was removed when the resume started
    r = finegrain(
        "train", str(config), "--runs", str(runs), "--resume", "--no-evaluate", fault="batch:2:1", cwd=tmp_path
    )
    assert killed(r), r.stderr[-2000:]
    assert not leftovers(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1

    # 3. resumed to the end: the numbers of the uninterrupted run, nothing left over
    r = finegrain("train", str(config), "--runs", str(runs), "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((run / "metrics.json").read_text())
    assert got["partial"] is False and got["epochs_done"] == 3 and (run / "DONE").is_file()
    assert got["classification"]["top1"] == expected["classification"]["top1"]
    assert got["classification"]["loss"] == pytest.approx(expected["classification"]["loss"], abs=1e-4)
    a, b = weights(reference.last_ckpt), weights(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert [r["epoch"] for r in engine.read_history(run / "history.csv")] == ["1", "2", "3"]
    assert json.loads((run / "state.json").read_text())["status"] == "finished"
    assert not leftovers(run)


def test_index_killed_while_writing_keeps_the_old_index(trained_run, tmp_path):
    from finegrain.retrieval.gallery import build_index
    from finegrain.retrieval.index import GalleryIndex

    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in (run / "index").iterdir()}
    for fault in ("write:index.faiss",):
        r = finegrain("index", str(run), "--kind", "hnsw", fault=fault, cwd=tmp_path)
        assert killed(r), r.stderr[-2000:]
        assert {p.name: p.read_bytes() for p in (run / "index").iterdir()} == before  # untouched, whole
        assert GalleryIndex.load(run / "index").kind == "flat"
        assert leftovers(tmp_path)  # the unfinished new index, beside the old one
    dest, info = build_index(run, gallery="test", kind="hnsw")  # run again: done, and nothing left over
    assert GalleryIndex.load(dest).kind == "hnsw" and info["n"] == GalleryIndex.load(dest).n
    assert not leftovers(tmp_path)


def test_data_prepare_killed_leaves_no_cache_then_completes(tmp_path):
    from finegrain.data.cache import PreparedCache
    from finegrain.data.module import prepare_for_config

    cfg = tiny_config(tmp_path, name="p")
    config = tmp_path / "p.yaml"
    config.write_text(config_to_yaml(cfg))
    cache = tmp_path / "cache"
    r = finegrain("data", "prepare", str(config), "--cache-dir", str(cache), fault="write:index.json", cwd=tmp_path)
    assert killed(r), r.stderr[-2000:]
    assert not list(cache.glob("prepared/*/.complete"))  # no reader can find a cache
    assert leftovers(cache)
    prepare_for_config(cfg, cache_dir=cache)  # run again
    [done] = [p.parent for p in cache.glob("prepared/*/.complete")]
    assert not leftovers(cache) and len(list((cache / "prepared").iterdir())) == 1
    fresh = tmp_path / "fresh"
    prepare_for_config(cfg, cache_dir=fresh)
    [ref] = [p.parent for p in fresh.glob("prepared/*/.complete")]
    assert ref.name == done.name
    assert np.array_equal(np.load(done / "images.npy"), np.load(ref / "images.npy"))
    assert PreparedCache(done).paths == PreparedCache(ref).paths


def test_a_run_whose_config_is_an_alias_bomb_is_refused_in_one_line(trained_run, tmp_path):
    """A stranger's run whose config.yaml is 400 bytes of nested aliases: search, evaluate and train
    answer at once with one line naming the file (a hang here ends in the subprocess timeout)."""
    from tests.conftest import alias_bomb

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text(alias_bomb())
    query = json.loads((run / "index" / "paths.json").read_text())["paths"][0]
    for args in (("search", str(run), query), ("evaluate", str(run)), ("train", str(run / "config.yaml"))):
        r = finegrain(*args, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert "config.yaml" in r.stderr and "expands to more than" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_index_killed_between_the_renames_is_found_by_search(trained_run, tmp_path):
    """Killed after moving the old index aside and before moving the new one in: no ``index/`` but a
    complete new one beside it, which search (and so serve) must find, not report "no index"."""
    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)
    query = json.loads((run / "index" / "paths.json").read_text())["paths"][0]
    r = finegrain("index", str(run), "--kind", "hnsw", fault="swap:index", cwd=tmp_path)
    assert killed(r), r.stderr[-2000:]
    assert not (run / "index").exists() and list(run.glob(".index.*.new.tmp/meta.json"))
    r = finegrain("search", str(run), query, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["hits"][0]["path"] == query
    assert json.loads((run / "index" / "meta.json").read_text())["kind"] == "hnsw"  # the new one, completed


def test_index_with_an_empty_or_other_gallery_keeps_the_old_index(trained_run, tmp_path):
    """``--gallery ''`` once indexed the current folder (reports, anything) in place of the run's index."""
    from PIL import Image

    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in (run / "index").iterdir()}
    (tmp_path / "photos" / "red").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "photos" / "red" / "a.png")
    for gallery, said in (("", "the gallery is empty"), ("photos", "pass --replace")):
        r = finegrain("index", str(run), "--gallery", gallery, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (gallery, r.stderr[-2000:])
        assert said in r.stderr and len(r.stderr.strip().splitlines()) == 1, (gallery, r.stderr)
        assert {p.name: p.read_bytes() for p in (run / "index").iterdir()} == before
    r = finegrain("index", str(run), "--gallery", "photos", "--replace", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["n"] == 1 and meta["gallery"] == f"all images of {tmp_path.resolve() / 'photos'}"


def test_a_full_disk_is_one_line_naming_the_file_and_the_space_it_needs(trained_run, tmp_path):
    """The atomic writer fails as on a full disk (``nospace:``, after writing half) in index, export and
    train; and a --sheet path that cannot be written is refused before the search."""
    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in (run / "index").iterdir()}
    cfg = tiny_config(tmp_path, name="full", train={"epochs": 1})
    config = tmp_path / "full.yaml"
    config.write_text(config_to_yaml(cfg))
    query = json.loads((run / "index" / "paths.json").read_text())["paths"][0]
    for args, fault, file in (
        (("index", str(run), "--kind", "hnsw"), "nospace:index.faiss", "index.faiss"),
        (("export", str(run)), "nospace:model.onnx", str(run / "export" / "model.onnx")),
        (("train", str(config)), "nospace:last.ckpt", "last.ckpt"),
        (("search", str(run), query, "--sheet", str(tmp_path / "nope" / "s.png")), None, "the folder"),
    ):
        r = finegrain(*args, fault=fault, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-3000:])
        [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert file in line, (args, line)
        assert fault is None or ("no space left" in line and "it needs" in line and "free" in line), line
    assert {p.name: p.read_bytes() for p in (run / "index").iterdir()} == before
    assert not leftovers(tmp_path)


def test_a_re_export_removes_a_killed_exports_temporary_file(trained_run, tmp_path):
    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)
    r = finegrain("export", str(run), fault="write:model.onnx", cwd=tmp_path)
    assert killed(r), r.stderr[-2000:]
    assert leftovers(run / "export")  # half a model file
    r = finegrain("export", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "export" / "model.onnx").is_file() and not leftovers(run)
