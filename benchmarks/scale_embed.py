"""Benchmark: the same 4,000 real images embedded by one process, by Ray here, and by a two-node Ray cluster.

    python benchmarks/scale_embed.py [--images 4000] [--out PATH]

The images are the first 4,000 of ``../shared/data/stanford_cars`` (128x96 thumbnails), listed in a
CSV (path,label). The model is a kNN run (no training) of EfficientNet-Lite0 with its ImageNet
weights at 96x128, on the torch engine in the precision this CPU runs fastest. Three modes, each
the command a user runs, timed end to end (start-up included) in a subprocess:

* ``single``: today's ``finegrain index RUN --gallery LIST.csv`` (one process, every core);
* ``ray-local``: ``finegrain index RUN --gallery LIST.csv --ray local --actors 2`` (a local Ray
  started by the command, 2 actors of one CPU each);
* ``ray-2-nodes``: a cluster of two Ray nodes started on this machine (``ray start --head
  --num-cpus 1`` and ``ray start --address ... --num-cpus 1``, each its own ports), used with
  ``--ray ADDRESS --actors 2``; when half the shards are written, one actor process (a child of
  one of this cluster's raylets) is killed with SIGKILL, and Ray restarts it and retries its shard.

Each row says images/s, its ratio to ``single``, and, against the ``single`` vectors (read back
from its flat index), how many images are missing, duplicated, and the largest difference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log, machine_info, warn_if_busy

RESULTS = ROOT / "benchmarks" / "results" / "scale_embed.json"
WORK = ROOT / "benchmarks" / "out" / "scale_embed"
CARS = ROOT.parent / "shared" / "data" / "stanford_cars"
HEAD_PORT = 6479
RAY_TMP = Path("/tmp/fg-scale-ray")
"""The nodes' temp dirs (short: Ray's socket paths must stay under 108 bytes)."""
SHARD_ROWS = 1024


def env() -> dict:
    return {
        **os.environ,
        "FINEGRAIN_PROGRESS": "0",
        "PYTHONPATH": str(ROOT / "src"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }  # the head node of Ray 2.60 asks for its token


def finegrain(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "finegrain", *args], env=env(), capture_output=True, text=True, check=False
    )
    return done, time.perf_counter() - t0


def make_run(images: int) -> tuple[Path, Path]:
    """A kNN run of pretrained EfficientNet-Lite0 and the CSV listing of the images."""
    from finegrain.config import build_config, config_to_yaml
    from finegrain.data.detect import open_collection

    if not (CARS / "devkit").is_dir():
        sys.exit(f"real data not found at {CARS}")
    run = WORK / "run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cfg = build_config(
        {
            "name": "scale-embed",
            "task": "knn",
            "data": {"root": str(CARS), "holdout": 0.5, "image_size": [96, 128], "num_workers": 0, "batch_size": 64},
            "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "head": "classifier"},
        }
    )
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    records = open_collection(CARS).all_records()[:images]
    listing = WORK / "gallery.csv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in records:
            w.writerow([str(r.path), r.label])
    return run, listing


def index_vectors(run: Path) -> tuple[np.ndarray, list[str]]:
    from finegrain.retrieval.index import GalleryIndex

    index = GalleryIndex.load(run / "index")
    return index.index.reconstruct_n(0, index.n), index.paths


def shard_vectors(run: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Every vector in the run's shards (normalised as the index stores them), their paths and ids,
    read without the duplicate check (counted here instead)."""
    from finegrain.metrics.retrieval import l2_normalize

    folder = next((run / "embeddings").glob("shards-*"))
    xs, paths, ids = [], [], []
    for rows_file in sorted(folder.glob("shard-*.json")):
        rows = json.loads(rows_file.read_text())
        xs.append(np.load(rows_file.with_suffix(".npy")))
        paths += rows["paths"]
        ids += rows["ids"]
    return l2_normalize(np.concatenate(xs)), paths, ids


def compare(ref: np.ndarray, ref_paths: list[str], x: np.ndarray, paths: list[str], ids: list[str]) -> dict:
    where = {p: i for i, p in enumerate(ref_paths)}
    seen: dict[str, int] = {}
    for p in paths:
        seen[p] = seen.get(p, 0) + 1
    common = [i for i, p in enumerate(paths) if p in where]
    diff = float(np.abs(x[common] - ref[[where[paths[i]] for i in common]]).max()) if common else None
    return {
        "missing": sum(1 for p in ref_paths if p not in seen),
        "duplicated": sum(c - 1 for c in seen.values()),
        "duplicated_ids": len(ids) - len(set(ids)),
        "max_abs_diff_to_single": diff,
    }


def clear_shards(run: Path) -> None:
    for folder in (run / "embeddings").glob("shards-*"):
        shutil.rmtree(folder)


def ray_cmd(*args: str) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], env=env(), capture_output=True, text=True, check=False)


def start_two_nodes() -> list[str]:
    """A head node and a second node on this machine, one CPU each, on their own ports."""
    head = [
        "start",
        "--head",
        "--num-cpus",
        "1",
        "--port",
        str(HEAD_PORT),
        "--include-dashboard",
        "false",
        "--temp-dir",
        str(RAY_TMP / "head"),
        "--node-manager-port",
        "6480",
        "--object-manager-port",
        "6481",
        "--min-worker-port",
        "21000",
        "--max-worker-port",
        "21499",
        "--ray-client-server-port",
        "6482",
        "--dashboard-agent-listen-port",
        "6483",
        "--metrics-export-port",
        "6484",
        "--disable-usage-stats",
    ]
    second = [
        "start",
        "--address",
        f"127.0.0.1:{HEAD_PORT}",
        "--num-cpus",
        "1",
        "--node-manager-port",
        "6490",
        "--object-manager-port",
        "6491",
        "--min-worker-port",
        "21500",
        "--max-worker-port",
        "21999",
        "--dashboard-agent-listen-port",
        "6493",
        "--metrics-export-port",
        "6494",
        "--disable-usage-stats",
        "--temp-dir",
        str(RAY_TMP / "node2"),
    ]
    for args in (head, second):
        done = ray_cmd(*args)
        if done.returncode != 0:
            stop_nodes()
            sys.exit(f"ray {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return [f"127.0.0.1:{HEAD_PORT}"]


def _processes() -> list[tuple[int, int, str]]:
    ps = subprocess.run(
        ["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[1:]
    return [(int(p[0]), int(p[1]), p[2]) for p in (line.split(None, 2) for line in ps) if len(p) == 3]


def stop_nodes() -> None:
    """End our two nodes by their ids: the processes whose command line names our temp dirs, and
    their descendants (never `ray stop`, which would end other people's Ray too)."""
    procs = _processes()
    ours = {pid for pid, _, args in procs if str(RAY_TMP) in args}
    grew = True
    while grew:
        more = {pid for pid, ppid, _ in procs if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    ours.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def our_actor_pids() -> list[int]:
    """PIDs of ShardEmbedder actors whose parent is a raylet of our cluster (its session under WORK)."""
    procs = _processes()
    raylets = {pid for pid, _, args in procs if "raylet" in args and str(RAY_TMP) in args}
    return [pid for pid, ppid, args in procs if ppid in raylets and re.match(r"ray::.*(MapWorker|ShardEmbedder)", args)]


def kill_half_way(run: Path, shards: int, report: dict) -> None:
    """When half the shards are written, SIGKILL one actor of our cluster (recorded in ``report``)."""
    deadline = time.time() + 1800
    while time.time() < deadline:
        written = len(list((run / "embeddings").glob("shards-*/shard-*.json")))
        if written >= shards // 2:
            pids = our_actor_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                report.update({"killed_pid": pids[0], "killed_after_shards": written})
                log(f"killed actor {pids[0]} after {written} shards")
                return
        time.sleep(0.2)


def ray_row(
    mode: str, run: Path, listing: Path, address: str, ref, single_wall: float, n: int, kill: bool = False
) -> dict:
    clear_shards(run)
    killed: dict = {}
    watcher = None
    if kill:
        watcher = threading.Thread(target=kill_half_way, args=(run, (n + SHARD_ROWS - 1) // SHARD_ROWS, killed))
        watcher.start()
    done, wall = finegrain(
        "index", str(run), "--gallery", str(listing), "--ray", address, "--actors", "2", "--engine", "torch"
    )
    if watcher is not None:
        watcher.join(timeout=1)
    if done.returncode != 0:
        return {"mode": mode, "error": done.stderr[-2000:]}
    x, paths, ids = shard_vectors(run)
    row = {
        "mode": mode,
        "images": n,
        "wall_s": round(wall, 1),
        "images_per_s": round(n / wall, 1),
        "ratio_to_single_process": round(single_wall / wall, 3),
        **compare(*ref, x, paths, ids),
        "output": done.stdout.strip().splitlines()[0][:300],
        **killed,
    }
    if kill and not killed:
        row["note"] = "no actor was killed (the run ended before half its shards were seen)"
    return row


def run_two_nodes(result: dict, run: Path, listing: Path, ref, single_wall: float, images: int) -> None:
    log("ray-2-nodes")
    address = start_two_nodes()[0]
    try:
        result["rows"].append(ray_row("ray-2-nodes", run, listing, address, ref, single_wall, images, kill=True))
    finally:
        stop_nodes()
    log(json.dumps(result["rows"][-1]))
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--only-two-nodes",
        action="store_true",
        help="keep --out's rows and run only ray-2-nodes, against the run's current flat index",
    )
    a = p.parse_args()
    result = {
        "benchmark": "scale_embed",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "busy_warning": warn_if_busy(),
        "images": a.images,
        "model": "EfficientNet-Lite0 ImageNet (kNN run, no training) at 96x128, torch engine",
        "shard_rows": SHARD_ROWS,
        "rows": [],
    }

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")

    if a.only_two_nodes:
        result = json.loads(a.out.read_text())
        run, listing = WORK / "run", WORK / "gallery.csv"
        single = next(r for r in result["rows"] if r["mode"] == "single")
        result["rows"] = [r for r in result["rows"] if r["mode"] != "ray-2-nodes"]
        result["two_nodes_reference"] = (
            "the flat index left by ray-local, whose vectors equal single's (max_abs_diff_to_single in its row)"
        )
        result["machine_two_nodes"] = machine_info()
        run_two_nodes(result, run, listing, index_vectors(run), single["wall_s"], a.images)
        save()
        return
    run, listing = make_run(a.images)
    log("single: finegrain index")
    done, single_wall = finegrain("index", str(run), "--gallery", str(listing), "--engine", "torch")
    if done.returncode != 0:
        sys.exit(f"finegrain index failed:\n{done.stderr[-3000:]}")
    ref = index_vectors(run)
    result["rows"].append(
        {
            "mode": "single",
            "images": a.images,
            "wall_s": round(single_wall, 1),
            "images_per_s": round(a.images / single_wall, 1),
            "ratio_to_single_process": 1.0,
            "missing": a.images - len(ref[1]),
            "duplicated": len(ref[1]) - len(set(ref[1])),
        }
    )
    save()
    log("ray-local")
    result["rows"].append(ray_row("ray-local", run, listing, "local", ref, single_wall, a.images))
    log(json.dumps(result["rows"][-1]))
    save()
    run_two_nodes(result, run, listing, ref, single_wall, a.images)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()


if __name__ == "__main__":
    main()
