"""Embedding a run's images, building its gallery index, and answering searches.

:class:`Searcher` holds a run's model and index loaded once; the CLI's ``search``
and the web service both query through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finegrain.data.records import ImageRecord
from finegrain.errors import FinegrainError
from finegrain.runs import RunDir, open_run

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def gallery_records(run: RunDir, gallery: str) -> tuple[list[ImageRecord], list[str], str]:
    """Records of a gallery: a split name of the run's dataset (or ``all``), or an image folder.

    Returns the records, the class names and a description.
    """
    from finegrain.data.module import split_for

    cfg = run.load_config()
    if gallery in SPLITS or gallery == "all":
        split = split_for(cfg.data)
        records = (split.train + split.val + split.test) if gallery == "all" else getattr(split, gallery)
        return records, split.class_names, f"{gallery} split of {cfg.data.root}"
    path = Path(gallery)
    if not path.exists():
        raise FinegrainError(f"gallery '{gallery}' is neither a split ({', '.join(SPLITS)}, all) nor a folder")
    from finegrain.data.detect import open_collection

    coll = open_collection(path)
    return coll.all_records(), coll.class_names, f"all images of {path}"


def embed_records(run: RunDir, records: list[ImageRecord], description: str = "embedding", loaded=None):
    """Embeddings of ``records`` with the run's model (eval transform, the config's precision);
    ``loaded`` is the model when the caller has loaded it already."""
    from finegrain.data.module import eval_loaders
    from finegrain.retrieval.embed import load_model, predict

    loaded = loaded or load_model(run)
    cfg = loaded.cfg
    out = predict(loaded.model, eval_loaders(records, cfg.data), precision=_inference_precision(cfg.train.precision),
                  channels_last=cfg.train.channels_last, tta_flip=cfg.eval.tta_flip, progress=True,
                  description=description)
    return loaded, out


def _inference_precision(p: str) -> str:
    return "32" if p == "16-mixed" and not torch.cuda.is_available() else p


def embed_split(run_path: str | Path, split: str) -> Path:
    """``finegrain embed``: write ``embeddings/<split>.npz`` for a split of the run's dataset."""
    from finegrain.retrieval.embed import save_embeddings

    run = open_run(run_path)
    records, _, _ = gallery_records(run, split)
    loaded, out = embed_records(run, records, f"embedding {split}")
    paths = [str(records[i].path) for i in out.indices]
    return save_embeddings(run, split, out, paths, loaded.checksum)


def saved_split_embeddings(run: RunDir, split: str, records: list[ImageRecord],
                           checksum: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """A split's embeddings as ``evaluate`` or ``embed`` saved them, if this model made them
    from exactly these images; else None."""
    import json

    from finegrain.retrieval.embed import load_embeddings

    meta = run.embeddings / f"{split}.json"
    if split not in SPLITS or not meta.is_file():
        return None
    try:
        if json.loads(meta.read_text()).get("model_checksum") != checksum:
            return None
        emb, labels, paths = load_embeddings(run, split)
    except (OSError, ValueError, KeyError, FinegrainError):
        return None  # damaged or old: embed again
    if sorted(paths) != sorted(str(r.path) for r in records):
        return None
    return emb, labels, paths


def build_index(run_path: str | Path, gallery: str = "test", kind: str = "flat", metric: str = "cosine",
                out_dir: Path | None = None) -> tuple[Path, dict]:
    """``finegrain index``: embed the gallery (or reuse the split's saved embeddings of the same
    model) and save a FAISS index with its metadata."""
    from finegrain.retrieval.embed import load_model
    from finegrain.retrieval.index import GalleryIndex

    run = open_run(run_path)
    records, class_names, description = gallery_records(run, gallery)
    loaded = load_model(run)
    checksum = loaded.checksum
    saved = saved_split_embeddings(run, gallery, records, checksum)
    if saved is not None:
        embeddings, labels, paths = saved
        log.info("reusing the %s embeddings in %s (same model, same images)", gallery, run.embeddings)
    else:
        _, out = embed_records(run, records, "embedding gallery", loaded=loaded)
        embeddings, labels, paths = out.embeddings, out.labels, [str(records[i].path) for i in out.indices]
    index = GalleryIndex.build(embeddings, labels, paths, metric=metric, kind=kind,
                               model_checksum=checksum, class_names=class_names)
    dest = out_dir or run.index
    index.save(dest)
    info = {"n": len(paths), "dim": int(embeddings.shape[1]), "kind": kind, "metric": metric,
            "gallery": description, "approx_recall_at_10": index.meta.get("approx_recall_at_10")}
    return dest, info


@dataclass
class Hit:
    rank: int
    id: int
    label: str
    score: float
    path: str
    same_image: bool = False
    """The gallery image is the query itself: the same pixels at the size the model sees."""


def _same_image(query: Image.Image, path: str, size: tuple[int, int]) -> bool:
    from finegrain.data.images import load_resized, resize_rgb, to_rgb

    try:
        return np.array_equal(resize_rgb(to_rgb(query)[0], size), load_resized(Path(path), size))
    except FinegrainError:  # the gallery file is gone or unreadable: not provably the same
        return False


class Searcher:
    """A run's model and gallery index, loaded once, answering image queries."""

    def __init__(self, run_path: str | Path, index_dir: Path | None = None) -> None:
        from finegrain.data.module import eval_sizes
        from finegrain.retrieval.embed import load_model
        from finegrain.retrieval.index import GalleryIndex

        self.run = open_run(run_path)
        self.loaded = load_model(self.run)
        self.cfg = self.loaded.cfg
        index_dir = index_dir or self.run.index
        if not (index_dir / "meta.json").is_file():
            raise FinegrainError(f"no index in {index_dir} (run `finegrain index {self.run.path}` first)")
        self.index = GalleryIndex.load(index_dir, expected_model_checksum=self.loaded.checksum)
        m = self.loaded.model
        self.sizes = eval_sizes(self.cfg.data)
        self.class_names = self.loaded.class_names
        has_head = getattr(m, "classifier", None) is not None
        self.prediction_source = "classifier" if has_head and self.cfg.task == "classification" else "neighbours"
        """How :meth:`search` names the class: the trained head's probabilities, or the neighbours' vote."""

    @property
    def gallery_size(self) -> int:
        return len(self.index.paths)

    def encode(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """(embedding [1, D], class probabilities [C] or None) of one RGB image."""
        from finegrain.data.images import resize_rgb, to_rgb
        from finegrain.retrieval.embed import autocast_for, forward_tta

        rgb = to_rgb(image)[0]
        outs = []
        with torch.inference_mode(), autocast_for(_inference_precision(self.cfg.train.precision)):
            for size in self.sizes:  # as the gallery was embedded: outputs averaged over the sizes
                x = torch.from_numpy(resize_rgb(rgb, size)).permute(2, 0, 1).unsqueeze(0)  # uint8: the model normalises it
                outs.append({k: v.float() for k, v in forward_tta(self.loaded.model, x, self.cfg.eval.tta_flip).items()})
        out = {k: sum(o[k] for o in outs) / len(outs) for k in outs[0]}
        emb = out.get("embedding", out["features"]).numpy()
        probs = out["logits"].softmax(-1)[0].numpy() if "logits" in out else None
        return emb, probs

    def search(self, image: Image.Image, k: int = 10) -> tuple[list[Hit], list[tuple[str, float]] | None]:
        """The k most similar gallery images and the top-5 classes: a classification run's
        head probabilities, else the share of the k neighbours in each class."""
        if k < 1 or k > self.gallery_size:
            raise FinegrainError(f"k must be between 1 and the gallery size ({self.gallery_size}); got {k}")
        emb, probs = self.encode(image)
        scores, ids = self.index.search(emb, k)
        names = self.index.class_names or self.class_names
        hits = [
            Hit(rank=r + 1, id=int(i), label=_name(names, int(self.index.labels[i])), score=float(s),
                path=self.index.paths[i])
            for r, (s, i) in enumerate(zip(scores[0], ids[0]))
            if i >= 0
        ]
        for h in hits:  # an exact copy scores 1 (cosine) or 0 (L2), up to bf16 rounding: check its pixels
            close = h.score >= 0.999 if self.index.metric == "cosine" else h.score <= 1e-3
            h.same_image = close and _same_image(image, h.path, self.sizes[0])
        if probs is not None and self.prediction_source == "classifier":
            order = np.argsort(-probs)[:5]
            return hits, [(_name(self.class_names, int(c)), float(probs[c])) for c in order]
        # otherwise (kNN and metric-learning runs) the neighbours vote: the share of the k hits per
        # class; a copy of the query in the gallery is flagged on its hit, not counted as a neighbour
        voters = [h for h in hits if not h.same_image] or hits
        votes: dict[str, int] = {}
        for h in voters:
            votes[h.label] = votes.get(h.label, 0) + 1
        ranked = sorted(votes.items(), key=lambda kv: -kv[1])[:5]
        return hits, [(label, n / len(voters)) for label, n in ranked] if voters else None


def _name(names: list[str] | None, label: int) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def contact_sheet(query: Image.Image, hits: list[Hit], out: Path, query_label: str | None = None) -> Path:
    """A PNG of the query and its neighbours, each titled with rank, class and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finegrain.data.images import open_rgb

    n = len(hits) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(query)
    axes.flat[0].set_title("query" + (f"\n{query_label}" if query_label else ""), fontsize=9, fontweight="bold")
    for ax, h in zip(list(axes.flat)[1:], hits):
        try:
            img, _ = open_rgb(h.path)
        except FinegrainError:
            continue
        ax.imshow(img)
        ax.set_title(f"#{h.rank} {h.label[:28]}\nscore {h.score:.3f}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
