"""Benchmark: do the maps of "why this answer" mean something, and what does explaining cost?

    python benchmarks/explain.py --classifier RUN [--n 500] [--parts classifier,cost,...] [--as KEY] [--out FILE]

Deletion test (Petsiuk et al. 2018, RISE) on ``--n`` seeded test images of the classifier run's data
(Stanford Cars in ../shared/data):

- classifier (the trained run ``--classifier``): the predicted class's probability (and logit),
  before and after removing a share of the pixels ranked by its class activation map (the
  contrastive one the product shows, and the plain CAM);
- retrieval (the ``cars-lite0-knn`` row's model, ImageNet EfficientNet-Lite0 features, nothing
  trained, at its profile's 224x224; the same test images): each query's nearest other image among
  the ``--n`` (cosine), and
  the pair's cosine similarity before and after removing a share of the query's pixels, ranked by
  the query's similarity map against the neighbour.

Removed pixels are replaced by a Gaussian blur of the image (radius 1/8 of its shorter side), not
black. A map is a few cells a side (3x4 for the classifier at 96x128, 7x7 for retrieval at 224x224);
it is resized bilinearly to the image and its pixels ranked. Orders: ``most`` salient first,
``least`` salient first, ``random_map`` (a random map on the model's feature grid, resized and ranked
the same way: the same share removed at random at the map's granularity, in blobs of the same
size), ``random_pixels`` (the same share of scattered single pixels). The goal: the most-salient drop
at 20% at least twice the random drop, judged against ``random_map``, the baseline that removes
what a map of that resolution can point at; ``random_pixels`` is reported beside it, but scattered
blurred pixels are noise over the whole image rather than parts of it removed, and the network
reacts to that noise more than to the same share removed in blobs.

Extra cost: p50 over queries, on the classifier run (ONNX Runtime when exported, one thread), of a
plain search (:meth:`Searcher.search`, k=8, against an index of the ``--n`` images built as
``finegrain index`` builds it, with the images' maps stored) and of an explained one
(:meth:`SearchExplainer.search`: the same search and the maps of the query and its 8 hits, from one
pass of the model); also of the page's on-demand way (a plain search, then ``POST /api/explain``'s
work on the query and the hits: two passes) and of an explained search on an index without stored
maps (the hits run again). The same over HTTP (``http``): the page's requests to a uvicorn server of
the same searcher, a plain ``POST /api/search`` against one with ``explain=1`` (the page with "Why?"
on: one request, one pass) and against two requests (a search, then ``POST /api/explain``: the page
turning "Why?" on after a plain search). Figures are ratios against the plain search measured in the
same run, interleaved query by query.

``--as KEY`` files the classifier part under another key, so a second classifier run's deletion test
sits beside the first's; each part records its run and its data (the run's own test split: the
sampled images are checked to be none of its training images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log, machine_info, pin_threads, warn_if_busy  # noqa: E402
from finegrain.runs import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "explain.json"
FRACTIONS = (0.1, 0.2, 0.4)
ORDERS = ("most", "least", "random_map", "random_pixels")
K_HITS = 8
PARTS = ("classifier", "cost", "retrieval", "imagenet_classifier")


def blurred(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    radius = max(1.0, min(rgb.shape[:2]) / 8)
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def masks(saliency: np.ndarray, grid: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per order, the removal rank of every pixel (0 = removed first), for a [H, W] saliency map."""
    from finegrain.inference.explain import resize_map

    h, w = saliency.shape
    rand_map = resize_map(rng.random(grid).astype(np.float32), (h, w))
    keys = {"most": -saliency, "least": saliency, "random_map": -rand_map, "random_pixels": rng.random((h, w))}
    ranks = {}
    for name, key in keys.items():
        order = np.argsort(key.reshape(-1) + 1e-9 * rng.random(h * w), kind="stable")  # ties broken at random
        r = np.empty(h * w, dtype=np.int64)
        r[order] = np.arange(h * w)
        ranks[name] = r.reshape(h, w)
    return ranks


def deleted_batch(rgb: np.ndarray, blur: np.ndarray, ranks: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
    """Every (order, fraction) version of ``rgb`` as a uint8 batch [N, 3, H, W], and its keys."""
    n = rgb.shape[0] * rgb.shape[1]
    images, keys = [], []
    for order in ORDERS:
        for f in FRACTIONS:
            gone = (ranks[order] < round(f * n))[..., None]
            images.append(np.where(gone, blur, rgb).transpose(2, 0, 1))
            keys.append((order, f))
    return np.stack(images), keys


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def summarise(drops: dict[tuple[str, float], list[float]], n: int) -> dict:
    table = {
        order: {f"{int(f * 100)}%": round(float(np.mean(drops[(order, f)])), 5) for f in FRACTIONS} for order in ORDERS
    }
    most = table["most"]["20%"]
    baseline = table["random_map"]["20%"]
    return {
        "images": n,
        "mean_drop": table,
        "most_over_random_at_20": {
            k: round(most / table[k]["20%"], 3) if table[k]["20%"] > 0 else None
            for k in ("random_map", "random_pixels")
        },
        "goal_2x_met": bool(baseline > 0 and most >= 2 * baseline),
    }


def classifier_deletion(
    encoder, rgbs: list[np.ndarray], rng: np.random.Generator, labels: list[int] | None = None
) -> dict:
    """Both class activation maps (contrastive, the default, and plain), both scores (the predicted
    class's probability and its logit); with ``labels``, the accuracy on these images too."""
    from PIL import Image

    from finegrain.inference.explain import class_activation_map, explain_rgbs

    combos = [(m, s) for m in ("contrastive", "plain") for s in ("probability", "logit")]
    drops = {c: {(o, f): [] for o in ORDERS for f in FRACTIONS} for c in combos}
    base = []
    predicted = []
    for i, rgb in enumerate(rgbs):
        m = explain_rgbs(encoder, [Image.fromarray(rgb)])[0]
        c = int(m.predicted_class or 0)
        predicted.append(c)
        z0 = m.outputs["logits"][0]
        p0 = float(softmax(z0)[c])
        grid = m.maps["class_map"][0].shape[1:]
        blur = blurred(rgb)
        for kind in ("contrastive", "plain"):
            sal = class_activation_map(m, c, size=rgb.shape[:2], contrastive=kind == "contrastive")
            batch, keys = deleted_batch(rgb, blur, masks(sal, grid, rng))
            z = encoder.forward(batch)["logits"]
            for key, zi in zip(keys, z, strict=True):
                drops[(kind, "probability")][key].append(p0 - float(softmax(zi)[c]))
                drops[(kind, "logit")][key].append(float(z0[c] - zi[c]))
        base.append(p0)
        if (i + 1) % 100 == 0:
            log(f"classifier: {i + 1}/{len(rgbs)} images")
    out = {f"{kind}_map_{score}": summarise(drops[(kind, score)], len(rgbs)) for kind, score in combos}
    random_drop = out["contrastive_map_probability"]["mean_drop"]["random_map"]["20%"]
    return {
        **out,
        "goal_2x_met": out["contrastive_map_probability"]["goal_2x_met"],
        "probability_ceiling_over_random_at_20": round(float(np.mean(base)) / random_drop, 3)
        if random_drop > 0
        else None,
        "ceiling_note": "the most a probability drop can be is the probability itself: the mean probability "
        "before removal over the random drop at 20% bounds the probability ratio of any map",
        "maps": "contrastive (the default): (w_c - sum_k p_k w_k) . m; plain: w_c . m",
        "score": "the predicted class's probability (goal) and logit",
        "mean_probability_before": round(float(np.mean(base)), 5),
        **(
            {"accuracy_on_these_images": round(float(np.mean(np.asarray(predicted) == np.asarray(labels))), 4)}
            if labels is not None
            else {}
        ),
    }


def retrieval_deletion(encoder, rgbs: list[np.ndarray], rng: np.random.Generator) -> dict:
    from PIL import Image

    from finegrain.inference.explain import explain_rgbs, similarity_map
    from finegrain.metrics.retrieval import l2_normalize

    maps = []
    for i in range(0, len(rgbs), 16):
        maps += explain_rgbs(encoder, [Image.fromarray(r) for r in rgbs[i : i + 16]])
    emb = np.stack([m.embedding for m in maps])
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    drops: dict[tuple[str, float], list[float]] = {(o, f): [] for o in ORDERS for f in FRACTIONS}
    base = []
    for i, rgb in enumerate(rgbs):
        hit = emb[nearest[i]]
        s0 = float(emb[i] @ hit)
        sal = similarity_map(maps[i], hit, size=rgb.shape[:2])
        grid = maps[i].maps["embedding_map"][0].shape[1:]
        batch, keys = deleted_batch(rgb, blurred(rgb), masks(sal, grid, rng))
        out = encoder.forward(batch)["embedding"]
        for key, e in zip(keys, out, strict=True):
            drops[key].append(s0 - float(l2_normalize(e[None])[0] @ hit))
        base.append(s0)
        if (i + 1) % 100 == 0:
            log(f"retrieval: {i + 1}/{len(rgbs)} images")
    return {
        **summarise(drops, len(rgbs)),
        "score": "cosine similarity of the query and its nearest other image",
        "map": "the query's similarity map against its neighbour's embedding (which parts of the query made "
        "it alike the neighbour); the query's pixels are removed, the neighbour is kept as it is",
        "mean_score_before": round(float(np.mean(base)), 5),
    }


def extra_cost(run: Path, records: list, queries: int, out_dir: Path) -> dict:
    """p50 of plain and explained searches (see the module docstring)."""
    import shutil

    from finegrain.data.images import open_rgb
    from finegrain.inference import open_encoder
    from finegrain.retrieval.explain_search import SearchExplainer
    from finegrain.retrieval.gallery_root import common_root
    from finegrain.retrieval.index import GalleryIndex
    from finegrain.retrieval.searcher import Searcher

    encoder = open_encoder(run)
    out = encoder.encode_records(records, description="indexing the gallery with its maps", maps=True)
    paths = [str(records[i].path) for i in out.indices]
    index = GalleryIndex.build(
        out.embeddings,
        out.labels,
        paths,
        model_checksum=encoder.loaded.checksum,
        class_names=encoder.loaded.class_names,
    )
    index.maps = out.maps
    index.meta["gallery_root"] = str(common_root(paths))
    index.meta["engine"], index.meta["precision"] = encoder.engine, str(encoder.precision)
    index_dir = out_dir / "explain-cost-index"
    index.save(index_dir)
    searcher = Searcher(run, index_dir)
    searcher.share_cores(1)
    explainer = SearchExplainer(searcher)
    stored = searcher.index.maps
    times: dict[str, list[float]] = {k: [] for k in ("plain", "explained", "search_then_explain", "no_stored_maps")}
    for q in range(queries + 2):  # the first two warm the caches (gallery fingerprints, sessions) up
        image = open_rgb(paths[q])[0]
        t0 = time.perf_counter()
        hits, _ = searcher.search(image, K_HITS)
        t1 = time.perf_counter()
        explainer.search(image, K_HITS)
        t2 = time.perf_counter()
        explainer.explain(image, [h.id for h in hits])
        t3 = time.perf_counter()
        searcher.index.maps = None
        explainer.search(image, K_HITS)
        searcher.index.maps = stored
        t4 = time.perf_counter()
        if q >= 2:
            for key, t in zip(times, (t1 - t0, t2 - t1, t1 - t0 + t3 - t2, t4 - t3), strict=True):
                times[key].append(t)
    p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {
        "queries": queries,
        "gallery_images": len(paths),
        "hits_explained": K_HITS,
        "p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "ratio_over_plain": {k: round(v / p50["plain"], 3) for k, v in p50.items() if k != "plain"},
        "goal_1_3x_met": p50["explained"] / p50["plain"] <= 1.3,
        "what": {
            "plain": "Searcher.search, k=8",
            "explained": "SearchExplainer.search: the same search and the maps of the query and its 8 hits, "
            "one pass of the model; hits' maps from the index",
            "search_then_explain": "the page's on-demand way: a plain search, then POST /api/explain's work "
            "(SearchExplainer.explain on the query and the 8 ids: a second pass, of the query)",
            "no_stored_maps": "SearchExplainer.search on an index without maps: the 8 hits run again",
            "not_measured": "the maps' JSON encoding and HTTP transfer (see http)",
        },
        "maps_bytes_per_image": searcher.index.meta["maps"]["bytes_per_image"],
        "maps_grid": searcher.index.meta["maps"]["grid"],
        "engine": searcher.engine,
        "sizes": [list(s) for s in searcher.sizes],
        "tta_flip": searcher.encoder.tta_flip,
    }
    result["http"] = http_cost(searcher, paths, queries)
    shutil.rmtree(index_dir, ignore_errors=True)
    return result


def http_cost(searcher, paths: list[str], queries: int) -> dict:
    """p50 over HTTP (a uvicorn server of ``create_app(searcher)`` in a thread, one keep-alive client)
    of the page's requests: a plain search, an explained one (``explain=1``: one request, one pass),
    and the page's former way (a plain search, then ``POST /api/explain`` for its hits)."""
    import socket
    import threading

    import httpx
    import uvicorn

    from finegrain.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    times: dict[str, list[float]] = {k: [] for k in ("plain", "explained", "search_then_explain")}
    answer_bytes: dict[str, list[int]] = {k: [] for k in times}
    k = {"k": str(K_HITS)}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for q in range(queries + 2):  # the first two warm up
                files = {"image": (Path(paths[q]).name, Path(paths[q]).read_bytes(), "image/jpeg")}
                t0 = time.perf_counter()
                plain = c.post("/api/search", files=files, data=k)
                t1 = time.perf_counter()
                explained = c.post("/api/search", files=files, data={**k, "explain": "1"})
                t2 = time.perf_counter()
                ids = ",".join(str(r["id"]) for r in plain.json()["results"])
                separate = c.post(f"/api/explain?ids={ids}", files=files)
                t3 = time.perf_counter()
                for r in (plain, explained, separate):
                    r.raise_for_status()
                if q >= 2:
                    for key, t in zip(times, (t1 - t0, t2 - t1, t1 - t0 + t3 - t2), strict=True):
                        times[key].append(t)
                    for key, n in zip(
                        answer_bytes,
                        (len(plain.content), len(explained.content), len(plain.content) + len(separate.content)),
                        strict=True,
                    ):
                        answer_bytes[key].append(n)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    p50 = {key: statistics.median(v) * 1000 for key, v in times.items()}
    return {
        "p50_ms": {key: round(v, 2) for key, v in p50.items()},
        "ratio_over_plain": {key: round(v / p50["plain"], 3) for key, v in p50.items() if key != "plain"},
        "goal_1_3x_met": p50["explained"] / p50["plain"] <= 1.3,
        "median_answer_bytes": {key: int(statistics.median(v)) for key, v in answer_bytes.items()},
        "what": {
            "plain": "POST /api/search, k=8, over HTTP to a uvicorn server in the same process (one keep-alive client)",
            "explained": "the page with Why? on: POST /api/search with explain=1, one request, one pass of the model, "
            "the maps of the query and of each hit in the answer as their cells on the model's grid (the page "
            "stretches and colours them)",
            "search_then_explain": "the page turning Why? on after a plain search: POST /api/search, then "
            "POST /api/explain?ids=... for its 8 hits (the query runs again; each hit's query-side map too)",
        },
    }


def run_accuracy(run: Path) -> dict | None:
    """The run's own test figures: metrics.json's top-1 and what it was tested on, else the last epoch's
    validation accuracy in history.csv (None without either)."""
    import csv

    try:
        m = json.loads((run / "metrics.json").read_text())
        return {"top1": round(float(m["classification"]["top1"]), 4), "tested_on": m["tested_on"]["words"]}
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        rows = list(csv.DictReader((run / "history.csv").open()))
        return {"final_validation_accuracy": round(float(rows[-1]["val/acc"]), 4)}
    except (OSError, KeyError, ValueError, IndexError):
        return None


def held_out_records(cls, n: int, rng: np.random.Generator) -> tuple[list, dict]:
    """``n`` seeded images of the run's own test split (its config's split of its data, as training made
    it), checked to be none of its training or validation images; and the facts of the split."""
    from finegrain.data.module import split_for

    data = cls.cfg.data
    if not Path(data.root).is_dir():
        sys.exit(f"skipped: {data.root} not found (the benchmark needs ../shared/data)")
    split = split_for(data)
    records = [split.test[i] for i in rng.choice(len(split.test), size=min(n, len(split.test)), replace=False)]
    seen = {str(r.path) for r in [*split.train, *split.val]}
    if any(str(r.path) in seen for r in records):
        sys.exit("the test split shares images with the training split: not a held-out test")
    return records, {
        "root": Path(data.root).name,
        "protocol": data.protocol,
        "holdout": data.holdout,
        "holdout_fraction": data.holdout_fraction,
        "split_seed": data.split_seed,
        "test_images": len(split.test),
        "train_images": len(split.train),
        "sampled": len(records),
        "sampled_images_in_training": 0,
    }


def run_facts(cls, run: Path) -> dict:
    """What a classifier run is, for the JSON."""
    return {
        "name": cls.loaded.cfg.name,
        "description": cls.cfg.description,
        "backbone": cls.cfg.model.backbone,
        "head": cls.cfg.model.head,
        "engine": cls.engine,
        "sizes": [list(s) for s in cls.sizes],
        "tta_flip": cls.tta_flip,
        "label_smoothing": getattr(cls.cfg.loss, "label_smoothing", None),
        "accuracy": run_accuracy(run),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", type=Path, required=True, help="a trained classification run on Stanford Cars")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--cost-queries", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "explain.json")
    ap.add_argument(
        "--parts",
        default="classifier,cost,retrieval,imagenet_classifier",
        help="which parts to run (comma-separated); the others are kept from --out if it exists",
    )
    ap.add_argument(
        "--as",
        dest="key",
        default="classifier",
        help="the key the classifier part's figures go under (e.g. another run's, beside the first one's)",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    pin_threads(1)
    busy = warn_if_busy()

    from finegrain.data.images import open_rgb, resize_rgb
    from finegrain.inference import open_encoder

    cls = open_encoder(args.classifier)
    rng = np.random.default_rng(0)
    records, split_facts = held_out_records(cls, args.n, rng)
    data = cls.cfg.data

    result: dict = json.loads(args.out.read_text()) if args.out.is_file() and parts != set(PARTS) else {}
    result |= {
        "benchmark": "explain",
        "machine": machine_info(),
        "busy_warning": busy,
        "protocol": "deletion test (RISE): the 10/20/40% most salient pixels, the least salient, or the same share "
        "at random replaced by a Gaussian blur of the image (radius 1/8 of its shorter side); maps resized "
        "bilinearly from the model's grid to the image and their pixels ranked; the goal (most >= 2x random at "
        "20%) judged against random_map: a random map on the same grid, resized and ranked the same way (the same "
        "share removed at random at the map's granularity); random_pixels (scattered single pixels) reported beside",
    }
    if "classifier" in parts:
        size = cls.sizes[0]
        rgbs = [resize_rgb(open_rgb(r.path)[0], size) for r in records]
        log(f"classifier deletion test on {len(rgbs)} images at {size}")
        facts = run_facts(cls, args.classifier)
        cls.sizes = [size]  # the deleted images are at the first size: one size, so the maps are exact
        result[args.key] = {
            **classifier_deletion(cls, rgbs, rng, [r.label for r in records]),
            "run": facts,
            "data": {**split_facts, "deleted_at_size": list(size)},
        }
        atomic_write_json(args.out, result)
        log(str(result[args.key]))

    if "cost" in parts:
        result["extra_cost"] = {
            **extra_cost(args.classifier, records, args.cost_queries, args.out.parent),
            "run": cls.loaded.cfg.name,
        }
        log(str(result["extra_cost"]))
        atomic_write_json(args.out, result)

    if "retrieval" in parts:
        retrieval_part(result, records, data.root, rng)
        atomic_write_json(args.out, result)
    if "imagenet_classifier" in parts:
        imagenet_classifier_part(result, records, data.root, rng)
        atomic_write_json(args.out, result)
    if all(k in result for k in ("classifier", "extra_cost", "retrieval")):
        atomic_write_json(RESULTS, result)
        log(f"wrote {RESULTS}")


def retrieval_part(result: dict, records: list, root: str, rng: np.random.Generator) -> None:
    from finegrain.config import load_config
    from finegrain.data.images import open_rgb, resize_rgb
    from finegrain.inference.encoder import Encoder
    from finegrain.models.build import build_from_config, num_outputs

    data_root = root
    knn_cfg = load_config("cars-lite0-knn", profile="quick", overrides=[f"data.root={data_root}"])
    knn = Encoder.of_model(build_from_config(knn_cfg, num_outputs(knn_cfg, 196)), knn_cfg, "32")
    size = knn.sizes[0]
    rgbs = [resize_rgb(open_rgb(r.path)[0], size) for r in records]
    log(f"retrieval deletion test on {len(rgbs)} images at {size}")
    result["retrieval"] = {
        **retrieval_deletion(knn, rgbs, rng),
        "model": "cars-lite0-knn quick profile: EfficientNet-Lite0 ImageNet features at "
        f"{size[0]}x{size[1]}, nothing trained",
        "sizes": [list(size)],
        "tta_flip": knn.tta_flip,
    }
    log(str(result["retrieval"]))


def imagenet_classifier_part(result: dict, records: list, root: str, rng: np.random.Generator) -> None:
    """The classifier deletion test again with a confident, well-trained classifier: EfficientNet-Lite0
    with its own ImageNet head (1000 classes, from the offline checkpoint), on the same images at
    224x224 (a 7x7 map): does the goal depend on the maps or on the weak thumbnail classifier?"""
    import torch

    from finegrain.config import load_config
    from finegrain.data.images import open_rgb, resize_rgb
    from finegrain.inference.encoder import Encoder
    from finegrain.models.backbones import lite_checkpoint_path
    from finegrain.models.build import build_from_config

    cfg = load_config("cars-lite0-knn", profile="quick", overrides=[f"data.root={root}"])
    model = build_from_config(cfg, 1000)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    state = torch.load(lite_checkpoint_path(0), map_location="cpu", weights_only=True)
    with torch.no_grad():
        head.weight.copy_(state["_fc.weight"])
        head.bias.copy_(state["_fc.bias"])
    encoder = Encoder.of_model(model, cfg, "32")
    size = encoder.sizes[0]
    rgbs = [resize_rgb(open_rgb(r.path)[0], size) for r in records]
    log(f"ImageNet classifier deletion test on {len(rgbs)} images at {size}")
    result["imagenet_classifier"] = {
        **classifier_deletion(encoder, rgbs, rng),
        "model": "EfficientNet-Lite0 with its ImageNet-1k head (offline checkpoint), nothing trained here; "
        "the predicted class is an ImageNet class (sports car, convertible, ...)",
        "sizes": [list(size)],
        "tta_flip": encoder.tta_flip,
    }
    log(str(result["imagenet_classifier"]))


if __name__ == "__main__":
    main()
