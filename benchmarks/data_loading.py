"""Benchmark: training-loader throughput from the prepared cache against decoding the JPEGs.

    python benchmarks/data_loading.py [--quick] [--num-workers 2] [--batch-size 64]
                                      [--images 2000] [--cache-dir DIR] [--out PATH]

For each real dataset in ../shared/data:

- Tiny ImageNet (``tiny-imagenet-200``, 64x64 JPEGs) at 64x64;
- Stanford Cars (``stanford_cars``, 128x96 JPEGs, stratified 50/50 holdout as in the
  ``quick`` profiles) resized to 224x224;

the cache is first built exactly as ``finegrain data prepare`` builds it
(:func:`finegrain.data.module.prepare_for_config`, whole dataset, timed and reported
as a one-off cost). Then the training loader of :class:`FinegrainDataModule` is built
twice from the same config, differing only in the switch ``data.cache``: ``auto``
(the loader finds the prepared memory-mapped cache and reads pixels from it) and
``off`` (every image is decoded and resized from its JPEG). Same records, same
shuffled order, same transforms (``--augment``, default ``plain``), same batch size
and ``data.num_workers``. Each loader runs as finegrain runs it: the decoding loader
in ``--num-workers`` worker processes; the cached one, when it does not augment, in
the main process (one gather from the memory map per batch costs less than sending
the batch from a worker), and then it is also timed forced through the same worker
processes (``cache_in_workers``) to show what that choice gains. Each measurement
makes a fresh loader, discards ``--warmup`` batches (worker start-up, pipeline fill),
then times ``--images`` images; the modes alternate for ``--repeats`` rounds and the
speed-up is the ratio of the median images/s (cache / decode) measured in this same
run. Before timing, a few items of both loaders are compared: cached and decoded
pixels must be identical. To explain the ratio, the per-image cost of each stage
(pixels, pixels + transforms, a whole fetched and collated batch, collation) is also
measured in-process on one thread.

The JPEG files are in the OS page cache (prepare has just read them all), so "decode"
measures decoding and resizing, not disk reads. The cache lives in a temporary
directory removed at the end (or in ``--cache-dir``, never inside the repository);
``FINEGRAIN_CACHE`` is pointed at it so the loaders find it as they would in use.

Results go to ``--out`` (default ``benchmarks/results/data_loading.json``), written
after each dataset.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import load_average, log, machine_info, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "data_loading.json"
SHARED = ROOT.parent / "shared" / "data"

DATASETS: dict[str, dict[str, Any]] = {
    "tiny_imagenet_64": {"root": SHARED / "tiny-imagenet-200", "image_size": [64, 64], "extra": {}},
    "stanford_cars_224": {"root": SHARED / "stanford_cars", "image_size": [224, 224], "extra": {"holdout": 0.5}},
}


def make_config(name: str, spec: dict[str, Any], cache: str, args: argparse.Namespace):
    """The experiment config of one dataset; ``cache`` is the switch under test (``auto`` / ``off``)."""
    from finegrain.config import build_config

    return build_config(
        {
            "name": f"bench-{name}",
            "data": {
                "root": str(spec["root"]),
                "image_size": spec["image_size"],
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "augment": args.augment,
                "cache": cache,
                **spec["extra"],
            },
        }
    )


def in_workers(loader, num_workers: int):
    """The same loader (dataset, sampler, collation) with ``num_workers`` worker processes."""
    from torch.utils.data import DataLoader

    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=loader.sampler,
        collate_fn=loader.collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def time_loader(dm, warmup: int, images: int, workers: int | None = None) -> dict[str, float]:
    """A fresh training loader of ``dm`` (with ``workers`` processes instead of its own choice, if
    given): skip ``warmup`` batches, then time ``images`` images."""
    loader = dm.train_dataloader()
    if workers is not None:
        loader = in_workers(loader, workers)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n = 0
    t0 = time.perf_counter()
    while n < images:
        batch = next(it)
        if batch is not None:
            n += int(batch[0].shape[0])
    seconds = time.perf_counter() - t0
    del it, loader  # shuts the (persistent) workers down before the other mode runs
    gc.collect()
    return {"images": n, "seconds": round(seconds, 4), "images_per_second": round(n / seconds, 1)}


def same_pixels(dm_cache, dm_decode, k: int = 8) -> bool:
    """Whether the first ``k`` training items are identical from the cache and from the JPEGs."""
    import torch

    a, b = dm_cache.train_dataloader().dataset, dm_decode.train_dataloader().dataset
    return all(torch.equal(a[i][0], b[i][0]) for i in range(min(k, len(a))))


def stage_costs(dm_cache, dm_decode, n: int, batch_size: int) -> dict[str, float]:
    """Milliseconds per image of each loader stage, in this process on one thread (as in a worker).

    ``pixels``: the uint8 image (cache row, or JPEG decode + resize); ``item``: pixels plus the
    transforms (augmentation; items stay uint8), one item at a time; ``batch``: a whole batch as
    the loader fetches it (``__getitems__``: one gather from the cache) and collates it into a
    channels-last tensor; ``collate``: the collation alone; ``normalise``: what the loader does not
    do, the model's conversion of a collated uint8 batch to normalised float
    (``FinegrainModel.normalise_input``, once per batch on the training device, here the CPU with
    the process's threads).
    """
    import torch

    from finegrain.data.dataset import collate_skip_bad

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, float] = {}
        for mode, dm in (("cache", dm_cache), ("decode", dm_decode)):
            ds = dm.train_dataloader().dataset
            idx = range(min(n, len(ds)))
            ds.pixels(0), ds[0]  # opens the memory map; first-call overheads
            for stage, fn in (("pixels", ds.pixels), ("item", ds.__getitem__)):
                t0 = time.perf_counter()
                for i in idx:
                    fn(i)
                out[f"{mode}_{stage}_ms"] = round(1000 * (time.perf_counter() - t0) / len(idx), 3)
            batches = [list(idx[k : k + batch_size]) for k in range(0, len(idx), batch_size)]
            t0 = time.perf_counter()
            for b in batches:
                collate_skip_bad(ds.__getitems__(b))
            out[f"{mode}_batch_ms"] = round(1000 * (time.perf_counter() - t0) / len(idx), 3)
        ds = dm_cache.train_dataloader().dataset
        items = ds.__getitems__(list(range(min(batch_size, len(ds)))))
        t0 = time.perf_counter()
        for _ in range(5):
            collate_skip_bad(items)
        out["collate_ms"] = round(1000 * (time.perf_counter() - t0) / (5 * len(items)), 3)
    finally:
        torch.set_num_threads(threads)
    from finegrain.models.model import FinegrainModel

    batch = collate_skip_bad(items)[0]
    model = FinegrainModel(torch.nn.Identity(), 3)
    t0 = time.perf_counter()
    for _ in range(5):
        model.normalise_input(batch)
    out["normalise_ms"] = round(1000 * (time.perf_counter() - t0) / (5 * len(items)), 3)
    return out


def bench_dataset(name: str, spec: dict[str, Any], cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from finegrain.data.module import FinegrainDataModule, cache_for, open_data, prepare_for_config

    cfg_cache = make_config(name, spec, "auto", args)
    cfg_decode = make_config(name, spec, "off", args)

    existed = cache_for(open_data(cfg_cache.data), cfg_cache.data) is not None
    t0 = time.perf_counter()
    lines = prepare_for_config(cfg_cache, cache_dir=cache_dir, workers=args.prepare_workers)
    prepare_s = time.perf_counter() - t0
    log(f"{name}: prepare {prepare_s:.1f} s: {'; '.join(lines)}")

    dm_cache = FinegrainDataModule(cfg_cache)
    dm_decode = FinegrainDataModule(cfg_decode)
    if dm_cache.cache is None:
        raise SystemExit(f"{name}: the loader did not find the prepared cache in {cache_dir}")
    if dm_decode.cache is not None:
        raise SystemExit(f"{name}: data.cache=off still found a cache")
    cache = dm_cache.cache
    npy = cache.path / "images.npy"
    identical = same_pixels(dm_cache, dm_decode) if args.augment == "plain" else None
    log(f"{name}: {len(dm_cache.train_records)} training records; cached == decoded pixels: {identical}")

    stages = stage_costs(dm_cache, dm_decode, 256, args.batch_size)
    log(f"{name}: ms per image in one process: {stages}")

    need = (args.warmup + 1) * args.batch_size + args.images
    if need > len(dm_cache.train_records):
        raise SystemExit(
            f"{name}: {need} images needed per pass but the training split has "
            f"{len(dm_cache.train_records)}; lower --images or --warmup"
        )

    # "cache_in_workers": the cached loader forced through the configured worker processes, which
    # the loader itself avoids for un-augmented cached reads; measured to show why.
    workers_differ = dm_cache.train_dataloader().num_workers != args.num_workers
    modes = ["cache", "decode"] + (["cache_in_workers"] if workers_differ else [])
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for r in range(args.repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            row = time_loader(
                dm_decode if mode == "decode" else dm_cache,
                args.warmup,
                args.images,
                args.num_workers if mode == "cache_in_workers" else None,
            )
            runs[mode].append(row)
            log(
                f"{name}: round {r + 1} {mode:16s} {row['images_per_second']:8.1f} images/s "
                f"({row['images']} images in {row['seconds']:.2f} s)"
            )

    def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
        ips = [row["images_per_second"] for row in rows]
        return {
            "images_per_second_median": round(statistics.median(ips), 1),
            "images_per_second_best": max(ips),
            "runs": rows,
        }

    cache_sum, decode_sum = summary(runs["cache"]), summary(runs["decode"])
    ratio = cache_sum["images_per_second_median"] / decode_sum["images_per_second_median"]
    ratio_best = cache_sum["images_per_second_best"] / decode_sum["images_per_second_best"]
    log(f"{name}: cache / decode = {ratio:.2f}x (median), {ratio_best:.2f}x (best)")
    return {
        "dataset_root": str(spec["root"]),
        "image_size_hw": spec["image_size"],
        "split": "training split of the config (shuffled as in training)",
        "config_data": cfg_cache.data.model_dump(mode="json", exclude={"synthetic", "cache"}),
        "training_records": len(dm_cache.train_records),
        "prepare": {
            "seconds": round(prepare_s, 2),
            "images": len(cache.paths),
            "unreadable": len(cache.bad),
            "images_per_second": round(len(cache.paths) / prepare_s, 1),
            "threads": args.prepare_workers,
            "reused_existing_cache": existed,
            "cache_bytes": npy.stat().st_size,
            "what": "finegrain.data.module.prepare_for_config (= `finegrain data prepare`), whole dataset, one-off",
        },
        "cached_pixels_identical_to_decoded": identical,
        "stage_ms_per_image_one_thread": stages,
        "loader_workers": {
            "cache": dm_cache.train_dataloader().num_workers,
            "decode": dm_decode.train_dataloader().num_workers,
        },
        "cache": cache_sum,
        "decode": decode_sum,
        **({"cache_in_workers": summary(runs["cache_in_workers"])} if workers_differ else {}),
        "speedup_cache_over_decode_median": round(ratio, 2),
        "speedup_cache_over_decode_best": round(ratio_best, 2),
        **(
            {
                "speedup_cache_in_workers_over_decode_median": round(
                    summary(runs["cache_in_workers"])["images_per_second_median"]
                    / decode_sum["images_per_second_median"],
                    2,
                )
            }
            if workers_differ
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 images, 2 warm-up batches, 1 round")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=None, help="images timed per measurement (default 2000, quick 500)")
    ap.add_argument("--warmup", type=int, default=None, help="batches discarded first (default 5, quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of cache/decode (default 5, quick 1)")
    ap.add_argument("--augment", default="plain", choices=["plain", "light", "seed", "strong"])
    ap.add_argument("--prepare-workers", type=int, default=os.cpu_count() or 2, help="threads of the prepare step")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root to use and keep (default: a temporary directory, removed at the end)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.images = args.images or (500 if args.quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 5)

    missing = [str(DATASETS[d]["root"]) for d in args.datasets if not DATASETS[d]["root"].is_dir()]
    if missing:
        print(f"real data not found: {', '.join(missing)} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    temporary = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="finegrain-bench-cache-")) if temporary else args.cache_dir.resolve()
    if cache_dir == ROOT or ROOT in cache_dir.parents:
        print(f"--cache-dir {cache_dir} is inside the repository; use a directory outside it", file=sys.stderr)
        return 2
    os.environ["FINEGRAIN_CACHE"] = str(cache_dir)  # what the loaders look in (default_cache_root)
    os.environ.setdefault("FINEGRAIN_PROGRESS", "0")

    result: dict[str, Any] = {
        "benchmark": "data_loading",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "busy_warning_at_start": warn_if_busy(),
        "settings": {
            "num_workers": args.num_workers,
            "batch_size": args.batch_size,
            "images_timed": args.images,
            "warmup_batches": args.warmup,
            "repeats": args.repeats,
            "augment": args.augment,
            "cache_dir": "temporary directory (removed)" if temporary else str(cache_dir),
        },
        "method": "FinegrainDataModule(cfg).train_dataloader() with data.cache=auto (prepared memory-mapped cache) "
        "vs data.cache=off (JPEG decode + resize); fresh loader per measurement, warm-up batches "
        "discarded; modes alternate; ratio of medians from this run",
        "notes": "wall-clock on a shared 2-core machine; other processes may have been running "
        "(see load averages). JPEGs are in the OS page cache (read by prepare just before).",
        "datasets": {},
    }
    try:
        for name in args.datasets:
            log(f"{name}: {DATASETS[name]['root']} at {DATASETS[name]['image_size']}")
            result["datasets"][name] = bench_dataset(name, DATASETS[name], cache_dir, args)
            result["datasets"][name]["load_average_after"] = load_average()
            atomic_write_json(args.out, result)
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = load_average()
    result["summary"] = {
        name: {
            "cache_images_per_second": d["cache"]["images_per_second_median"],
            "decode_images_per_second": d["decode"]["images_per_second_median"],
            "speedup_cache_over_decode": d["speedup_cache_over_decode_median"],
            "speedup_cache_in_workers_over_decode": d.get("speedup_cache_in_workers_over_decode_median"),
            "prepare_seconds": d["prepare"]["seconds"],
        }
        for name, d in result["datasets"].items()
    }
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    for name, s in result["summary"].items():
        log(
            f"{name}: cache {s['cache_images_per_second']} images/s, decode {s['decode_images_per_second']} "
            f"images/s, speed-up {s['speedup_cache_over_decode']}x; prepare {s['prepare_seconds']} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
