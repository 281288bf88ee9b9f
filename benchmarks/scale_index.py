"""Benchmark: indexes of 10^6 and 10^7 512-d vectors on one server (ivfpq beside flat and HNSW).

    python benchmarks/scale_index.py [--sizes 1000000 10000000] [--kinds ivfpq ivfpq-disk flat hnsw] [--out PATH]

Vectors. Real embeddings are the seeds: the 4,092 images of Cars196's test classes (99-196) in
``../shared/data/stanford_cars``, embedded by EfficientNet-Lite0 with its ImageNet weights (1280-d
pooled features at 96x128) and projected to 512-d by PCA fitted on them (the 512 leading
components keep most of the variance and the neighbourhoods), then L2-normalised. The generator
expands them to N vectors: vector i belongs to seed ``s = i * 4092 // N`` and is
``normalise(seed_s + sigma * B_s z)``, with ``B_s`` a random orthonormal basis of an 8-d subspace
drawn once per seed, ``z`` a standard normal 8-vector (drawn per chunk from a fixed seed: any chunk
can be made again), and ``sigma`` half the median distance of a real seed to its nearest other seed
divided by sqrt(8). Each seed thus becomes a cloud of near variants in its own few directions,
the clouds lie where the real images lie, and a query's neighbours are its cloud's nearest
members and the neighbouring clouds': the structure a catalogue of many photos of similar
objects has. Queries are 1,000 more vectors of the same generator, never added.

Ground truth: exact top-10 by streaming brute force over regenerated chunks (one chunk in RAM at
a time). Each index is built and measured in its own process (so its peak RSS is its own): build
time (on 2 FAISS threads), peak RSS (VmHWM), bytes per vector (the index's files), recall@10 of
the 1,000 queries, and the p50/p99 latency of single queries on one thread (FAISS, and the re-rank,
on one thread). Memory by phase (``memory_by_phase``: the build's phases, then writing, the recall
search and the latency queries): peaks of anonymous and file-backed RSS (``RssAnon``, ``RssFile``:
pages of mapped files, which the kernel may reclaim) and of their sum, sampled every 50 ms, and
their values when the phase ended. ``ivfpq-disk`` is the ``ivfpq`` index with its inverted lists on
disk, memory-mapped. Each pass over the chunks logs its progress (wall and CPU seconds, RSS) to
``benchmarks/out``. The real 4,092 vectors get rows too (``data: real``): 3,092 indexed, 1,000 held
out as queries. Rows are written to ``--out`` as each finishes.

``--compare-reads SIZE KIND`` re-searches a saved ivfpq index, re-ranking with plain reads (as
shipped) and through a memory map of the float16 copy in turns, and adds to its row the p50 of each
and the file-backed RSS the map leaves (``rerank_reads``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, warn_if_busy

RESULTS = ROOT / "benchmarks" / "results" / "scale_index.json"
WORK = ROOT / "benchmarks" / "out" / "scale_index"
SEEDS = WORK / "seeds.npy"
DIM, SUBSPACE, QUERIES, K, CHUNK = 512, 8, 1000, 10, 50_000
LATENCY_QUERIES = 300
PROGRESS_EVERY = 20
BUILD_THREADS = 2
"""FAISS threads while building (training, adding, tuning); every search measured runs on one."""
PROBE_EVERY_S = 0.05
FLAT_MAX_GB = 4.0
"""Flat and HNSW hold every float32 vector in RAM: run them only up to this much."""


# -- seeds ------------------------------------------------------------------------------
def real_seeds() -> np.ndarray:
    """The 4,092 real vectors (see the module docstring), cached in benchmarks/out."""
    if SEEDS.is_file():
        return np.load(SEEDS)
    import torch

    from finegrain.config import build_config
    from finegrain.data.module import split_for
    from finegrain.inference.encoder import Encoder
    from finegrain.models.build import build_from_config
    from finegrain.retrieval.gallery import embed_records

    root = ROOT.parent / "shared" / "data" / "stanford_cars"
    if not (root / "devkit").is_dir():
        sys.exit(f"real data not found at {root}")
    torch.set_num_threads(1)
    cfg = build_config(
        {
            "name": "seeds",
            "task": "knn",
            "data": {
                "root": str(root),
                "protocol": "retrieval",
                "image_size": [96, 128],
                "num_workers": 0,
                "batch_size": 64,
            },
            "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "head": "embedding"},
        }
    )
    records = split_for(cfg.data).test
    model = build_from_config(cfg, None)
    feats = embed_records(Encoder.of_model(model, cfg, "32"), records).features
    x = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    seeds = x @ vt[:DIM].T
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    WORK.mkdir(parents=True, exist_ok=True)
    np.save(SEEDS, seeds.astype(np.float32))
    return seeds.astype(np.float32)


class Generator:
    """N vectors grown from the seeds (module docstring), chunk by chunk, reproducibly."""

    def __init__(self, seeds: np.ndarray, n: int) -> None:
        self.seeds, self.n, self.passes = seeds, n, 0
        rng = np.random.default_rng(12345)
        g = rng.standard_normal((len(seeds), DIM, SUBSPACE)).astype(np.float32)
        self.bases = np.linalg.qr(g)[0].transpose(0, 2, 1).copy()  # [S, 8, 512] orthonormal rows
        d = 2 - 2 * seeds @ seeds.T
        np.fill_diagonal(d, np.inf)
        self.sigma = float(0.5 * np.median(np.sqrt(np.maximum(d.min(1), 0))) / np.sqrt(SUBSPACE))

    def _make(self, owners: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((len(owners), SUBSPACE)).astype(np.float32) * self.sigma
        x = self.seeds[owners]
        # one small product per seed: gathering a basis per row would take 16 KB a vector
        for s in np.unique(owners):
            at = np.flatnonzero(owners == s)
            x[at] += z[at] @ self.bases[s]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunk(self, c: int) -> np.ndarray:
        lo, hi = c * CHUNK, min(self.n, (c + 1) * CHUNK)
        owners = (np.arange(lo, hi, dtype=np.int64) * len(self.seeds)) // self.n
        return self._make(owners, np.random.default_rng([7, c]))

    def chunks(self):
        """Every chunk in order; progress (wall and CPU seconds, resident memory) goes to stderr as
        they come."""
        self.passes += 1
        total = (self.n + CHUNK - 1) // CHUNK
        t0, c0 = time.perf_counter(), time.process_time()
        for c in range(total):
            if c % PROGRESS_EVERY == 0 or c == total - 1:
                mem = memory_status()
                print(
                    f"[{time.strftime('%H:%M:%S')}] pass {self.passes}: chunk {c}/{total}, "
                    f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU, "
                    f"RSS anon {mem.get('anon', 0):.3f} GB file {mem.get('file', 0):.3f} GB",
                    file=sys.stderr,
                    flush=True,
                )
            yield self.chunk(c)

    def queries(self) -> np.ndarray:
        rng = np.random.default_rng(99)
        return self._make(rng.integers(0, len(self.seeds), QUERIES), rng)


def data_for(size: str) -> tuple[int, object, np.ndarray]:
    """(n, a callable giving the chunks, queries) of a size: an integer, or ``real``."""
    seeds = real_seeds()
    if size == "real":
        order = np.random.default_rng(0).permutation(len(seeds))
        base, queries = seeds[order[QUERIES:]], seeds[order[:QUERIES]]
        return len(base), lambda: iter([base]), queries
    gen = Generator(seeds, int(size))
    return gen.n, gen.chunks, gen.queries()


# -- one measurement per process --------------------------------------------------------------
def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, not at the
    parent's size; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def memory_status() -> dict[str, float]:
    """This process's resident memory now, in GB: ``anon`` (heap, arrays: what it must hold),
    ``file`` (pages of mapped files: page cache the kernel may reclaim), ``hwm`` (VmHWM: the peak of
    their sum so far); empty where /proc is absent."""
    fields = {"RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "hwm"}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {fields[f[0]]: round(int(f[1]) / 2**20, 3) for f in (line.split() for line in lines) if f and f[0] in fields}


class MemoryProbe:
    """Samples :func:`memory_status` every :data:`PROBE_EVERY_S` in a thread and keeps, per phase
    (named by :meth:`phase`), the peaks of anonymous, file-backed and total RSS, and the RSS when the
    phase ended."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now = memory_status()
        with self._lock:
            if self._name is None or not now:
                return
            row = self.phases.setdefault(self._name, {"peak_anon_gb": 0.0, "peak_file_gb": 0.0, "peak_rss_gb": 0.0})
            row["peak_anon_gb"] = max(row["peak_anon_gb"], now["anon"])
            row["peak_file_gb"] = max(row["peak_file_gb"], now["file"])
            row["peak_rss_gb"] = max(row["peak_rss_gb"], round(now["anon"] + now["file"], 3))
            row["end_anon_gb"], row["end_file_gb"] = now["anon"], now["file"]

    def _run(self) -> None:
        while not self._stop.wait(PROBE_EVERY_S):
            self._sample()

    def phase(self, name: str | None) -> None:
        """End the current phase (sampled once more) and start ``name`` (None: stop)."""
        self._sample()
        with self._lock:
            self._name = name
        self._sample()
        if name is None:
            self._stop.set()
            self._thread.join()


def truth(size: str) -> Path:
    """Exact top-10 of the queries (streaming brute force), saved for the index processes."""
    from finegrain.retrieval.large_index import streaming_knn

    path = WORK / f"truth-{size}.npy"
    marker = path.with_suffix(".part")
    if not path.is_file() and marker.is_file() and Path(f"/proc/{marker.read_text().strip()}").exists():
        while not path.is_file():  # another process of ours computes it: wait for it
            time.sleep(10)
    if not path.is_file():
        marker.write_text(str(os.getpid()))
        _, chunks, queries = data_for(size)
        t0 = time.perf_counter()
        _, ids = streaming_knn(queries, chunks(), K, "cosine")  # type: ignore[operator]
        np.save(path.with_suffix(".tmp.npy"), ids)
        os.replace(path.with_suffix(".tmp.npy"), path)
        marker.unlink(missing_ok=True)
        log(f"ground truth of {size}: {time.perf_counter() - t0:.0f} s")
    return path


def measure(size: str, kind: str) -> dict:
    import faiss

    from finegrain.retrieval.index import recall_at_k
    from finegrain.retrieval.large_index import build_ivfpq

    faiss.omp_set_num_threads(BUILD_THREADS)
    n, chunks, queries = data_for(size)
    folder = WORK / f"{kind}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    rss_at_start = peak_rss_gb()  # imports, seeds, queries and ground truth: before any index
    probe = MemoryProbe()
    t0 = time.perf_counter()
    extra: dict = {}
    if kind.startswith("ivfpq"):  # ivfpq-disk: the same with its lists on disk (memory-mapped)
        vectors = folder / "vectors.f16.npy"
        index = build_ivfpq(
            chunks,  # type: ignore[arg-type]
            n,
            DIM,
            "cosine",
            vectors,
            on_disk=kind == "ivfpq-disk",
            on_phase=probe.phase,
        )
        probe.phase("write")
        faiss.write_index(index.ivf, str(folder / "index.faiss"))  # streamed: no second copy in RAM
        in_ram = (folder / "index.faiss").stat().st_size  # the codes, or (on disk) where the lists lie
        file_bytes = in_ram + index.params.get("lists_bytes", 0) + vectors.stat().st_size
        extra = {"ram_bytes_per_vector": round(in_ram / n, 2), "params": index.params}
    else:
        probe.phase("add")
        index = faiss.IndexFlatIP(DIM) if kind == "flat" else faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            index.hnsw.efConstruction, index.hnsw.efSearch = 40, 128
            extra = {"params": {"M": 32, "efConstruction": 40, "efSearch": 128}}
        for c in chunks():  # type: ignore[operator]
            index.add(c)
        faiss.write_index(index, str(folder / "index.faiss"))  # streamed: no second copy in RAM
        file_bytes = (folder / "index.faiss").stat().st_size
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    exact = np.load(truth(size))  # computed beside the build when that was started apart
    probe.phase("search")
    _, ids = index.search(queries, K)
    recall = recall_at_k(ids, exact)
    probe.phase("latency")
    times = []
    for q in queries[:LATENCY_QUERIES]:
        t = time.perf_counter()
        index.search(q[None], K)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    probe.phase(None)
    return {
        "vectors": n,
        "data": "real" if size == "real" else "generated",
        "kind": kind,
        "recall_at_10": round(recall, 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "peak_rss_gb": peak_rss_gb(),
        "peak_anon_gb": max(p["peak_anon_gb"] for p in probe.phases.values()),
        "rss_before_build_gb": rss_at_start,
        "memory_by_phase": probe.phases,
        "build_s": round(build_s, 1),
        "build_threads": BUILD_THREADS,
        "bytes_per_vector": round(file_bytes / n, 2),
        **extra,
    }


def compare_reads(size: str, kind: str, params: dict) -> dict:
    """The saved ``kind`` index of ``size`` re-ranking its candidates two ways in this process, on
    one thread: reading their float16 rows with plain reads (as shipped) and gathering them through
    a memory map of the copy (as before). The page cache is warmed by one pass of the reads first;
    then the latency queries alternate between the two, and the 1,000 queries run once more
    through the map: the file-backed RSS each way leaves, and the p50 of each."""
    import faiss

    from finegrain.retrieval.large_index import VECTORS_FILE, RerankedIVFPQ

    faiss.omp_set_num_threads(1)
    folder = WORK / f"{kind}-{size}"
    _, _, queries = data_for(size)
    ivf = faiss.read_index(str(folder / "index.faiss"))
    index = RerankedIVFPQ(ivf, "cosine", dict(params), vectors=np.load(folder / VECTORS_FILE, mmap_mode="r"))
    mapped = index.vectors
    assert mapped is not None
    rerank = max(K, int(params["rerank"]))

    def through_map(q: np.ndarray) -> np.ndarray:
        _, cand = index.ivf.search(q, rerank)
        v = np.asarray(mapped[np.where(cand >= 0, cand, 0).reshape(-1)], dtype=np.float32)
        scores = v.reshape(len(q), -1, DIM) @ q[0]
        return cand[0][np.argsort(-scores[0])[:K]]

    def timed(search, q: np.ndarray) -> float:
        t = time.perf_counter()
        search(q)
        return (time.perf_counter() - t) * 1000

    index.search(queries, K)  # warms the page cache with every candidate's rows
    start = memory_status()
    ms: dict[str, list[float]] = {"reads": [], "map": []}
    for q in queries[:LATENCY_QUERIES]:
        ms["reads"].append(timed(lambda one: index.search(one, K), q[None]))
        ms["map"].append(timed(through_map, q[None]))
    for q in queries[LATENCY_QUERIES:]:
        through_map(q[None])
    end = memory_status()
    return {
        "queries": len(queries),
        "rerank": rerank,
        "nprobe": int(params["nprobe"]),
        "p50_reads_ms": round(float(np.percentile(ms["reads"], 50)), 3),
        "p50_map_ms": round(float(np.percentile(ms["map"], 50)), 3),
        "file_rss_gb_before": start.get("file"),
        "file_rss_gb_after_map": end.get("file"),
        "note": "file-backed RSS after the reads (and before the map) is the libraries' own",
    }


def child(*args: str) -> subprocess.CompletedProcess:
    """Run this script on ``args`` in a new process; its stderr (progress) goes to a log in WORK."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    logfile = WORK / ("-".join(a.strip("-") for a in args) + ".log")
    log(f"progress in {logfile}")
    with open(logfile, "w") as err:
        done = subprocess.run([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    done.stderr = logfile.read_text()
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["real", "1000000", "10000000"])
    p.add_argument("--kinds", nargs="+", default=["ivfpq", "ivfpq-disk", "flat", "hnsw"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--truth", help="only compute (and save) the ground truth of this size")
    p.add_argument(
        "--no-truth-first",
        action="store_true",
        help="build without waiting for the ground truth (computed apart with --truth)",
    )
    p.add_argument(
        "--compare-reads",
        nargs=2,
        metavar=("SIZE", "KIND"),
        help="re-search the saved index of this size and kind (its row in --out) with reads and through a map",
    )
    a = p.parse_args()
    if a.compare_reads:
        size, kind = a.compare_reads
        result = json.loads(a.out.read_text())
        row = next(r for r in result["rows"] if r.get("size") == size and r["kind"] == kind)
        row["rerank_reads"] = {
            **compare_reads(size, kind, row["params"]),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average": load_average(),
        }
        log(json.dumps(row["rerank_reads"]))
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if a.truth:
        truth(a.truth)
        return
    if a.child:
        print(json.dumps(measure(*a.child)))
        return
    result = {
        "benchmark": "scale_index",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "busy_warning": warn_if_busy(),
        "generator": {
            "seeds": "Cars196 test classes (4,092 images), EfficientNet-Lite0 ImageNet features "
            "at 96x128, PCA to 512-d, L2-normalised",
            "subspace_dim": SUBSPACE,
            "queries": QUERIES,
        },
        "threads": 1,
        "rows": [],
    }
    if a.out.is_file():  # a resumed run keeps the rows it has
        old = json.loads(a.out.read_text())
        result["rows"] = old.get("rows", [])
    WORK.mkdir(parents=True, exist_ok=True)
    real_seeds()
    result["generator"]["sigma"] = Generator(real_seeds(), 10**6).sigma
    for size in a.sizes:
        if not a.no_truth_first:
            log(f"ground truth for {size}")
            done = child("--truth", size)
            if done.returncode != 0:
                sys.exit(f"ground truth failed:\n{done.stderr[-3000:]}")
        for kind in a.kinds:
            if any(r.get("size") == size and r["kind"] == kind for r in result["rows"]):
                continue
            n = 0 if size == "real" else int(size)
            if not kind.startswith("ivfpq") and n * DIM * 4 / 2**30 > FLAT_MAX_GB:
                result["rows"].append(
                    {
                        "size": size,
                        "vectors": n,
                        "data": "generated",
                        "kind": kind,
                        "skipped": f"needs {n * DIM * 4 / 2**30:.0f} GB of RAM for its float32 vectors "
                        f"(more than the {FLAT_MAX_GB:.0f} GB goal)",
                    }
                )
                continue
            log(f"{kind} at {size}")
            done = child("--child", size, kind)
            row = (
                {"size": size, **json.loads(done.stdout)}
                if done.returncode == 0
                else {"size": size, "vectors": n, "kind": kind, "error": done.stderr[-1500:]}
            )
            row["finished_at"], row["load_average"] = datetime.now(UTC).isoformat(timespec="seconds"), load_average()
            log(json.dumps(row))
            result["rows"].append(row)
            result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=2) + "\n")
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
