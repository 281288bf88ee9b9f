"""Training precision: ``auto`` decided by the machine, an explicit value obeyed (with a warning)."""

from __future__ import annotations

import logging

import pytest

import finegrain.machine as machine
from finegrain.config import build_config
from finegrain.runs import RunDir
from finegrain.tasks.engine import trainer_for


@pytest.mark.parametrize(
    "native_bf16, requested, expected",
    [
        (False, "auto", "32-true"),
        (True, "auto", "bf16-mixed"),
        (False, "32", "32-true"),
        (True, "32", "32-true"),
        (False, "bf16-mixed", "bf16-mixed"),
    ],
)
def test_trainer_precision(tmp_path, monkeypatch, native_bf16, requested, expected):
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(machine, "cuda_available", lambda: False)
    cfg = build_config({"name": "p", "train": {"precision": requested, "accelerator": "cpu"}})
    trainer = trainer_for(cfg, RunDir(tmp_path / "p"), "val/acc", "max", has_val=True)
    assert trainer.precision == expected


def test_bf16_on_a_cpu_without_it_warns_once_in_a_line(monkeypatch, caplog):
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(machine, "cuda_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="finegrain.machine"):
        assert machine.resolve_precision("bf16-mixed") == "bf16-mixed"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "slower" in lines[0]


@pytest.mark.parametrize(
    "written, value", [("32", "32"), ("'32'", "32"), ("bf16-mixed", "bf16-mixed"), ("auto", "auto")]
)
def test_precision_is_accepted_as_a_user_writes_it(written, value):
    from finegrain.config import parse_override

    cfg = build_config({"name": "p", **parse_override(f"train.precision={written}")})
    assert cfg.train.precision == value


def test_an_unknown_precision_names_the_valid_ones():
    from finegrain.errors import ConfigError

    with pytest.raises(ConfigError, match="'auto'.*'32'.*'bf16-mixed'"):
        build_config({"name": "p", "train": {"precision": 16}})
