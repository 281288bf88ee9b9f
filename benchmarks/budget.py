"""Benchmark: the generic recipes within a time budget: budget asked, time taken, accuracy.

    python benchmarks/budget.py [--budgets 15m 45m 90m] [--recipes classify retrieve] [--data DIR]
        [--runs DIR] [--out PATH]

Each (recipe, budget) runs ``finegrain train RECIPE --data DIR --budget B`` as a user would, one after
the other, each with one thread (``OMP_NUM_THREADS=1``) and ``nice -n 10``. The data is
``../shared/data/stanford_cars_crops`` (8,144 real photographs, bounding-box crops, at most 384 px),
which has no test split: ``classify`` is tested on a seeded, stratified 50% holdout
(``--set data.holdout_fraction=0.5``, the protocol of ``accuracy_cars.py``), ``retrieve`` on classes
99-196 (held out of training). A row records the budget, the plan (``RUN/budget.json``: settings and
predicted seconds), the wall time the command took against the budget, its CPU time (rusage of the
command and the loader workers it waited for) and the test figures. The budget is wall-clock time on
the machine: on a shared machine the run gets less of the CPU than the probe at its start saw when the
load rises, so timings are pessimistic there (the load average is recorded). Results:
``benchmarks/results/budget.json``, merged with the rows already there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, run_timed, warn_if_busy
from finegrain.runs import atomic_write_json

CROPS = ROOT.parent / "shared" / "data" / "stanford_cars_crops"
RESULTS = ROOT / "benchmarks" / "results" / "budget.json"
PROTOCOL_SETS = {"classify": ["data.holdout_fraction=0.5"], "retrieve": []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", default=["15m", "45m", "90m"])
    ap.add_argument("--recipes", nargs="+", choices=list(PROTOCOL_SETS), default=list(PROTOCOL_SETS))
    ap.add_argument("--data", type=Path, default=CROPS, help="a dataset folder or CSV list (default: the crops)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-budget")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    data = args.data.absolute()
    if not data.exists():
        log(f"skipped: {data} is absent")
        return 0
    busy = warn_if_busy()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update(
        {
            "benchmark": "budget",
            "data": str(data),
            "budget_clock": "wall-clock time of the whole `finegrain train` command on this machine",
            "cpu_time": "user + system seconds of the command and the processes it waited for (os.wait4 rusage)",
            "machine": machine_info({"busy_warning": busy}),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    rows = result.setdefault("rows", {})
    jobs = []
    for name in [f"{r}-{b}" for r in args.recipes for b in args.budgets]:
        if (args.runs / name).exists():
            shutil.rmtree(args.runs / name)  # a fresh run: no resumed checkpoint, an honest time
    for recipe in args.recipes:
        for budget in args.budgets:
            name = f"{recipe}-{budget}"
            argv_ = [
                "nice",
                "-n",
                "10",
                sys.executable,
                "-m",
                "finegrain",
                "train",
                recipe,
                "--data",
                str(data),
                "--budget",
                budget,
                "--runs",
                str(args.runs),
                "--name",
                name,
            ]
            for s in PROTOCOL_SETS[recipe]:
                argv_ += ["--set", s]
            jobs.append((name, argv_, args.runs / f"{name}.log"))
    commands = {name: " ".join(a[3:]).replace(sys.executable + " -m finegrain", "finegrain") for name, a, _ in jobs}

    def done(name: str, code: int, wall: float, cpu: float, peak_gb: float) -> None:
        run = args.runs / name
        row: dict = {
            "command": commands[name].replace(sys.executable, "python"),
            "exit_code": code,
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "peak_memory_gb": round(peak_gb, 2),
            "load_average_after": load_average(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if (run / "budget.json").is_file():
            plan = json.loads((run / "budget.json").read_text())
            row.update(
                {
                    "budget_seconds": plan["budget_seconds"],
                    "predicted_seconds": plan["predicted_seconds"],
                    "plan": {
                        k: plan[k]
                        for k in (
                            "rung",
                            "image_size",
                            "eval_image_sizes",
                            "seconds",
                            "fits",
                        )
                    },
                    "probe": plan["speed"],
                    "wall_over_budget": round(wall / plan["budget_seconds"], 3),
                }
            )
        if (run / "metrics.json").is_file():
            m = json.loads((run / "metrics.json").read_text())
            section = m.get("classification") or m.get("retrieval") or {}
            row["metrics"] = {
                k: v for k, v in section.items() if k in ("top1", "top5", "f1_macro", "recall@1", "recall@4", "map@r")
            }
            row.update(
                {
                    "tested_on": m.get("tested_on"),
                    "partial": m.get("partial"),
                    "epochs_done": m.get("epochs_done"),
                    "epochs_planned": m.get("epochs_planned"),
                }
            )
        rows[name] = row
        atomic_write_json(args.out, result)
        log(f"{name}: {json.dumps(row)}")

    run_timed(jobs, parallel=1, threads=1, on_done=done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
