"""The command line as scripts and log files see it: piped output that keeps every file name whole,
``--json`` documents on stdout alone, ``info``, and ``search``/``evaluate`` on a tiny trained run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finegrain import machine
from finegrain.cli import app
from finegrain.data.folder import write_image_folder
from finegrain.inference import speed as speed_module
from tests.conftest import tiny_config
from tests.data.conftest import make_samples

# three nested folders of 50+ characters, one with [brackets] (rich markup) and spaces
DEEP = (
    "a-folder-whose-name-is-long-enough-to-matter-0123456789",
    "[v2] second level, with spaces and brackets",
    "third-level-of-the-tree-abcdefghijklmnopqrstuvwxyz-0123456789",
)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m finegrain ARGS`` with stdout and stderr piped (not terminals), no COLUMNS set."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["FINEGRAIN_PROGRESS"] = "1"  # the progress bar must not reach stdout either
    return subprocess.run(
        [sys.executable, "-m", "finegrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def deep_bad(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An image folder (train/test) whose class folders hold bad files three long folders down:
    returns the root and {full path: reason} of every bad file (each path 150+ characters)."""
    root = tmp_path / "dataset"
    write_image_folder(
        root,
        ["a", "b"],
        {
            "train": [(im, label) for im, label, _ in make_samples(2, 2, seed=1)],
            "test": [(im, label) for im, label, _ in make_samples(2, 1, seed=2)],
        },
    )
    deep = root.resolve() / "train" / "a" / Path(*DEEP)
    deep.mkdir(parents=True)
    good = deep / "good-image-that-decodes-fine.jpg"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    bad = {
        deep / "an-empty-file-with-a-long-name-0123456789.jpg": "empty",
        deep / "a-text-file-that-only-pretends-to-be-a-picture.jpg": "not-an-image",
        deep / "a-jpeg-cut-in-half-by-an-interrupted-download.jpg": "truncated",
    }
    paths = list(bad)
    paths[0].write_bytes(b"")
    paths[1].write_text("hello, I am not a picture\n")
    paths[2].write_bytes(data[: len(data) // 2])
    assert all(len(str(p)) >= 150 for p in bad)
    return root, {str(p): reason for p, reason in bad.items()}


def test_no_command_help_breaks_a_line_mid_sentence():
    # `--help` keeps a docstring's line breaks (typer's rich markup mode): a paragraph spread over two
    # source lines printed broken mid-sentence, in `finegrain --help`'s list of commands too
    import inspect

    import typer

    def paragraphs(cmd, name: str):
        for p in inspect.cleandoc(cmd.short_help or cmd.help or "").split("\n\n"):
            yield name, p
        for sub, c in getattr(cmd, "commands", {}).items():
            yield from paragraphs(c, f"{name} {sub}")

    broken = [(n, p) for n, p in paragraphs(typer.main.get_command(app), "finegrain") if "\n" in p]
    assert not broken, broken


def test_log_lines_in_a_file_are_whole_and_unpadded(tmp_path):
    # the CLI's logging set up as `finegrain ... 2> log.txt` sets it up: stderr is a file, not a terminal
    path = str(tmp_path.joinpath(*DEEP, "embeddings"))
    code = (
        "import logging; from finegrain.cli.common import setup_logging; setup_logging(False); "
        f"logging.getLogger('finegrain.x').info('reusing the test embeddings in %s (same model)', {path!r})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"INFO     reusing the test embeddings in {path} (same model)"]


@pytest.mark.slow
def test_data_check_piped_prints_whole_file_names(deep_bad):
    root, bad = deep_bad
    r = _cli("data", "check", str(root), cwd=root.parent)
    assert r.returncode == 1, r.stderr  # bad files: exit 1
    for path, reason in bad.items():
        line = next((ln for ln in r.stdout.splitlines() if path in ln), None)
        assert line is not None, f"{path} not printed whole:\n{r.stdout}"
        assert reason in line
    assert "…" not in r.stdout
    assert r.stdout.startswith("Dataset ")  # no progress bar residue before the report


def test_data_check_json(deep_bad):
    root, bad = deep_bad
    r = _cli("data", "check", str(root), "--json", cwd=root.parent)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert {b["path"]: b["reason"] for b in doc["bad_files"]} == bad
    assert all(b["split"] == "train" for b in doc["bad_files"])
    assert doc["ok"] is False and doc["format"] == "image_folder" and doc["num_classes"] == 2
    assert doc["images"] == {"train": 2 * 2 + 4, "test": 2} and doc["classes"] == {"train": 2, "test": 2}


@pytest.mark.slow
def test_info_json_no_bench(tmp_path):
    r = _cli("info", "--json", "--no-bench", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    precision, why = machine.auto_precision()
    assert doc["auto_precision"] == precision and doc["auto_precision_reason"] == why
    assert doc["native_bf16"] == machine.cpu_has_native_bf16()
    assert doc["cpu_flags"] == list(machine.cpu_flags()) and doc["cores"] == machine.cores()
    assert doc["versions"]["torch"] and doc["versions"]["finegrain"] and doc["python"]
    plan = doc["thread_plan"]
    assert (plan["workers"], plan["torch_threads"]) == machine.plan_threads(plan["workers_asked"])
    assert doc["inference_speed"] is None
    assert doc["budget_clock"].startswith("wall-clock time on this machine")


def test_info_says_what_a_budget_counts():
    r = CliRunner().invoke(app, ["info", "--no-bench"], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert re.search(r"--budget +│ wall-clock time on this machine for the whole `finegrain train` command", r.stdout)


@pytest.mark.slow
def test_info_measures_fp32_and_bf16(monkeypatch):
    """The bench path end to end, at 32x32 to stay fast: the real measurement, JSON and table."""
    calls, measured = [], []
    real = speed_module.measure_inference_speed

    def small(seconds, precisions, batch_size, image_size):
        calls.append((seconds, tuple(precisions), batch_size, image_size))
        if not measured:  # the real measurement once; the table below reuses it (bf16 is slow here)
            measured.append(real(seconds, precisions, batch_size=1, image_size=16))
        return measured[0]

    monkeypatch.setattr(speed_module, "measure_inference_speed", small)
    runner = CliRunner()
    r = runner.invoke(app, ["info", "--json", "--seconds", "0.05"])
    assert r.exit_code == 0, r.output
    assert calls == [(0.05, ("32", "bf16-mixed"), 8, 224)]  # what the CLI asks for
    speed = json.loads(r.stdout)["inference_speed"]
    assert speed["model"] == speed_module.BENCH_BACKBONE and speed["batch_size"] == 8
    ips = measured[0]
    assert speed["images_per_second"] == ips and all(v > 0 and math.isfinite(v) for v in ips.values())
    r = runner.invoke(app, ["info", "--seconds", "0.05"])
    assert r.exit_code == 0, r.output
    fp32, bf16 = ips["32"], ips["bf16-mixed"]
    assert re.search(rf"inference fp32 +│ {fp32:.1f} images/s", r.stdout)
    ratio = max(fp32, bf16) / min(fp32, bf16)
    assert re.search(rf"inference bf16 autocast +│ {bf16:.1f} images/s \({ratio:.1f}x", r.stdout)
    assert re.search(rf"precision auto +│ {re.escape(machine.auto_precision()[0])}: ", r.stdout)


@pytest.mark.parametrize("native", [True, False])
def test_info_says_cached_runs_choose_their_step_precision_only_where_auto_is_bf16(monkeypatch, native):
    monkeypatch.setattr(machine, "cuda_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: native)
    r = CliRunner().invoke(app, ["info", "--no-bench"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert ("a probe at its start finds faster" in r.stdout) is native


# ----------------------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A classifier trained for one epoch on the synthetic data (seconds), with a FAISS index of its test split."""
    from finegrain.tasks import engine

    tmp = tmp_path_factory.mktemp("cli-run")
    cfg = tiny_config(
        tmp,
        name="tiny-cli",
        train={"epochs": 1},
        data={"val_fraction": 0.0, "synthetic": {"num_classes": 3, "train_per_class": 6, "test_per_class": 3}},
    )
    run, _ = engine.fit(cfg, runs_root=tmp)
    r = CliRunner().invoke(app, ["index", str(run.path)])
    assert r.exit_code == 0, r.output
    return run.path


def test_evaluate_json(tiny_run):
    r = CliRunner().invoke(app, ["evaluate", str(tiny_run), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == json.loads((tiny_run / "metrics.json").read_text(), parse_constant=lambda c: None)
    assert doc["protocol"]["protocol"] == "classification" and doc["protocol"]["n_test"] == 9
    assert 0.0 <= doc["classification"]["top1"] <= 1.0
    m = doc["machine"]  # metrics.json records what machine.machine_info() knows
    assert m["auto_precision"] == machine.auto_precision()[0] and m["cpu_flags"] == list(machine.cpu_flags())
    assert "native_bf16" in m and m["cores"] == machine.cores()


@pytest.mark.slow
def test_search_json_and_sheet(tiny_run, tmp_path):
    runner = CliRunner()
    query = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(query)
    r = runner.invoke(app, ["search", str(tiny_run), str(query), "--k", "4", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["query"] == str(query) and doc["gallery_size"] == 9 and doc["sheet"] is None
    assert [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4]
    assert all(Path(h["path"]).is_file() and not h["same_image"] for h in doc["hits"])
    assert doc["prediction"]["source"] == "classifier"
    assert math.isclose(sum(c["probability"] for c in doc["prediction"]["classes"]), 1.0, abs_tol=1e-4)

    # a gallery image as the query: itself first, marked; the sheet's name gets the .png matplotlib gives it
    gallery_image = doc["hits"][2]["path"]
    r = runner.invoke(
        app, ["search", str(tiny_run), gallery_image, "--k", "3", "--json", "--sheet", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["hits"][0]["path"] == gallery_image and doc["hits"][0]["same_image"]
    assert doc["sheet"] == str(tmp_path / "out.png") and Path(doc["sheet"]).is_file()

    r = runner.invoke(app, ["search", str(tiny_run), gallery_image, "--k", "3", "--sheet", str(tmp_path / "s2")])
    assert r.exit_code == 0, r.output
    assert f"contact sheet: {tmp_path / 's2.png'}" in r.stdout and (tmp_path / "s2.png").is_file()
    assert f"{gallery_image} (the query itself)" in r.stdout  # the whole path, though the output is no terminal


def test_a_command_that_needs_the_training_stack_says_so_on_a_serving_only_install(tmp_path):
    # as where only finegrain[serve] is installed: the training stack's modules are not found
    prelude = (
        "import sys\n"
        "class _NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'lightning', 'matplotlib'}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NotInstalled())\n"
        "sys.argv = ['finegrain', *sys.argv[1:]]\n"
        "from finegrain.cli import main; main()\n"
    )
    (tmp_path / "config.yaml").write_text("name: x\n")  # a run directory, so the command gets as far as the model
    for command in ("index", "evaluate", "report"):
        r = subprocess.run(
            [sys.executable, "-c", prelude, command, str(tmp_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, (command, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # index asks the engines layer, which also offers an ONNX export; the others name the missing module
        says_why = "PyTorch is not installed" if command == "index" else f"`finegrain {command}` needs"
        assert says_why in r.stderr and "pip install 'finegrain[train]'" in r.stderr, r.stderr


@pytest.mark.slow
def test_the_train_extra_modules_named_by_the_cli_cover_the_train_extra():
    # the CLI names a missing module of the `train` extra; a package added to the extra (and not also
    # in `serve`) without its import name here would end in a traceback on a serving-only install
    import importlib.metadata as md
    import tomllib

    from finegrain.cli import TRAIN_EXTRA_MODULES

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    train_only = {name(r) for r in extras["train"]} - {name(r) for r in extras["serve"]}
    imports_of: dict[str, set[str]] = {}
    for module, dists in md.packages_distributions().items():
        for dist in dists:
            imports_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    for dist in sorted(train_only):
        modules = {m for m in imports_of.get(dist, set()) if not m.startswith("_")}
        assert modules, f"{dist} is not installed in the test environment"
        assert modules & TRAIN_EXTRA_MODULES, (dist, modules)
