"""The living gallery under load, on the embedded store and on Milvus Lite, one run:

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/gallery.py [--images 2000] [--vectors 100000]

1. adds: ``--images`` (``--milvus-images`` on Milvus Lite) real Stanford Cars thumbnails (../shared/data)
   added over the API in each way of :data:`ADD_MODES` (16 concurrent clients posting one image
   each, which the server micro-batches; 2 clients posting 16 images a request), each its own images,
   against the model's own encoding rate over the same number of images (``encode_records``, as
   ``finegrain embed`` encodes: goal >= 0.85 of it), measured in :data:`ROUNDS` slices taken in turns
   with the adds' slices, so that both see the same load of a shared machine;
2. searches: p50/p95 of 4 clients searching, idle and while a fifth client adds (goal: p50 at most
   1.5x idle, no errors);
3. restart: a server over a store of ``--vectors`` vectors, inserted directly through the store API
   (random unit vectors; no images), from process start to the first answered search (goal <= 5 s),
   serving the run's ONNX export (and, beside it, with the torch engine).

The model is a small CNN (cars_cnn4, 96x128) trained one epoch on half the thumbnails, made once in
benchmarks/out/gallery-run. JSON goes to benchmarks/results/gallery.json with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from common import load_average, log, machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars"
OUT = ROOT / "benchmarks" / "out" / "gallery"
RESULTS = ROOT / "benchmarks" / "results" / "gallery.json"
PER_REQUEST = 8
ONE_AT_A_TIME = 300
ROUNDS = 4
"""The adds are measured in this many rounds, each after a slice of the model's own baseline."""
ADD_MODES = [("single_image_posts", 16, 1), ("multi_image_posts", 2, 16)]
"""How the adds are sent, each mode its own half of the images: (name, concurrent clients, images per POST).
A bulk loader sends many requests at once (the server batches them) or several images a request."""


def make_run() -> Path:
    """A small real model: cars_cnn4 at 96x128, one epoch on half of the thumbnails (made once)."""
    from finegrain.config import build_config
    from finegrain.tasks import engine

    runs = OUT / "runs"
    done = runs / "gallery-bench" / "DONE"
    if (runs / "gallery-bench" / "checkpoints" / "best.ckpt").is_file() or done.is_file():
        return runs / "gallery-bench"
    cfg = build_config(
        {
            "name": "gallery-bench",
            "data": {"root": str(DATA), "holdout": 0.5, "image_size": [96, 128], "num_workers": 0, "batch_size": 64},
            "model": {"backbone": "cars_cnn4", "weights": "none"},
            "train": {"epochs": 1, "seed": 0},
        }
    )
    run, _ = engine.fit(cfg, runs_root=runs)
    return run.path


def exported(run: Path) -> Path:
    """The run with its ONNX export (made once): servers restart on ONNX Runtime without torch."""
    if not (run / "export" / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "finegrain", "export", str(run)], check=True, capture_output=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: Path, store: str, token_file: Path, engine: str = "torch") -> tuple[subprocess.Popen, str, float]:
    """A server process; (process, url, seconds from its start to its first answered search)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finegrain",
            "serve",
            str(run),
            "--port",
            str(port),
            "--store",
            store,
            "--write-token-file",
            str(token_file),
            "--engine",
            engine,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(OUT / "serve.log").open("ab"),
    )
    query = (DATA / "cars_train" / "00001.jpg").read_bytes()
    while time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {OUT / 'serve.log'}")
        try:
            r = httpx.post(
                f"{url}/api/search", files={"image": ("q.jpg", query, "image/jpeg")}, data={"k": "1"}, timeout=30
            )
            if r.status_code == 200:
                return proc, url, time.perf_counter() - t0
            if r.status_code == 422:  # an empty gallery answers, but cannot search: the server is up
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the server did not answer a search within 600 s; see {OUT / 'serve.log'}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def restart_cases(big: str, small: str) -> list[tuple[str, str]]:
    """(store, engine) of the restart figures: the big store on ONNX and on torch, the small one on ONNX."""
    return [(big, "onnx"), (big, "torch"), (small, "onnx")]


def start_seconds(run: Path, store: str, token_file: Path, engine: str) -> float:
    """Seconds from a server's start to its first answered search (the server stopped after)."""
    proc, _, seconds = start(run, store, token_file, engine)
    stop(proc)
    return seconds


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root on Linux only), so the next start reads every file from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def restarts_cold_and_warm(run: Path, big: str, small: str, token_file: Path, warm: int = 3) -> dict:
    """Each restart of :func:`RESTARTS` cold (page cache dropped first, as after a reboot; where allowed)
    and ``warm`` times with the files in the page cache (as after a crash), the median of those."""
    out: dict = {"load_average_before": load_average()}
    for store, engine in restart_cases(big, small):
        key = f"{'big' if store == big else 'small'}_store_{engine}"
        cold = start_seconds(run, store, token_file, engine) if drop_page_cache() else None
        times = [start_seconds(run, store, token_file, engine) for _ in range(warm)]
        out[key] = {"cold_seconds": cold and round(cold, 2), "warm_seconds_median": round(float(np.median(times)), 2)}
    out["load_average_after"] = load_average()
    return out


def images(n: int) -> list[tuple[str, bytes, str]]:
    from finegrain.data.detect import open_collection

    coll = open_collection(DATA)
    records = coll.all_records()[:n]
    return [(r.path.name, r.path.read_bytes(), coll.class_names[r.label]) for r in records]


def own_rate(run: Path, imgs: list[tuple[str, bytes, str]]) -> dict:
    """The model's own encoding rate over the same images (encode_records, as `finegrain embed` does)."""
    from finegrain.data.detect import open_collection
    from finegrain.inference import open_encoder

    encoder = open_encoder(run, "torch")
    encoder.use_threads(1)
    records = open_collection(DATA).all_records()[: len(imgs)]
    t0 = time.perf_counter()
    encoder.encode_records(records, description="baseline")
    seconds = time.perf_counter() - t0
    from finegrain.data.images import decode_bytes, to_rgb

    singles = imgs[:ONE_AT_A_TIME]
    t0 = time.perf_counter()
    for name, data, _ in singles:  # what the server did per image before adds were batched
        encoder.encode_rgb(to_rgb(decode_bytes(data, name))[0])
    single = time.perf_counter() - t0
    return {
        "images": len(records),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(records) / seconds, 1),
        "how": "encode_records (batched, as `finegrain embed`), 1 thread",
        "one_at_a_time_images_per_second": round(len(singles) / single, 1),
        "one_at_a_time_how": f"decode_bytes + encode_rgb per image in-process over {len(singles)} images "
        "(the server's work before adds were batched, without HTTP and the store), 1 thread",
    }


def add_all(
    url: str,
    auth: dict,
    imgs: list[tuple[str, bytes, str]],
    stop_flag: threading.Event | None = None,
    errors: list | None = None,
    clients: int = 1,
    per_request: int = PER_REQUEST,
) -> tuple[int, float]:
    """Add ``imgs`` from ``clients`` concurrent clients (each its share, ``per_request`` images a POST)."""
    done, t0, lock = [0], time.perf_counter(), threading.Lock()

    def client(share: list[tuple[str, bytes, str]]) -> None:
        with httpx.Client(timeout=120) as c:
            for start_at in range(0, len(share), per_request):
                if stop_flag is not None and stop_flag.is_set():
                    break
                batch = share[start_at : start_at + per_request]
                files = [("image", (name, data, "image/jpeg")) for name, data, _ in batch]
                r = c.post(f"{url}/api/gallery", files=files, data={"label": batch[0][2]}, headers=auth)
                if r.status_code != 200:
                    (errors if errors is not None else []).append(r.status_code)
                    if errors is None:
                        raise SystemExit(f"add failed: {r.status_code} {r.text[:200]}")
                with lock:
                    done[0] += len(batch)
                    if stop_flag is None and done[0] % 400 < len(batch):
                        log(f"  {done[0]} added, {done[0] / (time.perf_counter() - t0):.1f} images/s")

    threads = [threading.Thread(target=client, args=(imgs[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], time.perf_counter() - t0


def search_latencies(url: str, queries: list[bytes], clients: int, per_client: int, errors: list) -> list[float]:
    out: list[float] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with httpx.Client(timeout=60) as c:
            for i in range(per_client):
                q = queries[(seed * per_client + i) % len(queries)]
                t0 = time.perf_counter()
                r = c.post(f"{url}/api/search", files={"image": ("q.jpg", q, "image/jpeg")}, data={"k": "10"})
                dt = time.perf_counter() - t0
                with lock:
                    (out if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(xs) * 1000, q)), 1) if xs else float("nan")


def baseline_slices(run: Path, n: int) -> Callable[[int, int], float]:
    """Seconds the model takes on its own to encode images ``lo:hi`` (encode_records, 1 thread)."""
    from finegrain.data.detect import open_collection
    from finegrain.inference import open_encoder

    encoder = open_encoder(run, "torch")
    encoder.use_threads(1)
    records = open_collection(DATA).all_records()[:n]

    def seconds(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        encoder.encode_records(records[lo:hi], description="baseline")
        return time.perf_counter() - t0

    return seconds


def bench_backend(
    name: str,
    run: Path,
    store: str,
    token_file: Path,
    auth: dict,
    imgs: list,
    vectors: int,
    baseline: Callable[[int, int], float],
) -> dict:

    proc, url, _ = start(run, store, token_file)
    try:
        per_mode = len(imgs) // len(ADD_MODES)
        base_seconds, sent = 0.0, {mode: [0, 0.0] for mode, _, _ in ADD_MODES}
        for r in range(ROUNDS):  # the baseline and each way of adding in turns: they share the machine's load
            lo, hi = r * per_mode // ROUNDS, (r + 1) * per_mode // ROUNDS
            log(f"[{name}] round {r + 1}/{ROUNDS}: the model alone, then adds, over {hi - lo} images each")
            base_seconds += baseline(lo, hi)
            for i, (mode, clients, per_request) in enumerate(ADD_MODES):
                some = imgs[i * per_mode + lo : i * per_mode + hi]
                n, seconds = add_all(url, auth, some, clients=clients, per_request=per_request)
                sent[mode][0] += n
                sent[mode][1] += seconds
        base_rate = per_mode / base_seconds
        model_encoding = {
            "images": per_mode,
            "seconds": round(base_seconds, 2),
            "images_per_second": round(base_rate, 1),
            "how": f"encode_records (batched, as `finegrain embed`), 1 thread, in {ROUNDS} slices taken in "
            "turns with the adds' slices (both under the same machine load)",
        }
        adds = {
            mode: {
                "images": int(sent[mode][0]),
                "clients": clients,
                "per_request": per_request,
                "seconds": round(sent[mode][1], 2),
                "images_per_second": round(sent[mode][0] / sent[mode][1], 1),
                "ratio_to_model_rate": round(sent[mode][0] / sent[mode][1] / base_rate, 3),
                "goal": ">= 0.85",
            }
            for mode, clients, per_request in ADD_MODES
        }
        queries = [data for _, data, _ in imgs[::37]]
        log(f"[{name}] searches: idle")
        errors: list = []
        idle = search_latencies(url, queries, 4, 25, errors)
        log(f"[{name}] searches: while a fifth client adds")
        flag, add_errors = threading.Event(), []
        extra = images(len(imgs) + 400)[len(imgs) :]  # not added yet: new entries
        adder = threading.Thread(target=add_all, args=(url, auth, extra, flag, add_errors))
        adder.start()
        busy = search_latencies(url, queries, 4, 25, errors)
        flag.set()
        adder.join()
    finally:
        stop(proc)
    log(f"[{name}] restart over {vectors} vectors (inserted directly through the store API)")
    big_store = str(OUT / "embedded-big") if name == "embedded" else str(OUT / "milvus-big.db")
    # in a child process: Milvus Lite keeps a store's file until the process that opened it exits
    filled = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--fill", store, big_store, str(vectors)],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    count, in_process = filled["count"], filled["open_and_first_search_seconds"]
    restart, restart_torch, small_restart = (
        start_seconds(run, s, token_file, e) for s, e in restart_cases(big_store, store)
    )
    p50_idle, p50_busy = pct(idle, 50), pct(busy, 50)
    return {
        "model_encoding": model_encoding,
        "adds": adds,
        "search": {
            "clients": 4,
            "requests_each": 25,
            "idle_ms": {"p50": p50_idle, "p95": pct(idle, 95)},
            "while_adding_ms": {"p50": p50_busy, "p95": pct(busy, 95)},
            "p50_ratio": round(p50_busy / p50_idle, 3),
            "goal": "p50 ratio <= 1.5, no errors",
            "errors": len(errors),
            "add_errors_during": len(add_errors),
        },
        "restart": {
            "vectors": count,
            "how": "random unit vectors inserted directly through the store API (no images)",
            "seconds_to_first_search": round(restart, 2),
            "engine": "onnx (the run's export: ONNX Runtime, no torch imported)",
            "seconds_to_first_search_torch_engine": round(restart_torch, 2),
            "same_server_over_the_small_store_seconds": round(small_restart, 2),
            "store_share_seconds": round(restart - small_restart, 2),
            "store_open_and_first_search_in_process_seconds": round(in_process, 2),
            "note": "process start (Python, the engine, the model) is in both server figures; store_share is what "
            "the vectors add; the embedded store loads its FAISS snapshot and replays the ledger after it",
            "goal": "<= 5 s",
        },
    }


def fill(small: str, big: str, vectors: int) -> None:
    """Make ``big``: ``vectors`` random unit vectors of ``small``'s spec inserted through the store API;
    print its count and the time to reopen it and answer a first search, as JSON."""
    from finegrain.gallery.store import open_store

    s = open_store(small)
    spec = s.spec
    s.close()
    for p in OUT.glob(Path(big).name + "*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    s = open_store(big, spec)
    rng = np.random.default_rng(0)
    for start_at in range(0, vectors, 10_000):
        n = min(10_000, vectors - start_at)
        s.add_vectors(rng.normal(size=(n, spec.dim)).astype(np.float32), [f"c{i % 196}" for i in range(n)])  # type: ignore[attr-defined]
    count = s.count()
    s.close()
    t0 = time.perf_counter()
    s = open_store(big)
    s.search(rng.normal(size=spec.dim).astype(np.float32), 10)
    seconds = time.perf_counter() - t0
    s.close()
    print(json.dumps({"count": count, "open_and_first_search_seconds": seconds}))


def restarts_only(run: Path) -> int:
    """``--restarts-only``: restart times over the stores of an earlier run, into its results."""
    result = json.loads(RESULTS.read_text())
    stores = {"embedded": ("embedded-big", "embedded"), "milvus-lite": ("milvus-big.db", "milvus.db")}
    for name, (big, small) in stores.items():
        if not (OUT / big).exists() or name not in result["backends"]:
            log(f"[{name}] no store of an earlier run in {OUT}: skipped")
            continue
        log(f"[{name}] restarts, cold and warm")
        entry = restarts_cold_and_warm(run, str(OUT / big), str(OUT / small), OUT / "token")
        entry["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["backends"][name]["restart_cold_and_warm"] = entry
        log(json.dumps(entry))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--fill":
        fill(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument(
        "--milvus-images",
        type=int,
        default=300,
        help="Images added over the API on Milvus Lite (its adds are far slower: keep the run short).",
    )
    ap.add_argument("--skip-milvus", action="store_true")
    ap.add_argument(
        "--restarts-only",
        action="store_true",
        help="Only time restarts, cold and warm, over the stores an earlier run left in benchmarks/out/gallery; "
        "added to the results file as each backend's restart_cold_and_warm.",
    )
    ap.add_argument(
        "--only",
        choices=["embedded", "milvus-lite"],
        help="Measure one backend and update its entry in the results file (the model's rate again).",
    )
    args = ap.parse_args()
    if not (DATA / "cars_train").is_dir():
        print(f"skipped: no Stanford Cars thumbnails in {DATA}", file=sys.stderr)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    run = exported(make_run())
    if args.restarts_only:
        return restarts_only(run)
    token = secrets.token_urlsafe(32)
    token_file = OUT / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    auth = {"Authorization": f"Bearer {token}"}
    imgs = images(args.images * len(ADD_MODES))  # each way of sending adds its own images
    log(f"baseline: the model's own encoding rate over {args.images} images")
    own = own_rate(run, imgs[: args.images])
    baseline = baseline_slices(run, args.images)
    result: dict = {
        "benchmark": "gallery",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info({"omp_num_threads": os.environ.get("OMP_NUM_THREADS")}),
        "model": "cars_cnn4 at 96x128, one epoch on half the Stanford Cars thumbnails; torch (restart: also ONNX)",
        "data": "Stanford Cars train thumbnails (128x96 JPEG)",
        "model_encoding": own,
        "backends": {},
    }
    backends = [("embedded", str(OUT / "embedded"))]
    if not args.skip_milvus:
        try:
            import milvus_lite  # noqa: F401
            import pymilvus  # noqa: F401

            backends.append(("milvus-lite", str(OUT / "milvus.db")))
        except ImportError as e:
            result["backends"]["milvus-lite"] = {"skipped": f"not installed: {e}"}
    if args.only:
        backends = [b for b in backends if b[0] == args.only]
        if RESULTS.is_file():  # keep the other backend's figures
            old = json.loads(RESULTS.read_text())
            result["backends"] = {
                k: {"model_encoding": old["model_encoding"], **v} for k, v in old["backends"].items() if k != args.only
            }
    for name, store in backends:
        for p in OUT.glob(Path(store).name + "*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        some = imgs if name == "embedded" else imgs[: args.milvus_images * len(ADD_MODES)]
        result["backends"][name] = {
            "model_encoding": own,
            **bench_backend(name, run, store, token_file, auth, some, args.vectors, baseline),
        }
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        log(json.dumps(result["backends"][name]))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
