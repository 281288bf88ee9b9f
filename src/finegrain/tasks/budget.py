"""``finegrain train ... --budget 30m``: a time budget that chooses a recipe's image size, frozen
stages, cached views and epochs from the data's size and this machine's measured speed.

The budget is **wall-clock time on this machine** for the whole command: start-up, building the
frozen cache, training, the ONNX export and the evaluation. A short probe (:func:`measure_speed`,
a few seconds) times the three kinds of work of a frozen-cache recipe on a copy of its model: the
frozen stages' forward pass (the cache), a training step of the rest (the cached step, in the faster
of bf16 and fp32, as :mod:`~finegrain.tasks.phase_precision` picks) and the whole model's forward
pass (the evaluation, on ONNX Runtime where the run evaluates its export). :func:`plan` then takes
the largest rung of :data:`LADDER` whose predicted time fits :data:`PLANNED_SHARE` of the budget,
and spends the time left below the next rung on more epochs: each rung does at least the work of the
one before in every setting, so a larger budget never plans less work. Training stops after the epoch that
leaves too little time for the next one and the evaluation (``engine.BudgetStop``): the run is
then evaluated, and ``--resume`` continues it.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from finegrain import machine
from finegrain.config import ExperimentConfig
from finegrain.config.schema import eval_sizes
from finegrain.errors import ConfigError, FinegrainError
from finegrain.inference.engines import evaluation_precision
from finegrain.models.build import build_from_config
from finegrain.runs import atomic_write_json

if TYPE_CHECKING:
    from finegrain.data.splits import Split

log = logging.getLogger(__name__)

BUDGET_CLOCK = (
    "wall-clock time on this machine for the whole `finegrain train` command (start-up, frozen "
    "cache, training, export, evaluation), planned from a speed probe at its start"
)
"""What ``--budget`` counts, as ``finegrain info`` and the plan say it."""

PLANNED_SHARE = 0.9
"""The share of the budget a plan may predict: the measured speed varies, and what a stop saves is
at most one epoch."""
OVERHEAD_SECONDS = 40.0
"""Start-up, the probe, reading the data and the ONNX export: an allowance, not a measurement."""
CROP_AREA = 0.77
"""Mean area of a cached training step's feature map: each side randomly cropped to 75-100% (0.875^2)."""
PROBE_SIZE = (128, 128)
ENGINE_WORDS = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
PROBE_BATCH = 8


@dataclass(frozen=True)
class Rung:
    """One plan of the ladder: the short side of the training images, the frozen stages, the cached
    views of every training image and the epochs."""

    short_side: int
    freeze_stages: int
    views: int
    epochs: int


LADDER: tuple[Rung, ...] = (
    Rung(96, 4, 1, 2),
    Rung(112, 4, 2, 3),
    Rung(128, 4, 2, 4),
    Rung(160, 4, 2, 4),
    Rung(160, 4, 2, 6),
    Rung(192, 4, 2, 6),
    Rung(192, 4, 3, 6),
    Rung(192, 4, 3, 8),
    Rung(224, 4, 3, 8),
    Rung(256, 4, 3, 8),
    Rung(256, 4, 3, 10),
    Rung(288, 4, 3, 10),
    Rung(288, 3, 3, 10),
    Rung(320, 3, 3, 12),
    Rung(352, 3, 4, 12),
    Rung(384, 3, 4, 15),
)
"""From the least work to the most; no setting ever does less work than on the rung before (fewer
frozen stages train more of the network). ``Rung(256, 4, 3, 8)`` is the tuned cpu45 classifier."""


@dataclass(frozen=True)
class Speed:
    """Seconds per image and megapixel of each kind of work, measured on this machine."""

    frozen_forward: dict[int, float]
    """By frozen stages: the frozen stem and stages' forward pass (building the cache)."""
    trained_step: dict[int, float]
    """By frozen stages: a training step (forward and backward) of the rest on the cached maps."""
    full_forward: float
    """The whole model's forward pass (the evaluation), on the engine the run evaluates with."""
    cpu: str = ""
    evaluation_engine: str = "torch"
    """``onnx`` where the recipe exports its model and evaluates the export with ONNX Runtime."""


@dataclass(frozen=True)
class DataSize:
    """What a plan needs to know of the data."""

    train_images: int
    test_images: int
    aspect: float = 1.0
    """Median width / height of the training images."""


@dataclass
class Plan:
    """The settings a budget chose and the time predicted for each phase."""

    budget_seconds: float
    rung: Rung
    image_size: tuple[int, int]
    eval_image_sizes: list[tuple[int, int]]
    seconds: dict[str, float]
    """Predicted seconds of ``overhead``, ``cache``, ``training`` and ``evaluation``."""
    fits: bool
    data: DataSize
    speed: Speed
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_seconds(self) -> float:
        return sum(self.seconds.values())

    def overrides(self) -> list[str]:
        """The plan as ``--set`` values."""
        (h, w), r = self.image_size, self.rung
        sizes = ", ".join(f"[{eh}, {ew}]" for eh, ew in self.eval_image_sizes)
        return [
            f"data.image_size=[{h}, {w}]",
            f"data.eval_image_sizes=[{sizes}]",
            f"model.freeze_stages={r.freeze_stages}",
            f"train.frozen_cache_views={r.views}",
            f"train.epochs={r.epochs}",
        ]

    def words(self) -> str:
        """The plan and its predicted time, as printed before training starts."""
        (h, w), r, s = self.image_size, self.rung, self.seconds
        line = (
            f"budget {minutes(self.budget_seconds)} (wall-clock): {self.data.train_images:,} training "
            f"images at {h}x{w}, stem and first {r.freeze_stages} stages frozen, {r.views} cached views, "
            f"{r.epochs} epochs, tested at {', '.join(f'{a}x{b}' for a, b in self.eval_image_sizes)} on "
            f"{self.data.test_images:,} images; predicted {minutes(self.predicted_seconds)} (cache "
            f"{minutes(s['cache'])}, training {minutes(s['training'])}, evaluation {minutes(s['evaluation'])} on "
            f"{ENGINE_WORDS[self.speed.evaluation_engine]}, "
            f"start-up and export {minutes(s['overhead'])})"
        )
        if not self.fits:
            line += (
                "; even the smallest plan is predicted to exceed the budget: training stops when the budget is spent"
            )
        return line

    def as_dict(self) -> dict:
        d = asdict(self)
        d["predicted_seconds"] = round(self.predicted_seconds, 1)
        d["clock"] = "wall"
        return d


def minutes(seconds: float) -> str:
    """``95`` -> ``1.6 min``."""
    return f"{seconds / 60:.1f} min"


def parse_budget(text: str) -> float:
    """Seconds of a budget written ``30m``, ``1h30m``, ``90s``, ``2h`` or ``45`` (minutes)."""
    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t) * 60
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", t)
        if not parts or not any(parts.groups()):
            raise ConfigError(f"--budget {text!r}: write a time such as 30m, 1h30m, 90s or 2h")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds < 60:
        raise ConfigError(f"--budget {text!r}: at least 1 minute (1m)")
    return seconds


def image_size(short_side: int, aspect: float) -> tuple[int, int]:
    """(height, width) with ``short_side`` on the shorter side and the data's aspect (clipped to
    1:2.5 .. 2.5:1), multiples of 8."""
    a = min(max(aspect, 0.4), 2.5)

    def r8(v: float) -> int:
        return max(8, round(v / 8) * 8)

    return (short_side, r8(short_side * a)) if a >= 1 else (r8(short_side / a), short_side)


def scaled_eval_sizes(recipe: ExperimentConfig, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The recipe's evaluation sizes, scaled as they relate to its training size, at ``size``."""
    base_h = recipe.data.image_size[0]
    out = []
    for eh, _ in eval_sizes(recipe.data):
        f = eh / base_h
        out.append((round(size[0] * f / 8) * 8, round(size[1] * f / 8) * 8))
    return list(dict.fromkeys(out))


def predict(
    rung: Rung, data: DataSize, speed: Speed, recipe: ExperimentConfig
) -> tuple[dict[str, float], tuple[int, int], list[tuple[int, int]]]:
    """Predicted seconds per phase of ``rung`` on ``data`` at ``speed``, with its sizes."""
    size = image_size(rung.short_side, data.aspect)
    tested = scaled_eval_sizes(recipe, size)
    mp = size[0] * size[1] / 1e6
    flips = 2 if recipe.eval.tta_flip else 1
    seconds = {
        "overhead": OVERHEAD_SECONDS,
        "cache": data.train_images * rung.views * mp * speed.frozen_forward[rung.freeze_stages],
        "training": rung.epochs * data.train_images * mp * CROP_AREA * speed.trained_step[rung.freeze_stages],
        "evaluation": data.test_images * flips * sum(h * w / 1e6 for h, w in tested) * speed.full_forward,
    }
    return {k: round(v, 1) for k, v in seconds.items()}, size, tested


def plan(budget_seconds: float, data: DataSize, speed: Speed, recipe: ExperimentConfig) -> Plan:
    """The largest rung of :data:`LADDER` predicted to fit :data:`PLANNED_SHARE` of the budget, with
    the epochs the time left allows up to the next rung's (the smallest, marked as not fitting, when
    none fits)."""
    check_plannable(recipe)
    chosen = None
    for i, rung in enumerate(LADDER):
        most = LADDER[i + 1].epochs if i + 1 < len(LADDER) else rung.epochs * 3 // 2
        for epochs in range(rung.epochs, most + 1):  # time left below the next rung: more epochs
            seconds, size, tested = predict(replace(rung, epochs=epochs), data, speed, recipe)
            if sum(seconds.values()) > PLANNED_SHARE * budget_seconds:
                break
            chosen = Plan(budget_seconds, replace(rung, epochs=epochs), size, tested, seconds, True, data, speed)
    if chosen is None:
        seconds, size, tested = predict(LADDER[0], data, speed, recipe)
        chosen = Plan(budget_seconds, LADDER[0], size, tested, seconds, False, data, speed)
    return chosen


def check_plannable(recipe: ExperimentConfig) -> None:
    """A ConfigError unless the recipe trains on the frozen cache (what a plan chooses the settings of)."""
    if not recipe.trains or recipe.train.frozen_cache_views < 1 or recipe.model.freeze_stages < 1:
        raise ConfigError(
            f"--budget plans recipes that train on the frozen cache (train.frozen_cache_views and "
            f"model.freeze_stages, as classify and retrieve do); {recipe.name} does not"
        )


# ---------------------------------------------------------------------- measuring the data and the machine
def data_size(recipe: ExperimentConfig, split: Split, sample: int = 32) -> DataSize:
    """The split's training and test image counts and the median aspect of up to ``sample`` training images."""
    # start-up: loaded only where this runs
    from PIL import Image

    step = max(1, len(split.train) // sample)
    aspects = []
    for r in split.train[::step][:sample]:
        try:
            with Image.open(r.path) as im:
                w, h = im.size
        except OSError:
            continue
        if r.bbox is not None and recipe.data.crop_bbox:
            w, h = r.bbox[2] - r.bbox[0] + 1, r.bbox[3] - r.bbox[1] + 1
        aspects.append(w / max(h, 1))
    return DataSize(
        len(split.train) + len(split.val),
        len(split.test),
        round(statistics.median(aspects), 3) if aspects else 1.0,
    )


def measure_speed(recipe: ExperimentConfig, num_classes: int | None) -> Speed:
    """Time the three kinds of work of ``recipe`` here, on random images at :data:`PROBE_SIZE` and
    random weights, with each of the frozen-stage counts of :data:`LADDER`."""
    # optional: the train extra, loaded only where this runs
    import torch

    # optional: torch (the train extra), imported only when this runs
    from finegrain.inference.encoder import autocast_for
    from finegrain.tasks.phase_precision import time_cached_step

    mp = PROBE_SIZE[0] * PROBE_SIZE[1] / 1e6
    cache_precision = evaluation_precision(recipe.eval.export_onnx)
    frozen, step = {}, {}
    full = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        images = torch.randint(0, 256, (PROBE_BATCH, 3, *PROBE_SIZE), dtype=torch.uint8)
        for f in sorted({r.freeze_stages for r in LADDER}):
            cfg = recipe.model_copy(
                update={
                    "model": recipe.model.model_copy(update={"freeze_stages": f}),
                    "data": recipe.data.model_copy(update={"image_size": PROBE_SIZE}),
                }
            )
            model = build_from_config(cfg, num_classes, weights="none").eval()
            with torch.no_grad(), autocast_for(cache_precision):
                frozen[f] = _seconds_per_image(lambda m=model: m.frozen_prefix(m.normalise_input(images))) / mp
            ips = time_cached_step(model, cfg, batch=PROBE_BATCH, rounds=2)
            step[f] = 1 / max(ips.values()) / mp
        # the evaluation, once: on ONNX Runtime where the run evaluates its export, else in torch
        onnx = _onnx_seconds_per_image(model, cfg, images) if recipe.eval.export_onnx else None
        if onnx is None:
            with torch.no_grad(), autocast_for(cache_precision):
                full = _seconds_per_image(lambda: model(images))
    speed = Speed(
        {k: round(v, 5) for k, v in frozen.items()},
        {k: round(v, 5) for k, v in step.items()},
        round((onnx or full) / mp, 5),
        machine.cpu_model(),
        "onnx" if onnx else "torch",
    )
    log.info("budget probe: %s", speed)
    return speed


def _onnx_seconds_per_image(model, cfg: ExperimentConfig, images) -> float | None:
    """Seconds per image of ``model``'s ONNX export on ONNX Runtime, as the run's evaluation runs it
    (fp32, this process's threads); None where ONNX Runtime or the exporter is missing, or the model
    does not export (the evaluation then runs in torch)."""
    # torch (the train extra): the exporter and the model it exports
    import torch

    # torch and ONNX Runtime (the serve extra), behind these modules
    from finegrain.inference.export import export_onnx
    from finegrain.inference.load import LoadedModel
    from finegrain.inference.onnx_engine import INPUT_NAME, cpu_session, import_onnxruntime

    try:
        import_onnxruntime()
        data = export_onnx(LoadedModel(model, cfg, [], Path("-"), ""), PROBE_SIZE, maps=False)
    except (FinegrainError, ImportError) as e:
        log.info("budget probe: the evaluation is timed in torch (%s)", e)
        return None
    session = cpu_session(data, torch.get_num_threads())
    x = images.numpy()
    return _seconds_per_image(lambda: session.run(None, {INPUT_NAME: x}))


def _seconds_per_image(work, rounds: int = 2) -> float:
    work()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / PROBE_BATCH


def plan_for(recipe: ExperimentConfig, budget_seconds: float) -> Plan:
    """Measure the data and the machine, and plan ``recipe`` within ``budget_seconds``."""
    check_plannable(recipe)  # before measuring anything
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import split_for

    split = split_for(recipe.data)
    num_classes = None if recipe.model.head == "embedding" else len(split.class_names)
    return plan(budget_seconds, data_size(recipe, split), measure_speed(recipe, num_classes), recipe)


RESUMED_RESERVE = 0.15
"""Share of the budget a resumed run (which keeps its stored settings: no new plan) keeps after training."""


def reserved_seconds(budget_seconds: float, p: Plan | None) -> float:
    """Seconds of the budget kept after training: the plan's evaluation and export (half the start-up
    allowance), or :data:`RESUMED_RESERVE` of the budget where there is no plan (``--resume``)."""
    if p is None:
        return RESUMED_RESERVE * budget_seconds
    return p.seconds["evaluation"] + p.seconds["overhead"] / 2


def write_plan(run_path: Path, p: Plan, spent_seconds: float | None = None) -> Path:
    """``RUN/budget.json``: the plan, its prediction and (when known) the wall time spent."""

    out = p.as_dict()
    if spent_seconds is not None:
        out["spent_seconds"] = round(spent_seconds, 1)
    atomic_write_json(run_path / "budget.json", out)
    return run_path / "budget.json"
