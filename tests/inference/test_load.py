"""Loading a run's model: one source of config (the checkpoint's), checked against config.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.inference.load import check_config_copy, load_model, read_checkpoint
from finegrain.runs import open_run


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest


def test_the_model_and_its_config_come_from_the_checkpoint(run_copy):
    loaded = load_model(run_copy)
    stored = torch.load(loaded.checkpoint, map_location="cpu", weights_only=True)
    assert loaded.cfg.model_dump(mode="json") == stored["hyper_parameters"]["config"]
    assert loaded.class_names == list(stored["hyper_parameters"]["class_names"])
    assert loaded.has_classifier and not loaded.model.training


def test_a_config_copy_that_changes_how_images_are_seen_is_refused(run_copy):
    cfg_file = run_copy / "config.yaml"
    text = cfg_file.read_text()
    assert "eval_image_sizes: []" in text
    cfg_file.write_text(text.replace("eval_image_sizes: []", "eval_image_sizes: [[40, 40]]"))
    with pytest.raises(FinegrainError, match=r"data\.eval_image_sizes.*config\.yaml"):
        load_model(run_copy)


def test_a_config_copy_that_differs_only_in_where_data_lives_loads(run_copy):
    cfg_file = run_copy / "config.yaml"
    text = cfg_file.read_text()
    assert "batch_size: 16" in text and "root: synthetic" in text
    cfg_file.write_text(text.replace("batch_size: 16", "batch_size: 8").replace("root: synthetic", "root: elsewhere"))
    run = open_run(run_copy)
    check_config_copy(run, load_model(run).cfg)  # no error: batch size does not change an embedding


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "best.ckpt"
    torch.save({"hyper_parameters": {"config": {}, "class_names": []}, "x": _Planted(marker)}, ckpt)
    with pytest.raises(FinegrainError, match="unsafe or not a finegrain checkpoint"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FinegrainError, match="checkpoint"):
        read_checkpoint(ckpt)
