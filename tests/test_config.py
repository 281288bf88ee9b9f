"""Config loading: validation, nearest-key errors, profiles, extends, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finegrain.config import ExperimentConfig, build_config, config_to_yaml, load_config, parse_override
from finegrain.errors import ConfigError
from tests.conftest import alias_bomb


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# What every config file must say (finegrain.config.REQUIRED_KEYS); the tests add it to files about other things.
REQUIRED = {"name": "t", "data": {"root": "synthetic"}, "model": {"backbone": "cars_cnn4"}}


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
    with pytest.raises(ConfigError, match="Did you mean 'optim'"):
        build_config({"optimm": {"lr": 0.1}})


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="data.protocol"):
        build_config({"data": {"protocol": "retreival"}})


@pytest.mark.parametrize("task", ["metric_learning", "knn"])
def test_mixing_is_refused_where_no_classifier_trains(task):
    for key in ("mixup", "cutmix"):
        with pytest.raises(ConfigError, match=f"train.{key}.*task {task}"):
            build_config({"task": task, "train": {key: 0.5}})
    build_config({"task": "classification", "train": {"mixup": 0.5, "cutmix": 1.0}})


def test_override_parsing_and_precedence(tmp_path):
    assert parse_override("train.lr=0.01") == {"train": {"lr": 0.01}}
    assert parse_override("data.image_size=[64,64]") == {"data": {"image_size": [64, 64]}}
    path = write(
        tmp_path / "c.yaml",
        {
            **REQUIRED,
            "optim": {"lr": 0.1},
            "profiles": {"quick": {"optim": {"lr": 0.2}, "train": {"epochs": 1}}},
        },
    )
    cfg = load_config(path, profile="quick", overrides=["optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 1
    assert load_config(path, profile="quick").optim.lr == 0.2
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(path, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown profile 'full'"):
        load_config(path, profile="full")


def test_extends_merges_and_detects_loops(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"backbone": "resnet50", "dropout": 0.5}, "optim": {"lr": 0.1}})
    child = write(
        tmp_path / "child.yaml",
        {"extends": "base.yaml", "name": "child", "data": {"root": "synthetic"}, "model": {"dropout": 0.0}},
    )
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


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 500
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*expands to more than"):
        load_config(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: loop\ntrain: {epochs: &a [*a]}\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml.*alias refers to the anchor that contains it"):
        load_config(loop)
    value = alias_bomb().split("epochs: ", 1)[1].strip()
    assert parse_override("train.epochs=" + value) == {"train": {"epochs": value}}  # kept as text, not expanded


def test_a_bad_value_is_quoted_in_a_few_characters_never_whole(tmp_path):
    """A value under the expansion limit that is still wrong: the error quotes a short part of it."""
    small = tmp_path / "small.yaml"
    small.write_text(alias_bomb(levels=5))  # 9**5 values: allowed, and not a number
    with pytest.raises(ConfigError) as e:
        load_config(small)
    message = str(e.value)
    assert "train.epochs" in message and "valid integer" in message and len(message) < 400
    long = tmp_path / "long.yaml"
    write(long, {**REQUIRED, "description": ["x" * 100_000]})
    with pytest.raises(ConfigError) as e:
        load_config(long)
    assert "description" in str(e.value) and len(str(e.value)) < 400


def test_normalized_softmax_recipe_is_the_multi_similarity_one_but_for_its_loss(monkeypatch, tmp_path):
    """cars196-lite0-nsm (the shipped retrieval recipe) changes only the loss of cars196-lite0-ms, in every profile,
    so the two stay comparable when the multi-similarity recipe changes; its cpu45 profile also freezes a
    fourth stage, trains and tests on larger images and keeps no validation carve-out (what its benchmark
    rows measured)."""
    monkeypatch.setenv("FINEGRAIN_DATA", str(tmp_path))
    for profile in (None, "quick", "cpu45"):
        ms, nsm = load_config("cars196-lite0-ms", profile), load_config("cars196-lite0-nsm", profile)
        assert nsm.loss.name == "normalized_softmax" and ms.loss.name == "multi_similarity"
        skip = {"name": True, "description": True, "loss": True}
        if profile == "cpu45":
            assert (nsm.model.freeze_stages, ms.model.freeze_stages) == (4, 3)
            assert nsm.data.image_size == (224, 299) and ms.data.image_size == (192, 256)
            assert nsm.data.eval_image_sizes == [(224, 299), (256, 341), (288, 384)]
            assert (nsm.data.val_fraction, ms.data.val_fraction) == (0, 0.05)
            skip |= {"model": {"freeze_stages"}, "data": {"image_size", "eval_image_sizes", "val_fraction"}}
        assert nsm.model_dump(exclude=skip) == ms.model_dump(exclude=skip), profile
        assert nsm.description != ms.description and "normalized softmax" in nsm.description


def test_shipped_configs_are_package_data(monkeypatch, tmp_path):
    """The shipped configs live inside the package (so a wheel has them), extends included."""
    import finegrain
    from finegrain.config import CONFIG_DIR, resolve_config_path, shipped_configs

    assert CONFIG_DIR == Path(finegrain.__file__).parent / "configs"
    names = shipped_configs()
    assert {"cars-lite0", "demo-classifier", "demo-retrieval", "cars196-lite0-ms"} <= set(names)
    assert not any(n.startswith("_") for n in names)  # _cars.yaml and _tin.yaml are bases, not experiments
    assert resolve_config_path("cars-lite0") == CONFIG_DIR / "cars-lite0.yaml"
    assert resolve_config_path("cars-lite0.yaml") == CONFIG_DIR / "cars-lite0.yaml"
    # cars-lite0 takes its dataset from _cars.yaml beside it
    assert "extends" in yaml.safe_load((CONFIG_DIR / "cars-lite0.yaml").read_text())
    monkeypatch.setenv("FINEGRAIN_DATA", str(tmp_path))
    assert yaml.safe_load((CONFIG_DIR / "_cars.yaml").read_text())["data"]["root"] == "${FINEGRAIN_DATA}/stanford_cars"
    assert load_config("cars-lite0").data.root == f"{tmp_path}/stanford_cars"


def test_unknown_config_names_where_configs_are_looked_for():
    from finegrain.config import CONFIG_DIR

    with pytest.raises(ConfigError) as e:
        load_config("cars-lite")
    assert str(CONFIG_DIR) in str(e.value) and "Did you mean 'cars-lite0'?" in str(e.value)


def test_empty_or_all_default_config_names_what_is_missing(tmp_path, monkeypatch):
    """An empty file trained a ResNet-50 on every default; now it says what a config must set."""
    from finegrain.config import CONFIG_DIR, shipped_configs

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"does not set name, data.root, model.backbone"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"does not set model.backbone:"):
        load_config(write(tmp_path / "half.yaml", {"name": "x", "data": {"root": "synthetic"}}))
    # --set, --name (a name=... override) and a profile count as saying it
    cfg = load_config(empty, overrides=["name=x", "data.root=synthetic", "model.backbone=cars_cnn4"])
    assert cfg.model.backbone == "cars_cnn4"
    prof = write(
        tmp_path / "p.yaml",
        {"name": "p", "model": {"backbone": "cars_cnn4"}, "profiles": {"quick": {"data": {"root": "synthetic"}}}},
    )
    assert load_config(prof, profile="quick").data.root == "synthetic"
    with pytest.raises(ConfigError, match="data.root"):
        load_config(prof)
    # a kNN row may take its model from its source run
    knn = write(
        tmp_path / "k.yaml",
        {"name": "k", "task": "knn", "data": {"root": "synthetic"}, "eval": {"source_run": "other"}},
    )
    assert load_config(knn).eval.source_run == "other"
    # every shipped config says all of it, but the generic recipes, whose images are the user's (--data)
    monkeypatch.setenv("FINEGRAIN_DATA", str(tmp_path))
    for name in shipped_configs():
        if name in ("classify", "retrieve"):
            with pytest.raises(ConfigError, match=r"^" + name + r" needs your images: give --data PATH"):
                load_config(name)
        else:
            load_config(name)
    assert len(shipped_configs()) >= 20 and CONFIG_DIR.is_dir()
