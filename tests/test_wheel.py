"""The wheel works on its own: built offline, installed in a new virtual environment, run outside the repo.

A source checkout hides missing package data (the configs used to be found two folders above the
package), so this installs the wheel where the checkout is out of sight: a fresh venv whose only
finegrain is the wheel's, with this venv's third-party packages (torch etc.) made visible by a .pth
line. A .pth line adds a folder to sys.path without processing the .pth files inside it, so the
editable install of the checkout stays inactive; the test checks that too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "finegrain"


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail with its output when it exits non-zero."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def build_wheel(out: Path, env: dict[str, str]) -> Path:
    """Build the wheel offline from a copy of the sources.

    A copy, because setuptools builds in the source tree: it would write build/ into the shared
    checkout, and files left in an old build/lib end up in the next wheel.
    """
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"cannot build a wheel offline: {module} is not installed in {sys.prefix}")
    tree = out / "tree"
    tree.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = out / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            dist,
            tree,
        ],
        cwd=out,
        env=env,
    )
    wheels = list(dist.glob("finegrain-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def shipped_names() -> set[str]:
    """The experiment configs of the checkout (``_*.yaml`` are bases that others extend)."""
    return {p.stem for p in (PACKAGE / "configs").glob("*.yaml") if not p.stem.startswith("_")}


def first_column(table: str) -> set[str]:
    """The non-empty cells of a rich table's first column."""
    cells = set()
    for line in table.splitlines():
        parts = re.split(r"[│|┃]", line)
        if len(parts) > 2 and parts[1].strip():
            cells.add(parts[1].strip())
    return cells


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_repo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        FINEGRAIN_PROGRESS="0",
        FINEGRAIN_CACHE=str(tmp_path / "cache"),
        PYTHONIOENCODING="utf-8",
        COLUMNS="80",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    work = tmp_path / "work"  # outside the repo: no configs/ or src/ around
    work.mkdir()

    wheel = build_wheel(tmp_path / "build", env)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for sub, pattern in (("configs", "*.yaml"), ("serve/static", "*"), ("report/templates", "*")):
        for f in (PACKAGE / sub).glob(pattern):
            assert f"finegrain/{sub}/{f.name}" in names, f"{f.name} is not in the wheel"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, env=env)
    python = venv / "bin" / "python"
    # Install before the .pth below exists, so pip does not see the checkout's editable finegrain.
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=work,
        env=env,
    )
    site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env
        ).stdout.strip()
    )
    (site / "_finegrain_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    probe = run(
        [
            python,
            "-c",
            "import json, sys, finegrain, torch; "
            "print(json.dumps({'finegrain': finegrain.__file__, 'torch': torch.__file__, 'path': sys.path}))",
        ],
        cwd=work,
        env=env,
    )
    seen = json.loads(probe.stdout)
    assert Path(seen["finegrain"]).is_relative_to(venv), seen["finegrain"]
    assert str(ROOT / "src") not in seen["path"]  # the editable install stayed inactive
    assert Path(seen["torch"]).is_relative_to(sysconfig.get_paths()["purelib"])

    listed = run([venv / "bin" / "finegrain", "configs"], cwd=work, env=env).stdout
    cells = first_column(listed) - {"name"}
    assert {"cars-lite0", "demo-classifier", "demo-retrieval"} <= cells
    assert cells == shipped_names(), listed  # every experiment config, whole names, no _bases

    runs = tmp_path / "runs"
    demo = run([venv / "bin" / "finegrain", "demo", "--runs", runs, "--epochs", "1"], cwd=work, env=env, timeout=900)
    assert "done in" in demo.stdout
    cls = json.loads((runs / "demo-classifier" / "metrics.json").read_text())
    ret = json.loads((runs / "demo-retrieval" / "metrics.json").read_text())
    assert 0.0 <= cls["classification"]["top1"] <= 1.0
    assert 0.0 <= ret["retrieval"]["recall@1"] <= 1.0
    assert (runs / "demo-retrieval" / "index" / "meta.json").is_file()

    # The first command a user with a folder of their own runs: the generic recipe within a budget.
    from finegrain.data.folder import write_image_folder
    from tests.data.conftest import make_samples

    folder = write_image_folder(
        tmp_path / "my photos",
        ["daisy", "rose", "tulip"],
        {
            "train": [(im, label) for im, label, _ in make_samples(3, 6, size=48, seed=1)],
            "test": [(im, label) for im, label, _ in make_samples(3, 2, size=48, seed=2)],
        },
    )
    mine = run(
        [
            venv / "bin" / "finegrain",
            "train",
            "classify",
            "--data",
            folder,
            "--budget",
            "2m",
            "--runs",
            tmp_path / "my-runs",
        ],
        cwd=work,
        env=env,
        timeout=600,
    )
    assert "budget 2.0 min (wall-clock)" in mine.stdout and "predicted" in mine.stdout
    metrics = json.loads((tmp_path / "my-runs" / "classify" / "metrics.json").read_text())
    assert metrics["tested_on"] == {
        "source": "test split",
        "images": 6,
        "words": "the data's own test split (6 images)",
    }
    assert json.loads((tmp_path / "my-runs" / "classify" / "budget.json").read_text())["budget_seconds"] == 120

    # The search page and every asset it names are where the installed app serves them from.
    page = run(
        [
            python,
            "-c",
            """
import json, re
from finegrain.serve.app import STATIC_DIR
html = (STATIC_DIR / "index.html").read_text()
assets = sorted(set(re.findall(r'(?:src|href)="/static/([^"]+)"', html)))
print(json.dumps({"static": str(STATIC_DIR), "assets": assets, "found": [(STATIC_DIR / a).is_file() for a in assets]}))
""",
        ],
        cwd=work,
        env=env,
    )
    served = json.loads(page.stdout.strip().splitlines()[-1])
    assert Path(served["static"]).is_relative_to(venv), served
    assert served["assets"] and all(served["found"]), served
