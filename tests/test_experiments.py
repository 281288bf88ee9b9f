"""``finegrain experiments run``: a suite end to end on synthetic data, resume after a crash, the CLI's errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from finegrain.errors import FinegrainError
from finegrain.experiments import SUITES, run_suite
from finegrain.report.tables import fmt_pct, fmt_seconds
from finegrain.tasks import engine
from tests.conftest import CrashAt

ROOT = Path(__file__).resolve().parents[1]

# Shared by every config below: a tiny CNN, 32x32 images, 4 synthetic classes, one epoch.
BASE = """\
data:
  root: synthetic
  image_size: [32, 32]
  batch_size: 16
  num_workers: 0
  val_fraction: 0.2
  synthetic: {num_classes: 4, train_per_class: 20, test_per_class: 8, image_size: [48, 48]}
model: {backbone: cars_cnn4, weights: none}
optim: {name: adam, lr: 0.003}
train: {epochs: 1, seed: 0}
"""

CONFIGS = {
    "t-cls": "description: tiny CNN classifier\n",
    # the kNN row of seed 000 (src/finegrain/configs/cars-knn-1.yaml): no training, the classifier's features
    "t-knn": "description: kNN k=3 on the tiny CNN's features\ntask: knn\n"
    "eval: {source_run: t-cls, k: 3, metric: euclidean}\n",
    "t-ml": "description: tiny multi-similarity embedding\ntask: metric_learning\n"
    "data: {protocol: retrieval, sampler: m_per_class, m_per_class: 4, batch_size: 8, val_fraction: 0.0,"
    " synthetic: {num_classes: 6}}\n"
    "model: {head: embedding, embedding_dim: 16}\nloss: {name: multi_similarity}\n",
    "t-two-epochs": "description: tiny CNN, two epochs\ntrain: {epochs: 2}\n",
}


def write_configs(folder: Path, names: list[str], extra: dict[str, str] | None = None) -> list[str]:
    """YAML files ``folder/<name>.yaml`` extending ``folder/base.yaml``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    paths = []
    for n in names:
        body = {**CONFIGS, **(extra or {})}[n]
        p = folder / f"{n}.yaml"
        p.write_text(f"extends: base.yaml\nname: {n}\n{body}")
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------- parsing the tables

PCT = re.compile(r"^(\d+(?:\.\d)?)%$")


def md_rows(md: str, header_start: str) -> dict[str, list[str]]:
    """``{run name: [cell, ...]}`` of the Markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    rows = {}
    for ln in lines[i + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split(" | ")]
        name = re.match(r"\*\*(.+?)\*\*", cells[0]).group(1)
        rows[name] = cells
    return rows


def pct(cell: str) -> float:
    m = PCT.match(cell)
    assert m, f"not a percentage: {cell!r}"
    value = float(m.group(1))
    assert 0.0 <= value <= 100.0, cell
    return value


def html_rows(page: str) -> dict[str, tuple[str, list[str]]]:
    """``{run name: (link, [value cells])}`` of every results table row of the HTML page."""
    out = {}
    for tr in re.findall(r"<tr><td class=\"model\">(.*?)</tr>", page):
        m = re.match(r'<a href="([^"]+)">([^<]+)</a>', tr)
        assert m, f"row without a link to its report: {tr}"
        out.setdefault(m.group(2), []).append((m.group(1), re.findall(r"<td>([^<]*)</td>", tr)))
    return out


# ---------------------------------------------------------------- 1. a small suite end to end


@pytest.mark.slow
def test_suite_end_to_end_writes_tables_with_every_row(tmp_path):
    # The kNN row comes first: the suite must still run it after the classifier whose model it uses.
    configs = write_configs(tmp_path / "configs", ["t-knn", "t-cls", "t-ml"])
    runs = tmp_path / "runs"
    tables = run_suite(configs, runs_root=runs)
    md, page = tables["markdown"].read_text(), tables["html"].read_text()
    assert tables["markdown"].parent == runs and tables["html"].suffix == ".html"

    metrics = {n: json.loads((runs / n / "metrics.json").read_text()) for n in ("t-cls", "t-knn", "t-ml")}
    for n in metrics:
        assert (runs / n / "DONE").is_file()
    # the kNN row trained nothing and used the classifier's checkpoint
    assert not list((runs / "t-knn" / "checkpoints").glob("*.ckpt"))
    assert Path(metrics["t-knn"]["checkpoint"]).parent.parent.name == "t-cls"
    assert metrics["t-knn"]["model_checksum"] == metrics["t-cls"]["model_checksum"]

    # ---- Markdown: classification table (classifier + kNN), retrieval table (metric learning)
    cls = md_rows(md, "| Model | Loss | Accuracy | F1 | Precision | Recall | Prediction time (s) |")
    ret = md_rows(md, "| Model | Recall@1 | Recall@2 | Recall@4 | Recall@8 | MAP@R |")
    assert set(cls) == {"t-cls", "t-knn"} and set(ret) == {"t-ml"}
    for name, cells in cls.items():
        loss, acc, f1, prec, rec, seconds, tested_on = cells[1:]
        assert tested_on == f"test split ({metrics[name]['protocol']['n_test']})"
        if name == "t-knn":
            assert loss == "—"  # vote shares have no meaningful cross-entropy
        else:
            assert float(loss) >= 0
        for c in (acc, f1, prec, rec):
            pct(c)
        m = metrics[name]["classification"]
        assert m["prediction_seconds"] > 0  # the table rounds a tiny kNN search to 0.000 s
        # the metrics.json value, rounded to 3 decimals (a half-unit tie may round either way in binary)
        assert seconds == fmt_seconds(m["prediction_seconds"])
        assert abs(float(seconds) - m["prediction_seconds"]) <= 5e-4 + 1e-9
        assert acc == fmt_pct(m["top1"]) and f1 == fmt_pct(m["f1_macro"])  # the table shows the run's numbers
        assert f"([report]({name}/report/index.html))" in cells[0]
    recalls = [pct(c) for c in ret["t-ml"][1:5]]
    assert recalls == sorted(recalls), recalls  # Recall@K never decreases with K
    pct(ret["t-ml"][5])
    assert ret["t-ml"][1] == fmt_pct(metrics["t-ml"]["retrieval"]["recall@1"])
    assert "([report](t-ml/report/index.html))" in ret["t-ml"][0]

    # ---- which data and which protocol produced each row
    protocol = {re.match(r"- \*\*(.+?)\*\*", ln).group(1): ln for ln in md.splitlines() if ln.startswith("- **")}
    assert set(protocol) == {"t-cls", "t-knn", "t-ml"}
    assert all("synthetic" in ln and "32×32" in ln for ln in protocol.values()), protocol
    assert "(classification)" in protocol["t-cls"] and "arg-max" in protocol["t-cls"]
    assert "(knn)" in protocol["t-knn"] and "kNN" in protocol["t-knn"] and "k=3" in protocol["t-knn"]
    assert "Class-disjoint retrieval" in protocol["t-ml"] and "6 classes" in protocol["t-ml"]
    assert "4 classes" in protocol["t-cls"] and "32 images" in protocol["t-cls"]  # 4 classes x 8 test images

    # ---- HTML: the same rows and numbers, each name linking to a report that exists
    rows = html_rows(page)
    assert set(rows) == {"t-cls", "t-knn", "t-ml"}
    for name, entries in rows.items():
        for link, cells in entries:
            assert link == f"{name}/report/index.html"
            assert (tables["html"].parent / link).is_file(), link
            assert all(c for c in cells)
    assert rows["t-cls"][0][1] == cls["t-cls"][1:]
    assert rows["t-ml"][0][1] == ret["t-ml"][1:]
    assert page.count("Data and protocol") == 2 and "built-in synthetic dataset" in page
    assert "Class-disjoint retrieval" in page and "k=3, euclidean" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained


# ---------------------------------------------------------------- 2. interrupted, then run again


class EpochLog(Callback):
    """Records which epochs a trainer actually trains."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(trainer.current_epoch)


def snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime, bytes) of the files that would change if the run were trained or evaluated again."""
    files = ["metrics.json", "DONE", "history.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"]
    return {f: ((run / f).stat().st_mtime_ns, (run / f).read_bytes()) for f in files}


@pytest.mark.slow
def test_interrupted_suite_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    configs = write_configs(tmp_path / "configs", ["t-cls", "t-two-epochs"])
    runs = tmp_path / "runs"
    original_trainer_for, original_fit = engine.trainer_for, engine.fit
    epochs: dict[str, list[int]] = {}
    fits: list[tuple[str, bool]] = []

    def trainer_for(cfg, *args, crash: bool, **kwargs):
        t = original_trainer_for(cfg, *args, **kwargs)
        t.callbacks.append(EpochLog(epochs.setdefault(cfg.name, [])))
        if crash and cfg.name == "t-two-epochs":
            t.callbacks.append(CrashAt(epoch=1, batch=1))  # in the middle of the second epoch
        return t

    def counting_fit(cfg, *args, **kwargs):
        fits.append((cfg.name, kwargs.get("resume", False)))
        return original_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(engine, "fit", counting_fit)
    monkeypatch.setattr(engine, "trainer_for", lambda *a, **k: trainer_for(*a, crash=True, **k))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_suite(configs, runs_root=runs)
    first, second = runs / "t-cls", runs / "t-two-epochs"
    assert (first / "DONE").is_file() and not (second / "DONE").is_file()
    assert (second / "checkpoints" / "last.ckpt").is_file()  # the finished first epoch was saved
    assert epochs == {"t-cls": [0], "t-two-epochs": [0, 1]}
    assert fits == [("t-cls", False), ("t-two-epochs", False)]
    before = snapshot(first)
    history_before = engine.read_history(second / "history.csv")
    assert [r["epoch"] for r in history_before] == ["1"]

    # Started again: the finished run is skipped, the interrupted one resumes in its second epoch.
    epochs.clear()
    fits.clear()
    monkeypatch.setattr(engine, "trainer_for", lambda *a, **k: trainer_for(*a, crash=False, **k))
    tables = run_suite(configs, runs_root=runs)
    assert fits == [("t-two-epochs", True)]
    assert epochs == {"t-two-epochs": [1]}  # epoch 0 restored from the checkpoint, not trained again
    assert snapshot(first) == before
    assert (second / "DONE").is_file()
    history = engine.read_history(second / "history.csv")
    assert [r["epoch"] for r in history] == ["1", "2"] and history[0] == history_before[0]
    assert json.loads((second / "metrics.json").read_text())["protocol"]["n_test"] == 32
    md = tables["markdown"].read_text()
    assert "| **t-cls**" in md and "| **t-two-epochs**" in md

    # A third time there is nothing left to do.
    fits.clear()
    after = snapshot(second)
    run_suite(configs, runs_root=runs)
    assert fits == [] and snapshot(second) == after and snapshot(first) == before


# ---------------------------------------------------------------- mistakes found before anything runs


def test_suite_is_checked_before_the_first_run(tmp_path, monkeypatch):
    def no_fit(*a, **k):
        raise AssertionError("nothing may be trained when the suite is invalid")

    monkeypatch.setattr(engine, "fit", no_fit)
    runs = tmp_path / "runs"
    # a kNN row whose model is neither in the suite nor on disk; it comes last, after a trainable row
    extra = {"t-knn-orphan": "task: knn\neval: {source_run: no-such-run, k: 3}\n"}
    configs = write_configs(tmp_path / "configs", ["t-cls", "t-knn-orphan"], extra)
    with pytest.raises(FinegrainError, match="no-such-run"):
        run_suite(configs, runs_root=runs)
    # two configs writing one run directory
    extra = {"t-dup": "description: same run name as t-cls\n"}
    configs = write_configs(tmp_path / "configs", ["t-cls", "t-dup"], extra)
    Path(configs[1]).write_text(Path(configs[1]).read_text().replace("name: t-dup", "name: t-cls"))
    with pytest.raises(FinegrainError, match="same run 't-cls'"):
        run_suite(configs, runs_root=runs)
    # a profile one config lacks
    configs = write_configs(tmp_path / "configs", ["t-cls", "t-ml"])
    with pytest.raises(FinegrainError, match="no 'quick' profile"):
        run_suite(configs, runs_root=runs, profile="quick")
    assert not runs.exists()


# ---------------------------------------------------------------- 3. the CLI


@pytest.mark.slow
def test_cli_unknown_suite_lists_the_valid_ones(tmp_path):
    env = {
        **os.environ,
        "FINEGRAIN_PROGRESS": "0",
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [sys.executable, "-m", "finegrain", "experiments", "run", "seed-00", "--runs", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert "unknown suite 'seed-00'" in r.stderr
    for name in SUITES:
        assert name in r.stderr, name
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_failing_run_is_listed_and_the_suite_goes_on(tmp_path):
    broken = {
        "t-broken": f"description: weights that are not there\nmodel: {{weights: {tmp_path / 'missing.pt'}}}\n",
        "t-broken-knn": "description: kNN on the broken run\ntask: knn\neval: {source_run: t-broken, k: 3}\n",
    }
    configs = write_configs(tmp_path / "cfg", ["t-broken", "t-broken-knn", "t-cls"], extra=broken)
    runs = tmp_path / "runs"
    tables = run_suite(configs, runs_root=runs)
    assert set(tables["failed"]) == {"t-broken", "t-broken-knn"}
    assert "missing.pt" in tables["failed"]["t-broken"]
    assert "source run 't-broken' failed" in tables["failed"]["t-broken-knn"]
    md, page = tables["markdown"].read_text(), tables["html"].read_text()
    assert "t-cls" in md_rows(md, "| Model")
    not_run = md.split("## Not run", 1)[1]
    assert "- t-broken: " in not_run and "- t-broken-knn: " in not_run
    assert "<h2>Not run</h2>" in page and "missing.pt" in page


@pytest.mark.parametrize("folder", ["2024", "yes"])
def test_data_is_the_same_absolute_path_for_the_suite_and_the_demo(folder, tmp_path, monkeypatch):
    # a folder named like a YAML number or boolean stays a path, relative to where the command runs
    from finegrain.config import load_config
    from finegrain.demo import _data_overrides
    from finegrain.experiments import load_suite

    monkeypatch.chdir(tmp_path)
    suite = load_suite(["demo-classifier"], None, Path(folder), tmp_path / "runs", None)
    demo = load_config("demo-classifier", overrides=_data_overrides(Path(folder)))
    assert suite[0].data.root == demo.data.root == str(tmp_path / folder)
