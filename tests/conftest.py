"""Shared fixtures. Real-data tests use ../shared/data and skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    from finegrain.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FINEGRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Tests share two cores with whatever else runs; keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets folder; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_cars(shared_data: Path) -> Path:
    root = shared_data / "stanford_cars"
    if not (root / "devkit").is_dir():
        pytest.skip(f"Stanford Cars not found at {root}")
    return root


@pytest.fixture(scope="session")
def real_tiny_imagenet(shared_data: Path) -> Path:
    root = shared_data / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        pytest.skip(f"Tiny ImageNet not found at {root}")
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> Path:
    """Keep prepared caches and the synthetic dataset of the tests out of ~/.cache."""
    cache = tmp_path_factory.mktemp("finegrain-cache")
    os.environ["FINEGRAIN_CACHE"] = str(cache)
    os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
    return cache


class CrashAt(Callback):
    """Simulates the process dying at batch ``batch`` of epoch ``epoch`` (both from 0)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def tiny_config(tmp_path: Path, **sections) -> ExperimentConfig:
    """A config that trains a tiny CNN on the built-in synthetic dataset in seconds."""
    from finegrain.config import build_config, deep_merge

    base = {
        "name": "tiny",
        "data": {
            "root": "synthetic",
            "image_size": [32, 32],
            "batch_size": 16,
            "num_workers": 0,
            "val_fraction": 0.2,
            "synthetic": {"num_classes": 4, "train_per_class": 20, "test_per_class": 8, "image_size": [48, 48]},
        },
        "model": {"backbone": "cars_cnn4", "weights": "none"},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 2, "seed": 0},
    }
    return build_config(deep_merge(base, sections))


def tiny_metric_config(tmp_path: Path, **sections) -> ExperimentConfig:
    """``tiny_config`` for metric learning: class-balanced batches of 8 (4 per class) from 6 classes,
    a 16-d embedding head, the multi-similarity loss, one epoch; ``sections`` override any of it."""
    from finegrain.config import deep_merge

    base = {
        "task": "metric_learning",
        "data": {
            "protocol": "retrieval",
            "sampler": "m_per_class",
            "m_per_class": 4,
            "batch_size": 8,
            "val_fraction": 0.0,
            "synthetic": {"num_classes": 6},
        },
        "model": {"head": "embedding", "embedding_dim": 16},
        "loss": {"name": "multi_similarity"},
        "train": {"epochs": 1},
    }
    return tiny_config(tmp_path, **deep_merge(base, sections))


def alias_bomb(levels: int = 9) -> str:
    """A config of about 400 bytes whose anchors and aliases stand for 9**levels values
    (``&a0 [x, ...]``, ``&a1 [*a0, ...]``, ...) under ``train.epochs``, which must be a number."""
    items = ["&a0 [x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return (
        "name: bomb\ndata: {root: synthetic}\nmodel: {backbone: cars_cnn4}\ntrain:\n  epochs: ["
        + ", ".join(items)
        + "]\n"
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny classifier trained for one epoch, evaluated and indexed (test split), shared by the
    session: copy it (``shutil.copytree``) before changing anything in it."""
    from finegrain.retrieval.gallery import build_index
    from finegrain.tasks import engine
    from finegrain.tasks.evaluate import evaluate_run

    root = tmp_path_factory.mktemp("trained")
    run, _ = engine.fit(tiny_config(root, name="trained", train={"epochs": 1}), runs_root=root / "runs")
    evaluate_run(run.path)
    build_index(run.path, gallery="test")
    return run.path
