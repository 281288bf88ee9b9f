"""``--budget``: plans that fit their budget for a given machine speed, never less work for more time,
and a training that stops in time, is evaluated and resumes."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from finegrain.config import load_config
from finegrain.errors import ConfigError
from finegrain.tasks import budget
from finegrain.tasks.budget import LADDER, DataSize, Speed, parse_budget, plan

# seconds per image and megapixel: a slow CPU core, and one 4x as fast
SLOW = Speed(
    frozen_forward={3: 0.09, 4: 0.10},
    trained_step={3: 0.30, 4: 0.18},
    full_forward=0.20,
)
FAST = Speed(
    frozen_forward={k: v / 4 for k, v in SLOW.frozen_forward.items()},
    trained_step={k: v / 4 for k, v in SLOW.trained_step.items()},
    full_forward=SLOW.full_forward / 4,
)
CARS = DataSize(train_images=4072, test_images=4072, aspect=2.0)


def _recipe(name: str = "classify"):
    return load_config(name, overrides=["data.root=synthetic"])


def _work(p) -> tuple:
    r = p.rung
    return (p.image_size[0] * p.image_size[1], -r.freeze_stages, r.views, r.epochs)


def test_parse_budget():
    assert parse_budget("30m") == parse_budget("30") == parse_budget("0.5h") == 1800
    assert parse_budget("1h30m") == 5400 and parse_budget("90s") == 90 and parse_budget("2h") == 7200
    for bad in ("soon", "30x", "", "10s"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)


def test_the_ladder_never_does_less_work_than_the_rung_before():
    for a, b in itertools.pairwise(LADDER):
        assert b.short_side >= a.short_side and b.freeze_stages <= a.freeze_stages
        assert b.views >= a.views and b.epochs >= a.epochs and b != a


@pytest.mark.parametrize("name", ["classify", "retrieve"])
@pytest.mark.parametrize("speed", [SLOW, FAST], ids=["slow", "fast"])
def test_plans_fit_their_budget_and_grow_with_it(name, speed):
    recipe = _recipe(name)
    previous = None
    for minutes in (15, 20, 30, 45, 60, 90, 180, 600):
        p = plan(minutes * 60, CARS, speed, recipe)
        if p.fits:
            assert p.predicted_seconds <= budget.PLANNED_SHARE * minutes * 60
        else:
            assert p.rung == LADDER[0] and "exceed the budget" in p.words()
        if previous is not None:
            assert all(x >= y for x, y in zip(_work(p), _work(previous), strict=True)), (minutes, p, previous)
            assert p.predicted_seconds >= previous.predicted_seconds
        previous = p
    # the data's aspect (2:1, as cropped cars) shapes the images; evaluation sizes follow the recipe's
    assert p.image_size[1] == 2 * p.image_size[0]
    assert len(p.eval_image_sizes) == len(recipe.data.eval_image_sizes)


def test_time_left_below_the_next_rung_buys_epochs():
    """A plan fills its share of the budget with epochs, up to the next rung's: one more epoch would
    not fit, or the next rung's epochs are reached."""
    recipe = _recipe()
    for minutes in (20, 45, 90):
        p = plan(minutes * 60, CARS, SLOW, recipe)
        i = [replace(r, epochs=0) for r in LADDER].index(replace(p.rung, epochs=0))
        assert LADDER[i].epochs <= p.rung.epochs <= LADDER[i + 1].epochs
        if p.rung.epochs < LADDER[i + 1].epochs:
            seconds, _, _ = budget.predict(replace(p.rung, epochs=p.rung.epochs + 1), CARS, SLOW, recipe)
            assert sum(seconds.values()) > budget.PLANNED_SHARE * minutes * 60, (minutes, p.rung)


def test_a_faster_machine_or_less_data_plans_at_least_as_much():
    recipe = _recipe()
    for minutes in (15, 45, 90):
        slow, fast = (
            plan(minutes * 60, CARS, SLOW, recipe),
            plan(minutes * 60, CARS, FAST, recipe),
        )
        assert all(x >= y for x, y in zip(_work(fast), _work(slow), strict=True))
        small = plan(minutes * 60, replace(CARS, train_images=500, test_images=500), SLOW, recipe)
        assert all(x >= y for x, y in zip(_work(small), _work(slow), strict=True))
    # at 45 minutes on the slow machine the plan is neither the smallest nor the largest
    p = plan(45 * 60, CARS, SLOW, recipe)
    assert LADDER[0] != p.rung != LADDER[-1] and p.fits


def test_the_plan_sets_what_it_says(tmp_path):
    recipe = _recipe()
    p = plan(1800, CARS, SLOW, recipe)
    cfg = load_config("classify", overrides=["data.root=synthetic", *p.overrides()])
    assert cfg.data.image_size == p.image_size and cfg.data.eval_image_sizes == p.eval_image_sizes
    assert (
        cfg.model.freeze_stages,
        cfg.train.frozen_cache_views,
        cfg.train.epochs,
    ) == (p.rung.freeze_stages, p.rung.views, p.rung.epochs)
    assert f"{p.rung.epochs} epochs" in p.words() and "wall-clock" in p.words()


def test_a_recipe_without_the_frozen_cache_is_refused():
    with pytest.raises(ConfigError, match="--budget plans recipes that train on the frozen cache"):
        plan(
            1800,
            CARS,
            SLOW,
            load_config("cars-cnn-1", overrides=["data.root=synthetic"]),
        )


def test_plan_for_measures_the_data_with_a_patched_probe(monkeypatch, tmp_path):
    """plan_for reads the data's counts and aspect; the probe (patched: a fake machine speed) is asked for
    the recipe's model."""
    from finegrain.data.folder import write_image_folder
    from tests.data.conftest import make_samples

    root = write_image_folder(
        tmp_path / "wide",
        ["a", "b", "c"],
        {
            "train": [(im.resize((48, 16)), label) for im, label, _ in make_samples(3, 5, seed=1)],
            "test": [(im.resize((48, 16)), label) for im, label, _ in make_samples(3, 2, seed=2)],
        },
    )
    asked = []
    monkeypatch.setattr(budget, "measure_speed", lambda recipe, n: asked.append(n) or SLOW)
    p = budget.plan_for(load_config("classify", overrides=[f"data.root={root}"]), 1800)
    assert asked == [3] and p.data == DataSize(15, 6, 3.0)
    assert replace(p.rung, epochs=LADDER[-1].epochs) == LADDER[-1] and p.fits  # 15 images: the largest plan fits
    assert p.image_size[1] == round(2.5 * p.image_size[0] / 8) * 8  # the aspect, clipped at 2.5:1


def _class_scores(out) -> list[tuple[int, ...]]:
    """The shapes of the [batch, classes] arrays among a model's outputs (a dict, list or tensor)."""
    values = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else [out]
    return [tuple(v.shape) for v in values if len(getattr(v, "shape", ())) == 2]


@pytest.mark.slow
def test_the_probe_times_the_whole_model_per_image_on_the_evaluations_engine(monkeypatch):
    """The evaluation is timed on ONNX Runtime for an exported recipe, in torch otherwise, and either
    way on the whole model (its class scores, not a part of it) over the probe's batch, divided by the
    batch: each timed work is run here and what it computed is checked, not how long it took."""
    computed = []

    def timed(work, rounds: int = 2) -> float:
        computed.append(work())
        return 1.0 / budget.PROBE_BATCH  # "one second a batch"

    monkeypatch.setattr(budget, "_seconds_per_image", timed)
    mp = budget.PROBE_SIZE[0] * budget.PROBE_SIZE[1] / 1e6
    recipe = _recipe()
    assert recipe.eval.export_onnx
    plain = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"export_onnx": False})})
    for r, engine in ((recipe, "onnx"), (plain, "torch")):
        computed.clear()
        speed = budget.measure_speed(r, 4)
        assert speed.evaluation_engine == engine
        assert (budget.PROBE_BATCH, 4) in _class_scores(computed[-1])  # the last timed work: the evaluation
        assert speed.full_forward == pytest.approx(1 / budget.PROBE_BATCH / mp, rel=1e-3)
        assert set(speed.frozen_forward) == set(speed.trained_step) == {rung.freeze_stages for rung in LADDER}
        assert all(v > 0 for v in [*speed.frozen_forward.values(), *speed.trained_step.values()])


def test_a_spent_budget_stops_training_evaluates_and_resumes(tmp_path):
    from finegrain.tasks.workflow import train_and_evaluate
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, name="budgeted", train={"epochs": 3})
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs", deadline=time.monotonic())  # already spent
    assert metrics is not None and metrics["partial"] and metrics["epochs_done"] == 1
    assert run.training_state()["status"] == "training"
    history = (run.path / "history.csv").read_text().splitlines()
    assert len(history) == 2  # the header and the one epoch
    run, metrics = train_and_evaluate(cfg, tmp_path / "runs", resume=True)
    assert not metrics["partial"] and metrics["epochs_done"] == 3
    assert json.loads(Path(run.metrics).read_text())["epochs_done"] == 3


def test_the_time_kept_after_training_is_the_plans_evaluation_and_export():
    """A plan keeps its predicted evaluation and export; a resumed run (no plan) a fixed share."""
    p = plan(1800, CARS, SLOW, _recipe())
    kept = budget.reserved_seconds(1800, p)
    assert kept == p.seconds["evaluation"] + p.seconds["overhead"] / 2 and kept < p.predicted_seconds
    assert budget.reserved_seconds(1800, None) == budget.RESUMED_RESERVE * 1800
