"""The accuracy benchmark's recipe record: what groups rows into one recipe for the seeds' mean."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _cfg(val_fraction: float) -> dict:
    return {"task": "classification", "data": {"image_size": [224, 299], "augment": "light", "val_fraction": val_fraction},
            "eval": {"tta_flip": True}, "model": {"backbone": "efficientnet_lite0"}, "train": {"epochs": 8},
            "optim": {"name": "adamw"}, "loss": {"name": "cross_entropy"}}


def test_a_run_without_a_validation_carve_out_is_another_recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("accuracy_cars", None)
    import accuracy_cars

    # rows recorded before the carve-out mattered keep comparing equal whatever their fraction
    assert accuracy_cars.recipe_of(_cfg(0.05)) == accuracy_cars.recipe_of(_cfg(0.1))
    # a run that trains on every image is not averaged with runs that held some out
    assert accuracy_cars.recipe_of(_cfg(0)) != accuracy_cars.recipe_of(_cfg(0.05))
    assert accuracy_cars.recipe_of(_cfg(0))["val_fraction"] == 0
