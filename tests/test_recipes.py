"""Every shipped config on a user's folder: its test split is the test, a holdout only where it has none
(and the run says so), and the one thing to give (``--data``) named in one line when it is absent."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from finegrain.config import CONFIG_DIR, load_config, shipped_configs
from finegrain.data.folder import write_image_folder
from finegrain.data.module import split_for
from tests.data.conftest import make_samples

CLASSES = ["a", "b", "c", "d"]


def _folder(root: Path, with_test: bool) -> Path:
    splits = {"train": [(im, label) for im, label, _ in make_samples(4, 6, seed=1)]}
    if with_test:
        splits["test"] = [(im, label) for im, label, _ in make_samples(4, 2, seed=2)]
    else:
        splits = {"all": splits["train"]}
    return write_image_folder(root, CLASSES, splits)


def _resolved(name: str, folder: Path):
    """The config as ``finegrain train NAME --data FOLDER`` resolves it (with its cpu45 profile, if any)."""
    from finegrain.config import data_override, profiles_of

    profiles = [None] + [p for p in profiles_of(name) if p == "cpu45"]
    return [load_config(name, profile=p, overrides=[data_override(folder)]) for p in profiles]


def test_a_test_folder_is_the_test_under_every_shipped_config(tmp_path):
    folder = _folder(tmp_path / "flowers", with_test=True)
    test_files = sorted(str(p.resolve()) for p in (folder / "test").rglob("*.png"))
    names = shipped_configs()
    assert {"classify", "retrieve", "demo-retrieval"} <= set(names)
    for name in names:
        if name == "demo-retrieval":  # the demo of unseen classes: it says it did not test on test/
            split = split_for(_resolved(name, folder)[0].data)
            assert split.test_source == "held-out classes" and "own test split (8 images) is not" in split.tested_on
            continue
        for cfg in _resolved(name, folder):
            split = split_for(cfg.data)
            assert sorted(str(r.path) for r in split.test) == test_files, name
            assert split.test_source == "test split" and "own test split (8 images" in split.tested_on, name
            assert not split.warnings, name


def test_no_test_folder_gets_the_holdout_and_says_so(tmp_path, caplog):
    folder = _folder(tmp_path / "flat", with_test=False)
    for name in ("classify", "retrieve", "cars-lite0", "cars196-lite0-nsm"):
        for cfg in _resolved(name, folder):
            split = split_for(cfg.data)
            assert split.test and "the data has no test split" in split.tested_on, name
            held = {r.path for r in split.test}
            assert not held & {r.path for r in split.train + split.val}, name
            if cfg.data.protocol == "classification":
                assert split.test_source == "holdout"
                assert f"{cfg.data.holdout_fraction:.0%} holdout" in split.tested_on
                assert len(split.test) == round(cfg.data.holdout_fraction * 6) * 4
            else:
                assert split.test_source == "held-out classes"
                assert {r.label for r in split.test} == {2, 3}


def test_a_holdout_where_the_data_has_a_test_split_is_never_silent(tmp_path, caplog):
    folder = _folder(tmp_path / "flowers", with_test=True)
    for name, holdout in (("classify", "0.5"), ("retrieve", "0.5")):
        from finegrain.config import data_override

        cfg = load_config(name, overrides=[data_override(folder), f"data.holdout={holdout}"])
        with caplog.at_level(logging.WARNING, logger="finegrain.data.splits"):
            caplog.clear()
            split = split_for(cfg.data)
        assert split.test_source != "test split"
        assert "own test split (8 images) is not" in split.tested_on
        assert any(
            "NOT TESTED ON YOUR TEST SPLIT" in r.getMessage() and "data.holdout=auto" in r.getMessage()
            for r in caplog.records
        ), name


def test_no_shipped_config_names_a_folder_of_our_checkout():
    for path in CONFIG_DIR.glob("*.yaml"):
        assert "shared" not in path.read_text().replace("Shared settings", ""), path.name


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finegrain", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_what_to_give_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FINEGRAIN_DATA"}
    env["COLUMNS"] = "400"
    out = _cli("train", "classify", "--runs", str(tmp_path), env=env)
    assert out.returncode != 0 and out.stdout == ""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "give --data PATH" in lines[0] and "Traceback" not in out.stderr, out.stderr
    out = _cli("train", "cars-lite0", "--profile", "cpu45", "--runs", str(tmp_path), env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert "give --data PATH" in lines[0] and "FINEGRAIN_DATA" in lines[0]
    assert not any(tmp_path.iterdir())  # no run directory left behind


def test_metrics_say_what_the_run_was_tested_on(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["tested_on"]["source"] == "test split"
    assert metrics["tested_on"]["images"] == metrics["protocol"]["n_test"] == 32
    from finegrain.report.tables import comparison_rows, markdown_table

    rows = comparison_rows([trained_run])
    assert rows[0]["tested_on"] == "test split (32)"
    assert "| Tested on |" in markdown_table(rows) and "test split (32)" in markdown_table(rows)
