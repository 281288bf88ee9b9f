"""Benchmark: CPU time in the kernel (system seconds, minor page faults) per phase of a short real training,
with glibc's default allocator settings and with finegrain's (``machine.tune_allocator``).

    python benchmarks/kernel_time.py [--classes 40] [--per-class 20] [--epochs 2] [--out PATH]

The data is a CSV list of ``../shared/data/stanford_cars_crops`` (real photographs, up to 384 px): the
first ``--classes`` classes, ``--per-class`` training images each, half of them held out as the test
(``data.holdout_fraction 0.5``). Each variant trains the shipped ``cars-lite0 --profile cpu45`` recipe
(EfficientNet-Lite0, frozen cache of 3 views at 256x341, ONNX evaluation at two sizes) for
``--epochs`` epochs in a child process with one thread (``OMP_NUM_THREADS=1``) and in-process loading
(``data.num_workers=0``, so every page fault is the measured process's), and records
``resource.getrusage`` at the phase boundaries: setup (data, model, probe), the frozen cache, the
training epochs, and the ONNX export plus the evaluation. ``default`` runs with
``FINEGRAIN_MALLOC=default`` (glibc as it comes), ``tuned`` with finegrain's settings. The two run one
after the other on the same machine; figures are CPU seconds, and the ratio of system to total CPU
time is what compares them (the machine may be shared). Results: ``benchmarks/results/kernel_time.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, warn_if_busy
from finegrain.runs import atomic_write_json

CROPS = ROOT.parent / "shared" / "data" / "stanford_cars_crops"
RESULTS = ROOT / "benchmarks" / "results" / "kernel_time.json"
VARIANTS = {"default": "default", "tuned": ""}  # FINEGRAIN_MALLOC


def usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user": r.ru_utime,
        "system": r.ru_stime,
        "minor_faults": r.ru_minflt,
        "wall": time.monotonic(),
    }


def phase(a: dict, b: dict) -> dict:
    user, system = b["user"] - a["user"], b["system"] - a["system"]
    return {
        "user_seconds": round(user, 2),
        "system_seconds": round(system, 2),
        "system_share": round(system / max(user + system, 1e-9), 4),
        "minor_faults": int(b["minor_faults"] - a["minor_faults"]),
        "wall_seconds": round(b["wall"] - a["wall"], 1),
    }


def child(csv_path: Path, runs: Path, epochs: int, out: Path) -> None:
    """Train and evaluate in this process, with rusage at each phase boundary; writes ``out``."""
    from finegrain import machine
    from finegrain.config import load_config
    from finegrain.tasks import base, engine
    from finegrain.tasks.workflow import train_and_evaluate

    marks = {"start": usage()}
    cache = base.FinegrainTask.cache_frozen_outputs

    def timed_cache(self) -> None:
        marks["cache_start"] = usage()
        cache(self)
        marks["cache_end"] = usage()

    fit = engine.fit

    def timed_fit(*args, **kwargs):
        result = fit(*args, **kwargs)
        marks["fit_end"] = usage()
        return result

    base.FinegrainTask.cache_frozen_outputs = timed_cache  # type: ignore[method-assign]
    engine.fit = timed_fit
    cfg = load_config(
        "cars-lite0",
        profile="cpu45",
        overrides=[
            f"data.root={json.dumps(str(csv_path))}",
            "data.holdout_fraction=0.5",
            "data.num_workers=0",
            f"train.epochs={epochs}",
            "name=kernel-time",
        ],
    )
    _, metrics = train_and_evaluate(cfg, runs)
    marks["end"] = usage()
    phases = {
        "setup": phase(marks["start"], marks["cache_start"]),
        "frozen_cache": phase(marks["cache_start"], marks["cache_end"]),
        "training": phase(marks["cache_end"], marks["fit_end"]),
        "export_and_evaluation": phase(marks["fit_end"], marks["end"]),
        "whole_run": phase(marks["start"], marks["end"]),
    }
    out.write_text(
        json.dumps(
            {
                "phases": phases,
                "allocator_tuned": machine.tune_allocator(),
                "top1": metrics["classification"]["top1"] if metrics else None,
                "tested_on": metrics.get("tested_on") if metrics else None,
            }
        )
    )


def write_csv(path: Path, classes: int, per_class: int) -> int:
    """A CSV list of the first ``classes`` classes' first ``per_class`` crops; returns the row count."""
    from finegrain.data.detect import open_collection

    coll = open_collection(CROPS)
    rows: dict[int, list[Path]] = {}
    for r in coll.splits["train"]:
        if r.label < classes and len(rows.setdefault(r.label, [])) < per_class:
            rows[r.label].append(r.path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for label in sorted(rows):
            for p in rows[label]:
                w.writerow([str(p), coll.class_names[label], "train"])
    return sum(len(v) for v in rows.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", choices=list(VARIANTS), nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--child",
        nargs=4,
        metavar=("CSV", "RUNS", "EPOCHS", "OUT"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the runs already in --out of the variants not run now",
    )
    ap.add_argument(
        "--adopt",
        nargs=2,
        action="append",
        default=[],
        metavar=("VARIANT", "CHILD_JSON"),
        help="take VARIANT's run from a finished child's output file instead of running it again",
    )
    args = ap.parse_args(argv)
    if args.child:
        child(
            Path(args.child[0]),
            Path(args.child[1]),
            int(args.child[2]),
            Path(args.child[3]),
        )
        return 0
    if not CROPS.is_dir():
        log(f"skipped: {CROPS} is absent")
        return 0
    busy = warn_if_busy()
    result: dict = {
        "benchmark": "kernel_time",
        "data": f"{CROPS}: the first {args.classes} classes, {args.per_class} training crops each, a seeded "
        "50% holdout of them as the test",
        "recipe": f"finegrain train cars-lite0 --profile cpu45 --data LIST.csv --set data.holdout_fraction=0.5 "
        f"--set data.num_workers=0 --set train.epochs={args.epochs}",
        "threads": "OMP_NUM_THREADS=1, nice 10, in-process loading",
        "measure": "resource.getrusage(RUSAGE_SELF) at the phase boundaries of one process; system_share = "
        "system / (user + system)",
        "variants": {
            "default": "FINEGRAIN_MALLOC=default: glibc's allocator as it comes",
            "tuned": "finegrain's mallopt settings (machine.ALLOCATOR_SETTINGS)",
        },
        "machine": machine_info({"busy_warning": busy}),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": {},
    }
    if args.keep and args.out.is_file():
        result["runs"] = json.loads(args.out.read_text()).get("runs", {})
    for name, path in args.adopt:
        result["runs"][name] = json.loads(Path(path).read_text()) | {"adopted_from": path}
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "crops.csv"
        result["images"] = write_csv(lst, args.classes, args.per_class)
        for name in args.only:
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "FINEGRAIN_PROGRESS": "0",
                "FINEGRAIN_MALLOC": VARIANTS[name],
                "PYTHONPATH": str(ROOT / "src"),
            }
            out = Path(tmp) / f"{name}.json"
            cmd = [
                "nice",
                "-n",
                "10",
                sys.executable,
                __file__,
                "--child",
                str(lst),
                str(Path(tmp) / name),
                str(args.epochs),
                str(out),
            ]
            log(f"{name}: {' '.join(cmd)}")
            subprocess.run(cmd, env=env, check=True)
            result["runs"][name] = json.loads(out.read_text()) | {
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_average_after": load_average(),
            }
            log(f"{name}: {json.dumps(result['runs'][name]['phases']['whole_run'])}")
    if {"default", "tuned"} <= set(result["runs"]):
        d, t = (result["runs"][k]["phases"] for k in ("default", "tuned"))
        result["tuned_vs_default"] = {
            p: {
                "system_seconds_ratio": round(t[p]["system_seconds"] / max(d[p]["system_seconds"], 1e-9), 3),
                "minor_faults_ratio": round(t[p]["minor_faults"] / max(d[p]["minor_faults"], 1), 3),
                "system_share": [d[p]["system_share"], t[p]["system_share"]],
            }
            for p in d
        }
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
