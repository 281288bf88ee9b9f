"""Benchmark: training images/s with and without the frozen-stage cache (``train.frozen_cache_views``).

    python benchmarks/frozen_cache.py [--quick] [--image-size 192x256] [--batch-size 32] [--views 3]
                                      [--cache-images 256] [--steps N] [--warmup N] [--rounds N] [--freeze-stages 3]
                                      [--threads 1] [--out PATH]

The settings of an earlier ``cars-lite0 --profile cpu45``: EfficientNet-Lite0 (random weights, 196 classes,
dropout 0.2), 192x256 images, stem and first three stages frozen (``--freeze-stages``; the profile now
trains at 256x341 with four: ``--image-size 256x341 --freeze-stages 4``),
batch 32, model and inputs channels-last, the precision ``auto`` picks on this machine
(``finegrain.machine.auto_precision``), AdamW and cross-entropy with label smoothing 0.1, on one
torch thread by default (the recipe's budget is one core). Two variants, each its own model (seed 0):

- ``without_cache``: today's training step on a uint8 image batch ``[B, 3, H, W]`` (random pixels,
  channels-last, in memory as a loader hands it over): ``model.logits(normalised images)``, the
  frozen stages included in the forward pass;
- ``with_cache``: the step on a batch of the cache's loader (``finegrain.data.frozen_features``):
  one cached view per image, its feature map cropped to 75-100%: ``model.logits(features, frozen=True)``.

Both steps are timed alone (the batch is at hand; image decoding is in neither), the variants taking
turns for ``--rounds`` rounds of ``--steps`` steps, order rotated each round; images/s is the median over
rounds. The cache loader's own time per batch (gather and crop) is measured apart and also folded into
a second ratio. The cache build is measured once, before: ``build_frozen_views`` over ``--cache-images``
images of the built-in synthetic dataset (decoded and resized to the image size, as in training without
a prepared cache; written to a temporary folder) for ``--views`` views, with the prefix run as
``FinegrainTask.cache_frozen_outputs`` runs it (eval, ``torch.inference_mode``, the precision, channels-last):
images/s per view is images x views / seconds. Results go to ``--out`` (default
``benchmarks/results/frozen_cache.json``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, pin_threads, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402
from throughput import alternate, summarise, timed  # noqa: E402  (the same rotation and summary)

RESULTS = ROOT / "benchmarks" / "results" / "frozen_cache.json"
CLASSES = 196


def make_config(size: tuple[int, int], batch: int, views: int, cache_images: int, freeze_stages: int = 3):
    """The cpu45 profile's training settings, on the synthetic dataset (``cache_images`` training images)."""
    from finegrain.config import build_config

    per_class = max(2, cache_images // 8)
    return build_config(
        {
            "name": "bench-frozen-cache",
            "task": "classification",
            "data": {
                "root": "synthetic",
                "image_size": list(size),
                "augment": "light",
                "batch_size": batch,
                "num_workers": 0,
                "val_fraction": 0.0,
                "cache": "off",
                "synthetic": {
                    "num_classes": 8,
                    "train_per_class": per_class,
                    "test_per_class": 1,
                    "image_size": [96, 128],
                },
            },
            "model": {
                "backbone": "efficientnet_lite0",
                "weights": "none",
                "dropout": 0.2,
                "freeze_stages": freeze_stages,
            },
            "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
            "loss": {"label_smoothing": 0.1},
            "train": {"precision": "auto", "channels_last": True, "frozen_cache_views": views, "accelerator": "cpu"},
        }
    )


def make_model(cfg):
    import torch

    from finegrain.models.build import build_from_config

    torch.manual_seed(0)
    model = build_from_config(cfg, CLASSES).to(memory_format=torch.channels_last)
    return model.train()


def train_step(cfg, precision: str, frozen: bool) -> Callable:
    """A fresh model and one optimisation step on ``(x, y)``, as ``ClassificationTask.training_step`` runs it."""
    import torch
    import torch.nn.functional as F

    from finegrain.inference.encoder import autocast_for

    model = make_model(cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )

    def step(x, y) -> None:
        opt.zero_grad(set_to_none=True)
        x = (x.float() if frozen else model.normalise_input(x)).contiguous(memory_format=torch.channels_last)
        with autocast_for(precision):
            loss = F.cross_entropy(model.logits(x, frozen), y, label_smoothing=cfg.loss.label_smoothing)
        loss.backward()
        opt.step()

    return step


def build_cache(cfg, precision: str) -> tuple[Any, dict[str, Any]]:
    """The frozen views of the synthetic training images, and what building them took."""
    import torch

    from finegrain.data.frozen_features import build_frozen_views
    from finegrain.data.module import FinegrainDataModule
    from finegrain.inference.encoder import autocast_for

    dm = FinegrainDataModule(cfg)
    model = make_model(cfg).eval()

    def prefix(x):
        with torch.inference_mode(), autocast_for(precision):
            return model.frozen_prefix(model.normalise_input(x).contiguous(memory_format=torch.channels_last))

    views = cfg.train.frozen_cache_views
    t0 = time.perf_counter()
    frozen = build_frozen_views(dm.train_records, cfg.data, prefix, views, cfg.train.seed)
    seconds = time.perf_counter() - t0
    n = len(frozen)
    return frozen, {
        "images": n,
        "views": views,
        "seconds": round(seconds, 2),
        "images_per_second_per_view": round(n * views / seconds, 2),
        "feature_map": list(frozen.features.shape[2:]),
        "dtype": "float16",
        "bytes": int(frozen.features.nbytes),
        "what": "decode + resize (no prepared cache) + augment + frozen prefix, every view",
    }


def cached_batches(frozen, batch: int, seed: int, count: int) -> tuple[list, float]:
    """``count`` batches of the cache's training loader (cycling epochs), and its seconds per batch."""
    import torch
    from torch.utils.data import RandomSampler

    from finegrain.data.frozen_features import frozen_loader

    sampler = RandomSampler(range(len(frozen)), generator=torch.Generator().manual_seed(seed))
    loader = frozen_loader(frozen, sampler, batch, seed)
    out, seconds, epoch = [], 0.0, 0
    while len(out) < count:
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        while len(out) < count:
            t0 = time.perf_counter()
            b = next(it, None)
            seconds += time.perf_counter() - t0
            if b is None:
                break
            if len(b[0]) == batch:
                out.append(b)
        epoch += 1
    return out, seconds / max(1, len(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96x128, batch 8, 32 images, one round of one step")
    ap.add_argument("--image-size", default=None, help="HxW (default 192x256; quick 96x128)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (quick 8)")
    ap.add_argument(
        "--freeze-stages",
        type=int,
        default=3,
        help="stages frozen and cached (default 3; cars-lite0 -p cpu45 freezes 4)",
    )
    ap.add_argument("--views", type=int, default=3, help="cached views per image (default 3)")
    ap.add_argument(
        "--cache-images", type=int, default=None, help="images the cache build runs over (default 256; quick 32)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 4; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the recipe's one core)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    h, w = (int(v) for v in (args.image_size or ("96x128" if q else "192x256")).split("x"))
    batch = args.batch_size or (8 if q else 32)
    images = args.cache_images or (32 if q else 256)
    steps = args.steps or (1 if q else 4)
    warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    rounds = args.rounds or (1 if q else 4)

    if argv is None:  # run as a script (a caller in-process keeps its own threads)
        pin_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*In CPU autocast.*")
    os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="finegrain-bench-frozen-"))
    os.environ["FINEGRAIN_CACHE"] = str(tmp)  # the synthetic images, thrown away at the end
    import torch

    from finegrain import machine

    torch.set_num_threads(args.threads)
    precision = machine.resolve_precision("auto")
    busy = warn_if_busy()
    cfg = make_config((h, w), batch, args.views, images, args.freeze_stages)
    result: dict[str, Any] = {
        "benchmark": "frozen_cache",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if q else "full",
        "machine": machine_info(),
        "machine_busy": busy is not None,
        "busy_warning_at_start": busy,
        "settings": {
            "backbone": "efficientnet_lite0",
            "weights": "none (random, seed 0)",
            "classes": CLASSES,
            "image_size": [h, w],
            "batch_size": batch,
            "freeze_stages": args.freeze_stages,
            "channels_last": True,
            "precision": precision,
            "torch_threads": torch.get_num_threads(),
            "views": args.views,
            "warmup_steps": warmup,
            "rounds": rounds,
            "timed_steps_per_round": steps,
            "optimiser": "AdamW(lr 0.002, wd 0.01) over the trainable parameters",
            "loss": "cross-entropy, label smoothing 0.1",
        },
        "notes": "wall-clock on a shared machine; see machine_busy and the load averages. Steps are timed alone "
        "(no image decoding in either variant); the cache loader's gather-and-crop time per batch is "
        "given apart and folded into ratio_with_cache_and_its_loader_over_without.",
    }
    try:
        log(f"cache build: {images} synthetic images x {args.views} views at {h}x{w}, precision {precision}")
        frozen, result["cache_build"] = build_cache(cfg, precision)
        log(
            f"cache build: {result['cache_build']['images_per_second_per_view']} images/s per view, "
            f"feature map {result['cache_build']['feature_map']}"
        )
        atomic_write_json(args.out, result)

        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)
        x = x.contiguous(memory_format=torch.channels_last)  # as the loaders give it
        y = torch.randint(0, CLASSES, (batch,), generator=g)
        feats, loader_seconds = cached_batches(frozen, batch, 0, max(1, warmup + steps))
        plain, cached = train_step(cfg, precision, False), train_step(cfg, precision, True)

        maps = [f for f, _, _ in feats]
        runners = {"without_cache": lambda n: timed(plain, x, y, n), "with_cache": lambda n: timed(cached, maps, y, n)}
        per_round = alternate(runners, warmup, steps, rounds, batch, "train")
        train = {v: summarise(r, batch) for v, r in per_round.items()}
        without = train["without_cache"]["images_per_second_median"]
        with_cache = train["with_cache"]["images_per_second_median"]
        train["cache_loader_seconds_per_batch"] = round(loader_seconds, 5)
        train["ratio_with_cache_over_without"] = round(with_cache / without, 3)
        train["ratio_with_cache_and_its_loader_over_without"] = round(
            (batch / (batch / with_cache + loader_seconds)) / without, 3
        )
        result["train"] = train
        log(
            f"train: without cache {without:.2f} images/s, with cache {with_cache:.2f} images/s "
            f"(x{train['ratio_with_cache_over_without']}; with its loader x"
            f"{train['ratio_with_cache_and_its_loader_over_without']})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = load_average()
    result["machine_busy"] = result["machine_busy"] or warn_if_busy() is not None
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
