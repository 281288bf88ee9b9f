"""Benchmark: ResNet-18 from scratch against CUBS-ResNet-1/2/3 and the seed's custom CNN on Tiny ImageNet,
at an equal CPU budget.

    python benchmarks/tiny_imagenet.py [--budget 10] [--parallel 2] [--threads N] [--only NAME ...]
                                       [--runs DIR] [--out PATH]

The data is ``../shared/data/tiny-imagenet-200`` (200 classes, 100 training images per
class, the full 10,000-image validation set used as test), at 64x64. Every model is
trained with the seed's recipe as its shipped config states it (``tin-cnn``,
``tin-resnet18``, ``tin-cubs-1/2/3``: Adam 1e-3, the seed augmentations, batch 128)
and the ``quick`` profile's data and precision (bf16-mixed, channels-last), so only the
architecture differs.

Equal budget: each model gets ``--budget`` CPU-minutes (``--parallel`` models run at once,
each with ``--threads`` threads, default ``cores // parallel``; with one thread the data
loads in-process, so a model uses one core).
Its training speed is first measured in this process (a few bf16 steps on random
64x64 batches, CPU seconds), and it gets the whole epochs that fit 85% of the budget
(the rest is left for loading, validation and the test pass), at least one. The run
goes through ``finegrain train <config> --profile quick --set train.epochs=E``; its
CPU time is the ``rusage`` of that process, so the budget actually used is reported.

Cost of each model: parameters, FLOPs of one 64x64 forward pass
(``torch.utils.flop_counter``; a multiply-add counts as 2), and training and inference
images per CPU-second. Results go to ``--out`` (default
``benchmarks/results/tiny_imagenet.json``), merged with the models already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log, machine_info, run_timed, usable_cores, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tiny_imagenet.json"
TIN = ROOT.parent / "shared" / "data" / "tiny-imagenet-200"
MODELS = ("tin-cnn", "tin-resnet18", "tin-cubs-1", "tin-cubs-2", "tin-cubs-3")
BUDGET_SHARE_FOR_TRAINING = 0.85


def cost(config: str, threads: int, steps: int = 4, batch: int = 128) -> dict[str, Any]:
    """Parameters, forward FLOPs at 64x64 and training/inference images per CPU-second of a config's model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finegrain.config import load_config
    from finegrain.models.build import build_from_config

    torch.set_num_threads(threads)
    cfg = load_config(config, profile="quick", overrides=[f"data.root={TIN}"])
    model = build_from_config(cfg, 200).to(memory_format=torch.channels_last)
    h, w = cfg.data.image_size
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.logits(torch.randn(1, 3, h, w))
    flops = counter.get_total_flops()
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (batch,))
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def train_step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            model.logits(x)

    speeds = {}
    for name, step, mode in (("train", train_step, True), ("inference", infer_step, False)):
        model.train(mode)
        step()  # warm-up
        t0 = time.process_time()
        for _ in range(steps):
            step()
        speeds[name] = steps * batch / (time.process_time() - t0)
    return {
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "forward_gflops": round(flops / 1e9, 4),
        "train_images_per_cpu_second": round(speeds["train"], 1),
        "inference_images_per_cpu_second": round(speeds["inference"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=10.0, help="CPU-minutes per model")
    ap.add_argument("--parallel", type=int, default=2, help="models trained at once (each gets cores/N threads)")
    ap.add_argument("--threads", type=int, default=None, help="threads per model (default: cores / parallel)")
    ap.add_argument("--only", nargs="+", choices=MODELS)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-tin")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not TIN.is_dir():
        log(f"skipped: {TIN} is absent")
        return 0
    from finegrain.config import load_config
    from finegrain.data.module import split_for

    os.environ["PYTHONPATH"] = str(ROOT / "src")  # the children run this checkout's finegrain
    busy = warn_if_busy()
    threads = args.threads or max(1, usable_cores() // args.parallel)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update(
        {
            "benchmark": "tiny_imagenet",
            "data": f"{TIN}: 200 classes, 100 training images each (5% carved out for validation), "
            "the 10,000 validation images as test, 64x64",
            "recipe": "each shipped config's (the seed's: Adam 1e-3, seed augmentations, batch 128) with the quick "
            "profile's data, bf16-mixed and channels-last; only the epochs differ, set by the budget",
            "budget_cpu_minutes": args.budget,
            "budget_rule": f"whole epochs that fit {BUDGET_SHARE_FOR_TRAINING:.0%} of the budget "
            f"at the model's measured "
            "training speed (images per CPU-second), at least one",
            "cpu_time": "user + system seconds of the training process and the processes it waited for (os.wait4)",
            "machine": machine_info({"busy_warning": busy, "parallel": args.parallel}),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    result.setdefault("models", {})
    models = [m for m in MODELS if not args.only or m in args.only]
    n_train = len(split_for(load_config(MODELS[0], profile="quick", overrides=[f"data.root={TIN}"]).data).train)
    jobs = []
    for name in models:
        c = cost(name, threads)
        epochs = max(1, int(args.budget * 60 * BUDGET_SHARE_FOR_TRAINING * c["train_images_per_cpu_second"] / n_train))
        log(f"{name}: {c}; {epochs} epoch(s) of {n_train} images fit the budget")
        result["models"][name] = {
            "description": load_config(name, overrides=[f"data.root={TIN}"]).description,
            "cost": c,
            "epochs": epochs,
        }
        if (args.runs / name).exists():
            shutil.rmtree(args.runs / name)  # a fresh run: an honest time
        argv_ = [
            sys.executable,
            "-m",
            "finegrain",
            "train",
            name,
            "--data",
            str(TIN),
            "--profile",
            "quick",
            "--runs",
            str(args.runs),
            "--set",
            f"train.epochs={epochs}",
        ]
        if threads == 1:
            argv_ += ["--set", "data.num_workers=0"]
        jobs.append((name, argv_, args.runs / f"{name}.log"))
    atomic_write_json(args.out, result)

    def done(name: str, code: int, wall: float, cpu: float, peak_gb: float) -> None:
        entry = result["models"][name]
        entry.update(
            {
                "command": f"finegrain train {name} --data {TIN} --profile quick --set train.epochs={entry['epochs']}",
                "threads": threads,
                "wall_seconds": round(wall, 1),
                "cpu_minutes": round(cpu / 60, 2),
                "peak_memory_gb": round(peak_gb, 2),
            }
        )
        metrics_file = args.runs / name / "metrics.json"
        if code != 0 or not metrics_file.is_file():
            entry["error"] = f"exit code {code}; see {args.runs / f'{name}.log'}"
            log(f"FAILED {name}: {entry['error']}")
        else:
            c = json.loads(metrics_file.read_text())["classification"]
            entry["metrics"] = {k: c.get(k) for k in ("top1", "top5", "f1_macro", "loss")}
            log(f"done {name}: top-1 {c['top1']:.4f} in {cpu / 60:.1f} CPU-min ({wall / 60:.1f} min wall)")
        atomic_write_json(args.out, result)

    run_timed(jobs, args.parallel, threads, done, cwd=ROOT)
    for name, e in result["models"].items():
        log(f"{name:14s} {e.get('metrics') or e.get('error')}  {e.get('cpu_minutes')} CPU-min, {e['epochs']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
