"""Config loading: validation, nearest-key errors, profiles, extends, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finegrain.config import ExperimentConfig, build_config, config_to_yaml, load_config, parse_override
from finegrain.errors import ConfigError


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_round_trip_through_yaml():
    cfg = build_config({})
    again = build_config(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg
    # every default is written out
    text = config_to_yaml(cfg)
    for section in ExperimentConfig.model_fields:
        assert f"{section}:" in text


def test_misspelt_key_names_key_and_closest():
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"epochz": 3}})
    assert "train.epochz" in str(e.value)
    assert "train.epochs" in str(e.value)


def test_misspelt_section_is_caught():
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        build_config({"optimm": {"lr": 0.1}})


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="data.protocol"):
        build_config({"data": {"protocol": "retreival"}})


def test_override_parsing_and_precedence(tmp_path):
    assert parse_override("train.lr=0.01") == {"train": {"lr": 0.01}}
    assert parse_override("data.image_size=[64,64]") == {"data": {"image_size": [64, 64]}}
    path = write(tmp_path / "c.yaml", {
        "optim": {"lr": 0.1},
        "profiles": {"quick": {"optim": {"lr": 0.2}, "train": {"epochs": 1}}},
    })
    cfg = load_config(path, profile="quick", overrides=["optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 1
    assert load_config(path, profile="quick").optim.lr == 0.2
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(path, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown profile 'full'"):
        load_config(path, profile="full")


def test_extends_merges_and_detects_loops(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"backbone": "resnet50", "dropout": 0.5}, "optim": {"lr": 0.1}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "model": {"dropout": 0.0}})
    cfg = load_config(child)
    assert cfg.model.backbone == "resnet50" and cfg.model.dropout == 0.0 and cfg.optim.lr == 0.1
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
