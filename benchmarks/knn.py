"""Benchmark: kNN classification and gallery index build/query times.

    python benchmarks/knn.py [--out benchmarks/out/knn.json] [--quick]

(a) kNN classification at Stanford Cars scale (8,144 gallery and 8,041 query
    random 2,048-d float32 embeddings, 196 classes, k=10, euclidean, uniform):
    ``finegrain.retrieval.knn.knn_classify`` (exact FAISS search) against
    scikit-learn's ``KNeighborsClassifier(n_neighbors=10)`` fit + predict with its
    default algorithm, as the seed code used it. Predictions must agree.
(b) ``GalleryIndex`` build and query time of flat, HNSW and IVF indexes over
    10^5 and 10^6 512-d vectors (cosine), 1,000 held-out queries, recall@10
    against exact (flat) search. ``--quick`` runs 10^5 only. At 10^6 an index
    kind whose build time, extrapolated from 10^5, exceeds ``--max-build-seconds``
    is skipped and the reason recorded.

The gallery vectors of (b) are a Gaussian mixture (2,000 clusters, L2-normalised),
closer to real embeddings than i.i.d. noise, on which approximate indexes do worst.

Results go to ``--out`` (written after every step, so a partial run keeps what it
measured) and, at the end, are copied to ``benchmarks/results/knn.json``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log  # noqa: E402
from common import machine_info as common_machine_info  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "knn.json"


def machine_info() -> dict:
    """The shared machine description plus the FAISS and scikit-learn builds this benchmark measures."""
    import sklearn

    from finegrain.faiss_import import faiss_blas_core, import_faiss

    faiss = import_faiss()  # first import of faiss: picks OpenBLAS kernels this CPU supports
    return common_machine_info(
        {
            "faiss": getattr(faiss, "__version__", "unknown"),
            "faiss_simd": faiss.get_compile_options().strip(),
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "faiss_openblas_core": faiss_blas_core(),
            "scikit_learn": sklearn.__version__,
        }
    )


def bench_knn(repeats: int) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from finegrain.retrieval.knn import knn_classify

    n_gallery, n_query, dim, classes, k = 8144, 8041, 2048, 196, 10
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    q = rng.standard_normal((n_query, dim), dtype=np.float32)
    yg = rng.integers(0, classes, size=n_gallery)

    ours, ours_inner = [], []
    preds = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds, scores, seconds = knn_classify(g, yg, q, k=k, metric="euclidean", weights="uniform", num_classes=classes)
        ours.append(time.perf_counter() - t0)
        ours_inner.append(seconds)
    log(f"(a) ours: {min(ours):.2f} s (runs {[round(s, 2) for s in ours]})")

    skl = []
    sk_preds = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf = KNeighborsClassifier(n_neighbors=k).fit(g, yg)
        sk_preds = clf.predict(q)
        skl.append(time.perf_counter() - t0)
    fit_method = clf._fit_method  # what algorithm="auto" chose
    log(f"(a) scikit-learn ({fit_method}): {min(skl):.2f} s (runs {[round(s, 2) for s in skl]})")

    agreement = float(np.mean(preds == sk_preds))
    return {
        "setup": {
            "n_gallery": n_gallery,
            "n_query": n_query,
            "dim": dim,
            "classes": classes,
            "k": k,
            "metric": "euclidean",
            "weights": "uniform",
            "data": "i.i.d. standard normal float32",
            "repeats": repeats,
        },
        "finegrain_knn_classify": {
            "seconds_min": round(min(ours), 4),
            "seconds_median": round(statistics.median(ours), 4),
            "seconds_runs": [round(s, 4) for s in ours],
            "reported_search_vote_seconds": [round(s, 4) for s in ours_inner],
            "method": "faiss exact search (faiss.knn, L2) + bincount vote",
        },
        "sklearn_kneighbors": {
            "seconds_min": round(min(skl), 4),
            "seconds_median": round(statistics.median(skl), 4),
            "seconds_runs": [round(s, 4) for s in skl],
            "call": "KNeighborsClassifier(n_neighbors=10).fit(gallery).predict(queries)",
            "algorithm_chosen": fit_method,
        },
        "speedup_min_over_min": round(min(skl) / min(ours), 2),
        "speedup_median_over_median": round(statistics.median(skl) / statistics.median(ours), 2),
        "prediction_agreement": agreement,
        "n_disagreements": int(np.sum(preds != sk_preds)),
        "score_rows_sum_to_one": bool(np.allclose(scores.sum(1), 1.0, atol=1e-5)),
    }


# ----------------------------------------------------------------------------- (b)
def mixture(
    n: int, dim: int, centers: np.ndarray, rng: np.random.Generator, noise: float = 1.0, chunk: int = 100_000
) -> np.ndarray:
    """``n`` L2-normalised vectors around random ``centers`` (cosine ~0.5 within a cluster, ~0 across)."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        idx = rng.integers(0, len(centers), size=m)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        block *= noise
        block += centers[idx]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s : s + m] = block
    return out


def time_queries(index, q: np.ndarray, k: int, single: int) -> tuple[float, float, np.ndarray]:
    """(batch seconds for all queries, median single-query latency in ms, ids)."""
    t0 = time.perf_counter()
    _, ids = index.search(q, k)
    batch = time.perf_counter() - t0
    lat = []
    for i in range(single):
        t0 = time.perf_counter()
        index.search(q[i : i + 1], k)
        lat.append(time.perf_counter() - t0)
    return batch, 1000 * statistics.median(lat), ids


def bench_index_size(n: int, dim: int, n_queries: int, kinds: list[str], skip: dict[str, str], single: int) -> dict:
    from finegrain.retrieval.index import GalleryIndex, recall_at_k

    rng = np.random.default_rng(n)
    centers = rng.standard_normal((2000, dim), dtype=np.float32)
    t0 = time.perf_counter()
    x = mixture(n, dim, centers, rng)
    q = mixture(n_queries, dim, centers, rng)
    log(f"(b) n={n}: generated data in {time.perf_counter() - t0:.1f} s")
    labels = np.zeros(n, dtype=np.int64)
    paths = [""] * n
    k = 10
    out: dict = {"n": n, "dim": dim, "n_queries": n_queries, "k": k, "metric": "cosine", "kinds": {}}
    exact_ids = None
    for kind in kinds:
        if kind in skip:
            out["kinds"][kind] = {"skipped": skip[kind]}
            log(f"(b) n={n} {kind}: skipped ({skip[kind]})")
            continue
        t0 = time.perf_counter()
        idx = GalleryIndex.build(
            x, labels, paths, metric="cosine", kind=kind, model_checksum="benchmark", measure_recall=False
        )
        build_total = time.perf_counter() - t0
        batch, single_ms, ids = time_queries(idx, q, k, single)
        if kind == "flat":
            exact_ids = ids
        recall = recall_at_k(ids, exact_ids) if exact_ids is not None else None
        row = {
            "build_seconds": round(idx.meta["build_seconds"], 3),
            "build_seconds_incl_normalise": round(build_total, 3),
            "query_seconds_batch": round(batch, 4),
            "query_ms_per_query_batched": round(1000 * batch / n_queries, 4),
            "query_ms_single_median": round(single_ms, 4),
            "single_queries_timed": single,
            "recall_at_10_vs_exact": None if recall is None else round(recall, 4),
            "params": idx.meta["params"],
        }
        out["kinds"][kind] = row
        log(
            f"(b) n={n} {kind}: build {row['build_seconds']:.1f} s, 1000 queries {batch:.2f} s, "
            f"single {single_ms:.2f} ms, recall@10 {row['recall_at_10_vs_exact']}"
        )
        del idx
        gc.collect()
    return out


def extrapolate(kind: str, seconds_small: float, n_small: int, n_big: int) -> float:
    """Rough build-time extrapolation: HNSW ~ n log n, IVF ~ training on a capped sample + assignment ~ n^1.5."""
    r = n_big / n_small
    if kind == "hnsw":
        return seconds_small * r * math.log(n_big) / math.log(n_small)
    if kind == "ivf":  # nlist ~ sqrt(n): training sample ~ 64 nlist and assignment n * nlist
        return seconds_small * r**1.5
    return seconds_small * r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "knn.json")
    ap.add_argument("--quick", action="store_true", help="index benchmark at 10^5 only")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the kNN comparison (a)")
    ap.add_argument(
        "--max-build-seconds",
        type=float,
        default=600.0,
        help="skip an index kind at 10^6 whose extrapolated build time exceeds this",
    )
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args(argv)

    result: dict = {
        "benchmark": "knn",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "notes": "wall-clock seconds on a shared machine; other processes may have been running "
        "(see load averages). Repeated runs: min and median reported.",
    }

    def save() -> None:
        atomic_write_json(args.out, result)

    save()
    if not args.skip_knn:
        log("(a) kNN classification at Stanford Cars scale")
        result["knn_classification"] = bench_knn(args.repeats)
        save()

    if not args.skip_index:
        kinds = ["flat", "hnsw", "ivf"]
        result["index"] = {
            "data": "Gaussian mixture of 2,000 clusters, L2-normalised, 512-d; "
            "1,000 held-out queries from the same mixture; cosine (inner product)",
            "sizes": [],
        }
        small = bench_index_size(100_000, 512, 1000, kinds, {}, single=200)
        result["index"]["sizes"].append(small)
        save()
        if args.quick:
            result["index"]["skipped_sizes"] = {"1000000": "--quick"}
        else:
            big = 1_000_000
            skip = {}
            estimates = {}
            for kind in kinds:
                est = extrapolate(kind, small["kinds"][kind]["build_seconds"], small["n"], big)
                estimates[kind] = round(est, 1)
                if est > args.max_build_seconds:
                    skip[kind] = (
                        f"extrapolated build time {est:.0f} s from {small['kinds'][kind]['build_seconds']:.1f} s "
                        f"at 10^5 exceeds --max-build-seconds={args.max_build_seconds:.0f}"
                    )
            result["index"]["extrapolated_build_seconds_1e6"] = estimates
            log(f"(b) extrapolated build seconds at 10^6: {estimates}")
            result["index"]["sizes"].append(bench_index_size(big, 512, 1000, kinds, skip, single=50))
            save()

    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    save()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != RESULTS.resolve():
        shutil.copyfile(args.out, RESULTS)
    log(f"wrote {args.out} and {RESULTS}")

    knn = result.get("knn_classification")
    if knn is not None and knn["prediction_agreement"] != 1.0:
        print(f"ERROR: predictions differ from scikit-learn on {knn['n_disagreements']} queries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
