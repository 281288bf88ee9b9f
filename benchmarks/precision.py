"""Benchmark: fp32 against bf16 autocast, channels-last and not, training and inference (issue 18).

    python benchmarks/precision.py [--quick] [--cases lite0_train lite0_inference resnet50_train resnet50_inference]
                                   [--r50-train-size 64x64|96x128] [--steps N] [--warmup N] [--rounds N]
                                   [--threads N] [--out PATH]

Which precision is fastest on THIS machine, and did ``precision: auto`` pick it? Four cases, random
weights (``finegrain.models.model.build_model(name, weights="none", num_classes=196)``) and random
uint8 batches that the model converts and normalises itself, as the loaders hand them over:

- ``lite0_train``: EfficientNet-Lite0, training steps, batch 32 at 96x128 (the quick profile's size);
- ``lite0_inference``: EfficientNet-Lite0, inference, batch 32 at 224x224;
- ``resnet50_train``: ResNet-50, training steps, batch 32 at 64x64 (``--r50-train-size 96x128``: larger);
- ``resnet50_inference``: ResNet-50, inference, batch 32 at 224x224.

Each case runs four variants in one process: ``fp32`` and ``bf16`` (``torch.autocast("cpu",
dtype=torch.bfloat16)`` around forward and loss, as Lightning's ``precision="bf16-mixed"``; backward
and the AdamW step outside it), each with NCHW tensors and with the model and batch in
``channels_last`` (``_cl``). Inference is ``torch.inference_mode()`` (+ autocast for bf16), as
``finegrain.inference.encoder.Encoder`` runs it. Warm-up steps are excluded; then ``--rounds`` rounds
of ``--steps`` timed steps per variant, the variants taking turns and the order rotated each round
(the machine is shared and noisy); images/s is the median over rounds. The ratios (bf16/fp32 per
layout, channels-last/NCHW per precision) are of figures of this same run.

The JSON (default ``benchmarks/results/precision.json``, written after each case) also says which
precision ``auto`` chooses here (``finegrain.machine.auto_precision``) and, per case, whether that
precision's faster layout is the fastest variant measured or within 10% of it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402
from throughput import alternate, summarise, timed  # noqa: E402  (the same rotation and summary)

RESULTS = ROOT / "benchmarks" / "results" / "precision.json"
CLASSES = 196
WITHIN = 0.10  # auto is "as good as the fastest" when its best variant is within 10% of the fastest

CASES: dict[str, dict[str, Any]] = {
    "lite0_train": {"arch": "efficientnet_lite0", "phase": "train", "size": (96, 128), "batch": 32},
    "lite0_inference": {"arch": "efficientnet_lite0", "phase": "inference", "size": (224, 224), "batch": 32},
    "resnet50_train": {"arch": "resnet50", "phase": "train", "size": (64, 64), "batch": 32},
    "resnet50_inference": {"arch": "resnet50", "phase": "inference", "size": (224, 224), "batch": 32},
}
# variant name -> (precision as the config spells it, channels_last)
VARIANTS: dict[str, tuple[str, bool]] = {
    "fp32": ("32", False),
    "fp32_cl": ("32", True),
    "bf16": ("bf16-mixed", False),
    "bf16_cl": ("bf16-mixed", True),
}


def make_step(arch: str, phase: str, precision: str, channels_last: bool) -> Callable:
    """A fresh model (seed 0) and one training step or inference batch on ``(x, y)`` in this variant."""
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from finegrain.models.model import build_model

    torch.manual_seed(0)
    model = build_model(arch, weights="none", num_classes=CLASSES)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)

    def cast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()

    if phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

        def step(x, y) -> None:
            opt.zero_grad(set_to_none=True)
            with cast():
                loss = F.cross_entropy(model.logits(x.contiguous(memory_format=fmt)), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step(x, y) -> None:
            with torch.inference_mode(), cast():
                model(x.contiguous(memory_format=fmt))

    return step


def verdict(res: dict[str, Any], auto: str, metric: str = "images_per_second_median") -> dict[str, Any]:
    """Which variant was fastest, the best variant of ``auto``'s precision, and whether it is within 10%."""
    ips = {k: res[k][metric] for k in VARIANTS if k in res}
    fastest = max(ips, key=ips.get)
    of_auto = [k for k in ips if VARIANTS[k][0] == auto]
    if not of_auto:  # e.g. auto chose 16-mixed (a GPU): not measured here
        return {"fastest_variant": fastest, "auto_precision": auto, "auto_measured": False}
    best_auto = max(of_auto, key=ips.get)
    share = ips[best_auto] / ips[fastest]
    return {
        "fastest_variant": fastest,
        "fastest_images_per_second": ips[fastest],
        "auto_precision": auto,
        "auto_best_variant": best_auto,
        "auto_best_images_per_second": ips[best_auto],
        "auto_over_fastest": round(share, 3),
        "auto_is_fastest": best_auto == fastest,
        "auto_within_10pct_of_fastest": share >= 1 - WITHIN,
    }


def bench_case(name: str, spec: dict[str, Any], warmup: int, steps: int, rounds: int, auto: str) -> dict[str, Any]:
    import torch

    arch, phase, (h, w), batch = spec["arch"], spec["phase"], spec["size"], spec["batch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    runners = {}
    for v, (precision, cl) in VARIANTS.items():
        step = make_step(arch, phase, precision, cl)
        runners[v] = lambda n_, step=step: timed(step, x, y, n_)
    per_round = alternate(runners, warmup, steps, rounds, batch, name)
    del runners
    gc.collect()
    res: dict[str, Any] = {
        "arch": arch,
        "phase": phase,
        "input": [batch, 3, h, w],
        "input_dtype": "uint8",
        "batch_size": batch,
        "warmup_steps": warmup,
        "timed_steps_per_round": steps,
        "rounds": rounds,
    }
    res.update({v: summarise(r, batch) for v, r in per_round.items()})
    ips = {v: res[v]["images_per_second_median"] for v in VARIANTS}
    res["ratio_bf16_over_fp32"] = {
        "nchw": round(ips["bf16"] / ips["fp32"], 3),
        "channels_last": round(ips["bf16_cl"] / ips["fp32_cl"], 3),
        "best_of_each": round(max(ips["bf16"], ips["bf16_cl"]) / max(ips["fp32"], ips["fp32_cl"]), 3),
    }
    res["ratio_channels_last_over_nchw"] = {
        "fp32": round(ips["fp32_cl"] / ips["fp32"], 3),
        "bf16": round(ips["bf16_cl"] / ips["bf16"], 3),
    }
    res["verdict"] = verdict(res, auto)
    # on a busy machine the best round filters out interference (another process holding a core)
    res["verdict_best_round"] = verdict(res, auto, "images_per_second_best_round")
    res["load_average_after"] = load_average()
    log(
        f"{name}: " + ", ".join(f"{v} {ips[v]:.2f}" for v in VARIANTS) + " images/s (median); bf16/fp32 "
        f"{res['ratio_bf16_over_fp32']['nchw']}x NCHW, {res['ratio_bf16_over_fp32']['channels_last']}x channels-last; "
        f"fastest {res['verdict']['fastest_variant']}"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one warm-up step, two rounds of one timed step per variant (24 minutes on a busy "
        "2-core CPU without native bf16: the bf16 steps are most of it)",
    )
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--r50-train-size", choices=("64x64", "96x128"), default="64x64")
    ap.add_argument("--batch-size", type=int, default=None, help="every case's batch (default 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    steps = args.steps or (1 if q else 3)
    warmup = args.warmup if args.warmup is not None else 1
    rounds = args.rounds or (2 if q else 3)
    cases = {k: dict(CASES[k]) for k in args.cases}
    if "resnet50_train" in cases:
        cases["resnet50_train"]["size"] = tuple(int(v) for v in args.r50_train_size.split("x"))
    if args.batch_size:
        for c in cases.values():
            c["batch"] = args.batch_size

    warnings.filterwarnings("ignore", message=r".*In CPU autocast.*")
    import torch

    from finegrain import machine

    torch.set_num_threads(args.threads)
    auto, why = machine.auto_precision()
    busy = warn_if_busy()
    result: dict[str, Any] = {
        "benchmark": "precision",
        "issue": 18,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if q else "full",
        "machine": machine_info(),
        "machine_busy": busy is not None,
        "busy_warning_at_start": busy,
        "auto_precision": auto,
        "auto_precision_reason": why,
        "settings": {
            "torch_threads": torch.get_num_threads(),
            "warmup_steps": warmup,
            "rounds": rounds,
            "timed_steps_per_round": steps,
            "weights": "none (random, seed 0)",
            "classes": CLASSES,
            "data": "random uint8 images [B, 3, H, W] (the model converts and normalises them) and "
            "uniform labels, fixed seed",
            "train_step": "AdamW(lr 1e-3, wd 0.01), cross-entropy on model.logits; bf16: forward and "
            "loss under torch.autocast('cpu', bfloat16), backward and step outside",
            "inference_step": "model(x) under torch.inference_mode() (+ autocast for bf16)",
            "variants": {k: {"precision": p, "channels_last": cl} for k, (p, cl) in VARIANTS.items()},
        },
        "notes": "wall-clock on a shared 2-core machine; see machine_busy and the load averages. The four variants "
        "take turns within each round (order rotated); images/s is the median over rounds (best round and "
        "fastest step also given). Read the ratios, not the absolute figures.",
        "cases": {},
    }
    for name, spec in cases.items():
        log(
            f"{name}: {spec['arch']} {spec['phase']}, batch {spec['batch']} at {spec['size'][0]}x{spec['size'][1]}, "
            f"warm-up {warmup}, {rounds} round(s) of {steps} step(s)"
        )
        result["cases"][name] = bench_case(name, spec, warmup, steps, rounds, auto)
        atomic_write_json(args.out, result)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = load_average()
    result["machine_busy"] = result["machine_busy"] or warn_if_busy() is not None
    result["summary"] = {
        name: {
            **{f"{v}_images_per_second": c[v]["images_per_second_median"] for v in VARIANTS},
            "bf16_over_fp32": c["ratio_bf16_over_fp32"],
            "fastest": c["verdict"]["fastest_variant"],
            "auto_within_10pct_of_fastest": c["verdict"].get("auto_within_10pct_of_fastest"),
            "auto_within_10pct_of_fastest_best_round": c["verdict_best_round"].get("auto_within_10pct_of_fastest"),
        }
        for name, c in result["cases"].items()
    }
    good = [c["verdict"].get("auto_within_10pct_of_fastest") for c in result["cases"].values()]
    result["auto_is_right_here"] = all(bool(g) for g in good)
    result["auto_is_right_here_best_round"] = all(
        bool(c["verdict_best_round"].get("auto_within_10pct_of_fastest")) for c in result["cases"].values()
    )
    result["conclusion"] = (
        f"auto chose precision {auto} here ({why}); its best variant was "
        + (
            "the fastest or within 10% of it in every case"
            if result["auto_is_right_here"]
            else "NOT within 10% of the fastest in: "
            + ", ".join(n for n, g in zip(result["cases"], good, strict=True) if not g)
        )
        + f" by the median round; by the best round: {'yes' if result['auto_is_right_here_best_round'] else 'no'}"
        + (" (measured on a busy machine)" if result["machine_busy"] else "")
    )
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    for name, s in result["summary"].items():
        log(f"{name}: {s}")
    log(result["conclusion"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
