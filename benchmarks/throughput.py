"""Benchmark: training and inference images/s, plain fp32 PyTorch against the engine's precision
``auto`` + channels_last.

``auto`` is what this machine runs fastest (``finegrain.machine.auto_precision``): bf16 autocast on
a CPU with native bf16 (AVX-512 BF16 or AMX), fp32 elsewhere; the JSON records which it was. The
descriptions below say bf16 where that is what ``auto`` picks.

    python benchmarks/throughput.py [--quick] [--cases resnet50_224 resnet18_64]
                                    [--batch-size-r50 16] [--batch-size-r18 64]
                                    [--steps N] [--warmup N] [--rounds N] [--out PATH]

Two cases, random weights (``weights=None``) and random data:
ResNet-50 at 224x224 with 196 classes (Stanford Cars) and ResNet-18 at 64x64 with
200 classes (Tiny ImageNet). For each, training steps and inference batches of:

- ``baseline``: the seeds' kind of loop: ``torchvision.models.<arch>(weights=None)``,
  ``model.train()``, Adam(lr 1e-3), cross-entropy, ``loss.backward()``,
  ``opt.step()``, NCHW float32; inference ``model.eval()`` under ``torch.no_grad()``;
- ``ours``: the same architecture built by ``finegrain.models.model.build_model``
  with the engine's settings: the model and inputs in ``channels_last``, forward and
  loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what Lightning's
  ``precision="bf16-mixed"`` does), backward and Adam step outside it; inference
  under ``torch.inference_mode()`` + autocast, as ``finegrain.inference.encoder.Encoder.run_loader``;
- ``engine``: the project's training engine itself: a ``ClassificationTask`` fitted by
  the Lightning ``Trainer`` of ``finegrain.tasks.engine.trainer_for`` (callbacks,
  loggers, checkpoints in a temporary run directory) with ``train.precision:
  bf16-mixed`` and ``train.channels_last: true``: one ``Trainer.fit`` of 1 + N batches
  per round, its first batch discarded; each step is timed from ``on_train_batch_start``
  to ``on_train_batch_end`` (forward, loss, logging, backward, optimiser step; data
  fetching and checkpoint writing excluded). Inference:
  ``finegrain.inference.encoder.Encoder.run_loader(precision="bf16-mixed", channels_last=True)``,
  whose own forward-pass timer is used.

Warm-up steps are excluded. The variants take turns for ``--rounds`` rounds of
``--steps`` steps, the order rotated each round (the machine is shared and noisy);
images/s is the median over rounds (the best round and the fastest single step, which
filter out interference from other processes, are also given), and the ratios
ours/baseline and engine/baseline use figures of this same run. torch uses as many
threads as the machine has cores (``--threads``). Results go to ``--out`` (default
``benchmarks/results/throughput.json``), written after each case.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
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

from common import load_average, log, machine_info, warn_if_busy  # noqa: E402
from finegrain.inference.encoder import autocast_for  # noqa: E402
from finegrain.machine import auto_precision  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

PRECISION = auto_precision()[0]
"""The precision ``ours`` and ``engine`` run in: what ``precision: auto`` picks on this machine."""

RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"

CASES: dict[str, dict[str, Any]] = {
    "resnet50_224": {"arch": "resnet50", "size": 224, "classes": 196},
    "resnet18_64": {"arch": "resnet18", "size": 64, "classes": 200},
}


# ----------------------------------------------------------------------------- steps
def baseline_model(arch: str, classes: int):
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=classes)


def ours_model(arch: str, classes: int):
    import torch

    from finegrain.models.model import build_model

    return build_model(arch, weights="none", num_classes=classes).to(memory_format=torch.channels_last)


def train_step_fn(model, kind: str) -> Callable:
    """One optimisation step on ``(x, y)``: the baseline's fp32 NCHW or ours (bf16 autocast, channels_last)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    if kind == "baseline":

        def step(x, y) -> None:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:

        def step(x, y) -> None:
            opt.zero_grad()
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(PRECISION):
                loss = F.cross_entropy(model.logits(x), y)
            loss.backward()
            opt.step()

    return step


def infer_step_fn(model, kind: str) -> Callable:
    """One inference batch: fp32 NCHW under no_grad, or ours as ``predict`` runs it."""
    import torch

    model.eval()
    if kind == "baseline":

        def step(x, y) -> None:
            with torch.no_grad():
                model(x)
    else:

        def step(x, y) -> None:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_for(PRECISION):
                model(x)

    return step


def timed(step: Callable, x, y, n: int) -> list[float]:
    """Seconds of each of ``n`` calls ``step(x, y)``; ``x`` a batch, or a list of batches taken in turn."""
    xs = x if isinstance(x, list) else [x]
    out = []
    for i in range(n):
        batch = xs[i % len(xs)]
        t0 = time.perf_counter()
        step(batch, y)
        out.append(time.perf_counter() - t0)
    return out


Runner = Callable[[int], list[float]]
"""Runs ``n`` timed steps of one variant and returns the seconds of each."""


def alternate(
    runners: dict[str, Runner], warmup: int, n: int, rounds: int, batch: int, label: str
) -> dict[str, list[list[float]]]:
    """Warm each variant up, then ``rounds`` rounds of ``n`` timed steps of each, rotating the order."""
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(warmup)
        log(f"  {label} {name}: warm-up {warmup} step(s) {time.perf_counter() - t0:.1f} s")
    per_round: dict[str, list[list[float]]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            secs = runners[name](n)
            per_round[name].append(secs)
            log(f"  {label} {name}: round {r + 1}: {batch * len(secs) / sum(secs):.2f} images/s")
    return per_round


def summarise(per_round: list[list[float]], batch: int) -> dict[str, Any]:
    ips = [batch * len(s) / sum(s) for s in per_round]
    return {
        "images_per_second_median": round(statistics.median(ips), 2),
        "images_per_second_best_round": round(max(ips), 2),
        "images_per_second_best_step": round(batch / min(min(s) for s in per_round), 2),
        "images_per_second_rounds": [round(v, 2) for v in ips],
        "step_seconds": [[round(v, 4) for v in s] for s in per_round],
    }


# ----------------------------------------------------------------------------- engine
class EngineTrainer:
    """The project's engine: a ClassificationTask fitted by ``trainer_for``'s Trainer (bf16-mixed, channels_last).

    Each call is one ``Trainer.fit`` of ``1 + n`` batches in a fresh temporary run directory
    (the same task, so the model stays warm); the first batch of each fit, which also
    creates the optimiser state, is discarded.
    """

    def __init__(self, arch: str, classes: int, x, y, tmp: Path) -> None:
        from finegrain.config import build_config
        from finegrain.tasks.engine import make_task

        self.cfg = build_config(
            {
                "name": f"bench-{arch}",
                "task": "classification",
                "model": {"backbone": arch, "weights": "none", "head": "classifier"},
                "optim": {"name": "adam", "lr": 1e-3},
                "train": {
                    "epochs": 1,
                    "precision": "auto",
                    "channels_last": True,
                    "accelerator": "cpu",
                    "log_every_n_steps": 1,
                },
            }
        )
        self.task = make_task(self.cfg, [f"class_{i}" for i in range(classes)], list(range(classes)))
        self.x, self.y, self.tmp, self.calls = x, y, tmp, 0

    def __call__(self, n: int) -> list[float]:
        import torch
        from lightning.pytorch.callbacks import Callback
        from torch.utils.data import DataLoader, TensorDataset

        from finegrain.runs import create_run
        from finegrain.tasks.engine import trainer_for

        class StepTimer(Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._t0 = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.seconds.append(time.perf_counter() - self._t0)

        total = 1 + n
        self.cfg.train.limit_train_batches = total
        b = len(self.x)
        data = TensorDataset(self.x.repeat(total, 1, 1, 1), self.y.repeat(total), torch.arange(b * total))
        loader = DataLoader(data, batch_size=b, shuffle=False, num_workers=0)
        self.calls += 1
        run = create_run(self.cfg, self.tmp / f"fit{self.calls}")
        trainer = trainer_for(self.cfg, run, self.task.monitor, self.task.monitor_mode, has_val=False)
        timer = StepTimer()
        trainer.callbacks.append(timer)
        matmul = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # as engine.fit sets it
        try:
            trainer.fit(self.task, train_dataloaders=loader)
        finally:
            torch.set_float32_matmul_precision(matmul)
            shutil.rmtree(run.path, ignore_errors=True)
        if len(timer.seconds) != total:
            raise RuntimeError(f"the engine ran {len(timer.seconds)} batches, expected {total}")
        return timer.seconds[1:]


def engine_inference(arch: str, classes: int, x, y) -> Runner:
    """``finegrain.inference.encoder.Encoder.run_loader(precision="bf16-mixed", channels_last=True)`` over n batches.

    ``predict`` times its forward passes as a whole: each step is reported as their mean.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from finegrain.config import ExperimentConfig
    from finegrain.inference.encoder import Encoder
    from finegrain.models.model import build_model

    model = build_model(arch, weights="none", num_classes=classes).eval()
    cfg = ExperimentConfig.model_validate({"train": {"channels_last": True}})
    b = len(x)

    def run(n: int) -> list[float]:
        loader = DataLoader(TensorDataset(x.repeat(n, 1, 1, 1), y.repeat(n), torch.arange(b * n)), batch_size=b)
        seconds = Encoder.of_model(model, cfg, precision=PRECISION).run_loader(loader).seconds
        return [seconds / n] * n

    return run


# ----------------------------------------------------------------------------- driver
ENGINE_HOW = {
    "train": "ClassificationTask fitted by finegrain.tasks.engine.trainer_for's Trainer "
    "(precision auto, channels_last), "
    "one fit of 1 + n batches per round, first batch discarded; on_train_batch_start..on_train_batch_end",
    "inference": "finegrain.inference.encoder.Encoder.run_loader(precision=auto's choice, channels_last=True), its own "
    "forward-pass timer; step_seconds are the mean per batch",
}


def bench_case(
    name: str, spec: dict[str, Any], batch: int, warmup: int, n: int, rounds: int, engine: bool
) -> dict[str, Any]:
    import torch

    arch, size, classes = spec["arch"], spec["size"], spec["classes"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    out: dict[str, Any] = {
        "arch": arch,
        "input": [batch, 3, size, size],
        "classes": classes,
        "batch_size": batch,
        "warmup_steps": warmup,
        "timed_steps_per_round": n,
        "rounds": rounds,
    }

    for phase in ("train", "inference"):
        torch.manual_seed(0)
        models = {"baseline": baseline_model(arch, classes), "ours": ours_model(arch, classes)}
        make = train_step_fn if phase == "train" else infer_step_fn
        runners: dict[str, Runner] = {}
        for k, m in models.items():
            step = make(m, k)
            runners[k] = lambda n_, step=step: timed(step, x, y, n_)
        tmp = Path(tempfile.mkdtemp(prefix="finegrain-bench-run-"))
        try:
            if engine:
                runners["engine"] = (
                    EngineTrainer(arch, classes, x, y, tmp)
                    if phase == "train"
                    else engine_inference(arch, classes, x, y)
                )
            per_round = alternate(runners, warmup, n, rounds, batch, f"{name} {phase}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        res: dict[str, Any] = {k: summarise(v, batch) for k, v in per_round.items()}
        if engine:
            res["engine"]["how"] = ENGINE_HOW[phase]
        del runners, models
        gc.collect()
        for metric, key in (
            ("images_per_second_median", ""),
            ("images_per_second_best_round", "_best_round"),
            ("images_per_second_best_step", "_best_step"),
        ):
            base = res["baseline"][metric]
            for k in ("ours", "engine"):
                if k in res:
                    res[f"ratio_{k}_over_baseline{key}"] = round(res[k][metric] / base, 2)
        log(
            f"{name} {phase}: "
            + ", ".join(f"{k} {res[k]['images_per_second_median']:.2f}" for k in variant_names(res))
            + f" images/s (median); ours/baseline {res['ratio_ours_over_baseline']}x"
            + (f", engine/baseline {res['ratio_engine_over_baseline']}x" if engine else "")
        )
        out[phase] = res
    out["load_average_after"] = load_average()
    return out


def variant_names(res: dict[str, Any]) -> list[str]:
    """The variants measured in one phase's results, in a fixed order."""
    return [k for k in ("baseline", "ours", "engine") if k in res]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer steps, one round (< 2 minutes)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch-size-r50", type=int, default=None, help="ResNet-50 batch (default 16, quick 8)")
    ap.add_argument("--batch-size-r18", type=int, default=None, help="ResNet-18 batch (default 64, quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 2, quick 2)")
    ap.add_argument(
        "--steps-r18", type=int, default=None, help="timed steps per round for ResNet-18 (default 10, quick 5)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2, quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4, quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    ap.add_argument("--no-engine", action="store_true", help="skip the Lightning engine measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    batch = {
        "resnet50_224": args.batch_size_r50 or (8 if q else 16),
        "resnet18_64": args.batch_size_r18 or (32 if q else 64),
    }
    steps = {"resnet50_224": args.steps or 2, "resnet18_64": args.steps_r18 or (5 if q else 10)}
    warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    rounds = args.rounds or (1 if q else 4)

    os.environ.setdefault("FINEGRAIN_PROGRESS", "0")  # no progress bar from the engine's Trainer
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if q else "full",
        "machine": machine_info(),
        "ours_precision": PRECISION,
        "busy_warning_at_start": warn_if_busy(),
        "settings": {
            "torch_threads": torch.get_num_threads(),
            "warmup_steps": warmup,
            "rounds": rounds,
            "timed_steps_per_round": steps,
            "batch_size": batch,
            "engine": not args.no_engine,
            "data": "random N(0,1) images and uniform labels, fixed seed",
            "optimiser": "Adam(lr=1e-3)",
            "loss": "cross-entropy",
        },
        "notes": "wall-clock on a shared 2-core machine; other processes may have been running "
        "(see load averages). The variants take turns within each round (order rotated); images/s is the "
        "median over rounds, with the best round and the fastest step also given (on a busy machine "
        "these are the more faithful figures: OpenMP threads stall when other processes hold the cores).",
        "cases": {},
    }
    for name in args.cases:
        log(f"{name}: batch {batch[name]}, warm-up {warmup}, {rounds} round(s) of {steps[name]} step(s)")
        result["cases"][name] = bench_case(
            name, CASES[name], batch[name], warmup, steps[name], rounds, engine=not args.no_engine
        )
        atomic_write_json(args.out, result)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = load_average()
    result["summary"] = {
        name: {
            phase: {f"{k}_images_per_second": c[phase][k]["images_per_second_median"] for k in variant_names(c[phase])}
            | {k.removeprefix("ratio_"): v for k, v in c[phase].items() if k.startswith("ratio_")}
            for phase in ("train", "inference")
        }
        for name, c in result["cases"].items()
    }
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    for name, s in result["summary"].items():
        log(f"{name}: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
