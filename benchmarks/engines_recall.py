"""Benchmark: one trained run evaluated with each inference engine, its accuracy and speed side by side.

    python benchmarks/engines_recall.py RUN [--engines torch onnx onnx-int8] [--out PATH]

For a retrieval run (say the one ``accuracy_cars.py`` trains with ``cars196-lite0-nsm --profile
cpu45``), this exports the run with its int8 model (``finegrain export RUN --quantize int8``, whose
model.json records the accuracy int8 loses), then runs ``finegrain
evaluate RUN --engine E --json`` for each engine, one after the other, through the command users
run. It records each engine's Recall@K and MAP@R (top-1 for a classifier), the images/s of the
model passes and the difference to the torch engine in points. Results go to ``--out`` (default
``benchmarks/results/engines_recall.json``) with the machine's facts. Issue 16's goals: ONNX
fp32 within 0.1 point of torch, int8 within 1 point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log, machine_info, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "engines_recall.json"


def finegrain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "finegrain", *args], env=env, capture_output=True, text=True)


def headline(metrics: dict) -> tuple[str, float]:
    if "retrieval" in metrics:
        return "recall@1", float(metrics["retrieval"]["recall@1"])
    return "top1", float(metrics["classification"]["top1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--engines", nargs="+", default=["torch", "onnx", "onnx-int8"])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    result = {
        "benchmark": "engines_recall",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": str(a.run),
        "machine": machine_info(),
        "busy_warning": warn_if_busy(),
        "engines": {},
    }
    t0 = time.perf_counter()
    exported = finegrain("export", str(a.run), "--quantize", "int8")
    if exported.returncode != 0:
        sys.exit(f"export failed:\n{exported.stderr[-2000:]}")
    result["export_seconds"] = round(time.perf_counter() - t0, 1)
    meta = json.loads((a.run / "export" / "model.json").read_text())
    result["export"] = {k: meta.get(k) for k in ("accuracy", "parity", "image_sizes", "opset", "onnxruntime")}
    reference = None
    for engine in a.engines:
        log(f"evaluate --engine {engine}")
        t0 = time.perf_counter()
        done = finegrain("evaluate", str(a.run), "--engine", engine, "--json")
        if done.returncode != 0:
            result["engines"][engine] = {"error": done.stderr[-2000:]}
            log(f"{engine} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        metrics = json.loads(done.stdout)
        name, value = headline(metrics)
        entry = {k: metrics[k] for k in ("retrieval", "classification", "timing", "inference") if k in metrics}
        entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if engine == "torch":
            reference = (value, metrics["timing"]["images_per_second"])
        elif reference is not None:
            entry[f"{name}_minus_torch_points"] = round(100 * (value - reference[0]), 3)
            entry["images_per_second_vs_torch"] = round(metrics["timing"]["images_per_second"] / reference[1], 2)
        result["engines"][engine] = entry
        log(f"{engine}: {name} {100 * value:.2f}%, {metrics['timing']['images_per_second']} images/s")
        atomic_write_json(a.out, result)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_json(a.out, result)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
