"""Benchmark: the commands a new user runs, old precision (bf16 everywhere) against the new (auto) (issue 18).

    python benchmarks/new_user_flow.py [--work /tmp/finegrain-new-user] [--only auto|bf16] [--epochs N]
                                       [--threads-unplanned | --thread-plan planned|unplanned|both]
                                       [--train-set KEY=VALUE ...] [--out PATH] [--fresh]

1. Once, cached under ``--work``: an image folder (one folder per class) of the first 30 classes of
   ``../shared/data/stanford_cars`` (read with the project's loader, ``finegrain.data.detect.open_collection``;
   1,229 images, ~41 a class), **each upscaled from the 128x96 files to 1024x768 and saved as JPEG
   quality 90**, to stand in for full-resolution photos: decoding and resizing them costs what a
   user's photos cost.
2. Per flow, whole commands in subprocesses with ``FINEGRAIN_PROGRESS=0`` and an empty
   ``FINEGRAIN_CACHE`` of their own (no prepared cache, as on a new machine):
   ``finegrain train cars-lite0 --profile quick --set data.root=FOLDER --runs WORK/runs --name ...``
   (2 epochs at 96x128, then its evaluation on the held-out half), ``finegrain index RUN --gallery all``,
   ``finegrain search RUN IMAGE --json``. Each is timed as a process: wall seconds, and user and
   system CPU seconds from ``os.wait4`` (the process and the loader workers it waited for).

   - ``bf16`` (the old behaviour): ``--set train.precision=bf16-mixed`` and ``FINEGRAIN_PRECISION=bf16-mixed``
     in the environment, so training, evaluation, indexing and search all run in bf16 autocast;
   - ``auto`` (the new default): neither; ``auto`` picks 32 on a CPU without native bf16.

   With ``--thread-plan unplanned`` (or ``--threads-unplanned``) the flows run with
   ``FINEGRAIN_THREAD_PLAN=0`` (``finegrain.machine.thread_plan_enabled``: the configured loader
   workers beside torch's default threads, the behaviour before the thread plan); ``both`` runs each
   flow both ways. The train command's system share of its CPU time is what the plan is about.
3. Start-up against model: ``python -c "import finegrain.cli"`` timed as a process, and a probe process
   that times, in one search, the imports, loading the run (model + index) and ``Searcher.search``
   (the model's forward pass and the FAISS query) — ``finegrain search --json`` does not report
   its model time.

The JSON (``benchmarks/results/new_user_flow.json``) has every command's figures, the ratios
old/new per command and for train + index (the issue's goal: at least 8x on a CPU without native
bf16; the old flow took 424 s to train and 203 s to index there), and the machine (busy or not).
Earlier invocations already in the file are kept under ``earlier_invocations`` (``--fresh`` drops
them), so that ``--only auto --thread-plan both`` can add the thread-plan comparison beside an
earlier old/new comparison; ratios are only taken between flows of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "new_user_flow.json"
CARS = ROOT.parent / "shared" / "data" / "stanford_cars"
CLASSES, SIZE, QUALITY = 30, (1024, 768), 90
FINEGRAIN = Path(sys.executable).with_name("finegrain")
GOAL = 8.0  # the goal: the new flow at least 8x faster than the old
PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import finegrain.cli  # noqa: F401  (what `finegrain` imports before any command)
from pathlib import Path
from finegrain.data.images import open_rgb
from finegrain.retrieval.searcher import Searcher
t1 = time.perf_counter()
query, _ = open_rgb(Path(sys.argv[2]))
searcher = Searcher(Path(sys.argv[1]), None, engine="auto")
t2 = time.perf_counter()
searcher.search(query, k=10)
t3 = time.perf_counter()
searcher.search(query, k=10)
t4 = time.perf_counter()
print(json.dumps({"imports_seconds": t1 - t0, "load_run_seconds": t2 - t1, "first_search_seconds": t3 - t2,
                  "second_search_seconds": t4 - t3, "engine": searcher.engine,
                  "precision": getattr(getattr(searcher, "encoder", None), "precision", None)}))
"""


# ----------------------------------------------------------------------------- the image folder
def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in " -_.()" else "-" for c in name).strip()


def build_folder(dest: Path) -> dict[str, Any]:
    """The 30-class folder of 1024x768 JPEGs, built once (``dest/.complete.json`` says it is whole)."""
    marker = dest / ".complete.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    from PIL import Image

    from finegrain.data.detect import open_collection

    coll = open_collection(CARS)
    records = [r for r in coll.splits["train"] if r.label < CLASSES]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for label in range(CLASSES):
        (tmp / safe_name(coll.class_names[label])).mkdir(parents=True)

    def one(r) -> None:
        with Image.open(r.path) as im:
            im.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC).save(
                tmp / safe_name(coll.class_names[r.label]) / f"{r.path.stem}.jpg", quality=QUALITY
            )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, records))
    info = {
        "source": str(CARS),
        "read_with": "finegrain.data.detect.open_collection (devkit labels)",
        "classes": CLASSES,
        "class_names": coll.class_names[:CLASSES],
        "images": len(records),
        "upscaled_to": f"{SIZE[0]}x{SIZE[1]}",
        "jpeg_quality": QUALITY,
        "why": "the shared files are 128x96; upscaled (bicubic, greyscale converted to RGB) to stand in for "
        "full-resolution photos, so decoding and resizing cost what a user's photos cost",
        "megabytes": round(sum(f.stat().st_size for f in tmp.rglob("*.jpg")) / 1e6, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / ".complete.json").write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- timing commands
def run_timed(argv: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run ``argv``; its exit code, wall seconds and user / system CPU seconds (``os.wait4``: the
    process and every child it waited for, such as loader workers)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = ["finegrain", *argv[1:]] if argv[0] == str(FINEGRAIN) else ["python", *argv[1:]]
    if len(shown) > 2 and shown[1] == "-c" and "\n" in shown[2]:
        shown[2] = "<search probe>"
    log("  $ " + " ".join(shown))
    with log_path.open("w") as out, (log_path.with_suffix(".err")).open("w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "command": " ".join(argv if "<search probe>" not in shown else [*argv[:2], "PROBE", *argv[3:]]),
        "exit_code": p.returncode,
        "wall_seconds": round(wall, 2),
        "user_seconds": round(usage.ru_utime, 2),
        "system_seconds": round(usage.ru_stime, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "system_share_of_cpu": round(usage.ru_stime / max(1e-9, usage.ru_utime + usage.ru_stime), 3),
        "log": str(log_path),
    }
    log(f"    exit {p.returncode}: {wall:.1f} s wall, {usage.ru_utime:.1f} s user, {usage.ru_stime:.1f} s system")
    if p.returncode != 0:
        log("    stderr tail: " + log_path.with_suffix(".err").read_text()[-1500:])
    return res


def run_facts(run: Path) -> dict[str, Any]:
    """What the train command wrote: precision, epochs and their seconds, the evaluation's figures."""
    import csv

    facts: dict[str, Any] = {}
    try:
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        facts["config"] = {
            "precision": cfg["train"].get("precision"),
            "channels_last": cfg["train"].get("channels_last"),
            "epochs": cfg["train"].get("epochs"),
            "image_size": cfg["data"].get("image_size"),
            "batch_size": cfg["data"].get("batch_size"),
            "num_workers": cfg["data"].get("num_workers"),
        }
    except Exception as e:  # noqa: BLE001 - informative only
        facts["config_error"] = repr(e)
    try:
        with (run / "history.csv").open() as f:
            rows = list(csv.DictReader(f))
        facts["epoch_seconds"] = [float(r["seconds"]) for r in rows if r.get("seconds")]
    except OSError:
        pass
    try:
        m = json.loads((run / "metrics.json").read_text())
        facts["evaluation"] = {k: m.get(k) for k in ("inference", "timing") if k in m}
        cls = m.get("classification") or m.get("metrics") or {}
        facts["evaluation"]["top1"] = cls.get("top1", cls.get("accuracy"))
    except (OSError, ValueError):
        pass
    return facts


# ----------------------------------------------------------------------------- one flow
def run_flow(flow: str, planned: bool, args, folder: Path, query: Path) -> dict[str, Any]:
    key = flow + ("" if planned else "_unplanned")
    name = f"new-user-{key.replace('_', '-')}"
    runs, run = args.work / "runs", args.work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)  # ours: a run is never overwritten silently, so start clean
    cache = args.work / f"cache-{key}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0", "FINEGRAIN_CACHE": str(cache)}
    env.pop("FINEGRAIN_PRECISION", None)
    env.pop("FINEGRAIN_THREAD_PLAN", None)
    train = [
        str(FINEGRAIN),
        "train",
        "cars-lite0",
        "--profile",
        "quick",
        "--set",
        f"data.root={folder}",
        "--runs",
        str(runs),
        "--name",
        name,
    ]
    if flow == "bf16":
        env["FINEGRAIN_PRECISION"] = "bf16-mixed"
        train += ["--set", "train.precision=bf16-mixed"]
    if not planned:
        env["FINEGRAIN_THREAD_PLAN"] = "0"
    if args.epochs:
        train += ["--set", f"train.epochs={args.epochs}"]
    for kv in args.train_set:
        train += ["--set", kv]
    logs = args.work / "logs" / key
    log(
        f"flow {key}: FINEGRAIN_PRECISION={env.get('FINEGRAIN_PRECISION', '(unset: auto)')}, "
        f"FINEGRAIN_THREAD_PLAN={env.get('FINEGRAIN_THREAD_PLAN', '(unset: planned)')}"
    )
    out: dict[str, Any] = {
        "environment": {
            k: env[k]
            for k in ("FINEGRAIN_PRECISION", "FINEGRAIN_THREAD_PLAN", "FINEGRAIN_PROGRESS", "FINEGRAIN_CACHE")
            if k in env
        },
        "run": str(run),
        "load_average_before": load_average(),
        "commands": {},
    }
    cmds = out["commands"]
    cmds["train"] = run_timed(train, env, logs / "train.log")
    out["train_facts"] = run_facts(run)
    if cmds["train"]["exit_code"] == 0:
        cmds["index"] = run_timed([str(FINEGRAIN), "index", str(run), "--gallery", "all"], env, logs / "index.log")
    if cmds.get("index", {}).get("exit_code") == 0:
        cmds["search"] = run_timed([str(FINEGRAIN), "search", str(run), str(query), "--json"], env, logs / "search.log")
        try:
            res = json.loads((logs / "search.log").read_text())
            out["search_result"] = {
                "gallery_size": res.get("gallery_size"),
                "prediction": res.get("prediction"),
                "top_hit": (res.get("hits") or [None])[0],
            }
        except ValueError:
            pass
        # start-up against model: the bare import as a process, and a probe timing one search's phases
        cmds["import_finegrain_cli"] = run_timed(
            [sys.executable, "-c", "import finegrain.cli"], env, logs / "import.log"
        )
        probe = run_timed([sys.executable, "-c", PROBE, str(run), str(query)], env, logs / "probe.log")
        try:
            phases = json.loads((logs / "probe.log").read_text().strip().splitlines()[-1])
            phases = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in phases.items()}
        except (ValueError, IndexError):
            phases = {}
        out["search_breakdown"] = {"probe_process": probe, **phases}
        if phases:
            model = phases["first_search_seconds"]
            wall = cmds["search"]["wall_seconds"]
            out["search_breakdown"].update(
                {
                    "search_command_wall_seconds": wall,
                    "model_seconds": model,
                    "startup_seconds": round(wall - model, 2),
                    "startup_share_of_search_command": round((wall - model) / wall, 3),
                    "how": "model_seconds is Searcher.search (preprocessing, the forward pass(es), the FAISS query) in "
                    "the probe process; startup_seconds = the search command's wall time minus it (interpreter, "
                    "imports, loading the checkpoint and the index, printing)",
                }
            )
    t = {k: cmds[k]["wall_seconds"] for k in ("train", "index", "search") if k in cmds}
    out["train_plus_index_wall_seconds"] = round(t.get("train", 0) + t.get("index", 0), 2)
    out["flow_wall_seconds"] = round(sum(t.values()), 2)
    out["ok"] = all(cmds[k]["exit_code"] == 0 for k in cmds) and "search" in cmds
    out["load_average_after"] = load_average()
    return out


def ratios(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """old / new for each command's wall and CPU seconds, and for train + index and the whole flow."""
    r: dict[str, Any] = {}
    for k in ("train", "index", "search"):
        o, n = old["commands"].get(k), new["commands"].get(k)
        if o and n:
            r[k] = {
                "wall": round(o["wall_seconds"] / n["wall_seconds"], 2),
                "cpu": round(o["cpu_seconds"] / max(1e-9, n["cpu_seconds"]), 2),
            }
    if new["train_plus_index_wall_seconds"]:
        r["train_plus_index_wall"] = round(
            old["train_plus_index_wall_seconds"] / new["train_plus_index_wall_seconds"], 2
        )
    if new["flow_wall_seconds"]:
        r["flow_wall"] = round(old["flow_wall_seconds"] / new["flow_wall_seconds"], 2)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/finegrain-new-user"),
        help="where the image folder (kept), runs, caches and logs go",
    )
    ap.add_argument("--only", choices=("auto", "bf16"), default=None, help="run one flow only")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the quick profile's 2)")
    ap.add_argument(
        "--thread-plan",
        choices=("planned", "unplanned", "both"),
        default="planned",
        help="unplanned: FINEGRAIN_THREAD_PLAN=0 (the behaviour before the thread plan)",
    )
    ap.add_argument(
        "--threads-unplanned",
        action="store_const",
        const="unplanned",
        dest="thread_plan",
        help="the same as --thread-plan unplanned",
    )
    ap.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another --set for the train command of every flow (recorded; nothing is extrapolated)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="drop the earlier invocations kept in --out (by default they are kept, labelled, under "
        "earlier_invocations; ratios are only ever taken within one invocation)",
    )
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    earlier: list[dict[str, Any]] = []
    if args.out.is_file() and not args.fresh:
        try:
            prev = json.loads(args.out.read_text())
            if prev.get("benchmark") == "new_user_flow":
                earlier = [
                    {k: v for k, v in prev.items() if k != "earlier_invocations"},
                    *prev.get("earlier_invocations", []),
                ]
        except ValueError:
            pass
    if not FINEGRAIN.is_file():
        ap.error(f"no finegrain command next to this python: {FINEGRAIN}")

    busy = warn_if_busy()
    result: dict[str, Any] = {
        "benchmark": "new_user_flow",
        "issue": 18,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "machine_busy": busy is not None,
        "busy_warning_at_start": busy,
        "settings": {
            "work": str(args.work),
            "epochs": args.epochs or "2 (the quick profile)",
            "thread_plan": args.thread_plan,
            "train_set": args.train_set,
            "flows": {
                "bf16": "the old behaviour: --set train.precision=bf16-mixed and "
                "FINEGRAIN_PRECISION=bf16-mixed (bf16 for training and every inference)",
                "auto": "the new default: precision auto for training and inference",
            },
        },
        "goal": f"new flow at least {GOAL:g}x faster than the old on a CPU without native bf16 (old there: 424 s "
        "train + 203 s index); one search mostly start-up, not model",
        "notes": "wall and CPU seconds of whole commands on a shared 2-core machine (see machine_busy and the load "
        "averages); read the ratios. CPU seconds are user + system of the process and the loader workers it "
        "waited for.",
    }
    log(f"image folder under {args.work / 'images'} (built once)")
    folder = args.work / "images"
    result["dataset"] = build_folder(folder)
    result["dataset"]["folder"] = str(folder)
    query = min((folder / safe_name(result["dataset"]["class_names"][0])).glob("*.jpg"))
    result["query_image"] = {
        "path": str(query),
        "note": "one of the 1024x768 gallery images (the search marks it as the query itself)",
    }
    log(f"  {result['dataset']['images']} images, {result['dataset']['megabytes']} MB; query {query.name}")

    flows = [args.only] if args.only else ["bf16", "auto"]
    plans = {"planned": [True], "unplanned": [False], "both": [True, False]}[args.thread_plan]
    result["flows"] = {}
    for planned in plans:
        for flow in flows:
            key = flow + ("" if planned else "_unplanned")
            result["flows"][key] = run_flow(flow, planned, args, folder, query)
            atomic_write_json(args.out, {**result, "earlier_invocations": earlier[:4]})

    fl = result["flows"]
    summary: dict[str, Any] = {}
    for suffix in ("", "_unplanned"):
        old, new = fl.get("bf16" + suffix), fl.get("auto" + suffix)
        if old and new and old["ok"] and new["ok"]:
            r = ratios(old, new)
            summary["old_over_new" + suffix] = r
            summary["goal_met" + suffix] = r.get("train_plus_index_wall", 0) >= GOAL
    for key, f in fl.items():
        c = f["commands"]
        summary[key] = {
            k: {m: c[k][m] for m in ("wall_seconds", "user_seconds", "system_seconds")}
            for k in ("train", "index", "search", "import_finegrain_cli")
            if k in c
        }
        summary[key]["train_system_share_of_cpu"] = c["train"]["system_share_of_cpu"]
        if "search_breakdown" in f and "model_seconds" in f["search_breakdown"]:
            b = f["search_breakdown"]
            summary[key]["search_model_seconds"] = b["model_seconds"]
            summary[key]["search_startup_share"] = b["startup_share_of_search_command"]
    for flow in ("auto", "bf16"):
        if flow in fl and flow + "_unplanned" in fl:
            p, u = fl[flow]["commands"]["train"], fl[flow + "_unplanned"]["commands"]["train"]
            summary[f"thread_plan_{flow}_train"] = {
                "planned": {m: p[m] for m in ("wall_seconds", "user_seconds", "system_seconds", "system_share_of_cpu")},
                "unplanned": {
                    m: u[m] for m in ("wall_seconds", "user_seconds", "system_seconds", "system_share_of_cpu")
                },
                "unplanned_over_planned_wall": round(u["wall_seconds"] / p["wall_seconds"], 2),
            }
    result["summary"] = summary
    result["earlier_invocations"] = earlier[:4]
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = load_average()
    result["machine_busy"] = result["machine_busy"] or warn_if_busy() is not None
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    for k, v in summary.items():
        log(f"{k}: {v}")
    return 0 if all(f["ok"] for f in fl.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
