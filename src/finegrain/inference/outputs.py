"""What encoding gives, and how sizes are combined: shared by both engines, without PyTorch
(the ONNX engine serves on installs that have no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from finegrain.config.schema import (
    ExperimentConfig,
    eval_sizes,  # noqa: F401 - where the ONNX engine finds it
)
from finegrain.data.images import resize_rgb
from finegrain.errors import FinegrainError
from finegrain.progress import track

PASS_IMAGES = 32
"""Images in one forward pass, mirrors included: a loader's batch is run in slices of this many.
Activations grow with the batch: Lite0 at 288x384 peaked at 8.2 GB of memory for 64 images and
their mirrors in one ONNX Runtime pass, 1.8 GB for 32 (and ran no slower)."""


@dataclass
class Outputs:
    """Model outputs over records, in record order (unreadable images dropped)."""

    labels: np.ndarray  # [N] int
    indices: np.ndarray  # [N] index into the records
    features: np.ndarray  # [N, feature_dim] float32
    embeddings: np.ndarray  # [N, D] float32 (the embedding head, else the features)
    logits: np.ndarray | None  # [N, C] float32 when the model has a classifier
    seconds: float  # wall time of the forward passes
    maps: np.ndarray | None = None
    """[N, D, h, w] float16 embedding maps on the first size's grid (``maps=True``; see
    :func:`finegrain.inference.explain.embedding_grid`)."""

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("nan")

    def arrays(self) -> dict[str, np.ndarray]:
        """The outputs by name, as :meth:`Encoder.forward` gives them."""
        d = {"features": self.features, "embedding": self.embeddings}
        if self.logits is not None:
            d["logits"] = self.logits
        return d


def named_outputs(out: dict) -> dict[str, np.ndarray]:
    """A model's outputs (arrays by name) as both engines give them: ``features``, ``embedding``
    (the features when the model has no embedder) and, with a classifier, ``logits``; float32."""
    res = {
        "features": np.asarray(out["features"], dtype=np.float32),
        "embedding": np.asarray(out.get("embedding", out["features"]), dtype=np.float32),
    }
    if "logits" in out:
        res["logits"] = np.asarray(out["logits"], dtype=np.float32)
    return res


def mean_of_halves(both: dict, n: int) -> dict:
    """Flip averaging: outputs of a batch of ``n`` images followed by their mirrors, averaged
    pairwise (torch tensors or numpy arrays alike)."""
    return {k: (v[:n] + v[n:]) / 2 for k, v in both.items()}


def mean_over_sizes(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Multi-scale testing: the outputs of the same images at each size, averaged."""
    return {k: np.mean([o[k] for o in outs], axis=0).astype(np.float32) for k in outs[0]}


class ModelFacts(Protocol):
    """What an engine says about the model it runs (a run's checkpoint, or its ONNX export)."""

    cfg: ExperimentConfig
    class_names: list[str]
    checkpoint: Path
    checksum: str

    @property
    def has_classifier(self) -> bool: ...


class EncodingLoop:
    """What both engines do alike over records: one loader per size, batches in order, bad images
    skipped, outputs averaged over sizes. An engine defines ``sizes``, ``cfg``, ``forward(x)`` (one
    uint8 batch ``[B, 3, H, W]`` to float32 arrays), ``prepare(loader)`` (its threads beside the
    loader's workers), ``use_threads(n)`` (each query's threads when serving), ``loaded``,
    ``tta_flip``, ``precision`` and ``engine``."""

    sizes: list[tuple[int, int]]
    cfg: ExperimentConfig
    loaded: ModelFacts
    tta_flip: bool
    precision: str
    engine: str

    @property
    def has_classifier(self) -> bool:
        return self.loaded.has_classifier

    def signature(self) -> dict:
        """What the vectors depend on besides the model: saved beside embeddings and checked on reuse."""
        return {
            "sizes": [list(s) for s in self.sizes],
            "tta_flip": self.tta_flip,
            "precision": self.precision,
            "engine": self.engine,
        }

    def prepare(self, loader) -> None:
        """Get ready to run ``loader``'s batches (threads beside its worker processes)."""

    def use_threads(self, threads: int) -> None:
        """Run each later :meth:`forward` on ``threads`` intra-op threads (a server running
        several queries at once shares the cores out this way)."""
        raise NotImplementedError

    def forward(self, x) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode_rgb(self, rgb) -> dict[str, np.ndarray]:
        """One RGB image (Pillow), resized to every size as its gallery was: outputs ``[1, ...]``."""

        return mean_over_sizes([self.forward(resize_rgb(rgb, size).transpose(2, 0, 1)[None]) for size in self.sizes])

    def encode_rgbs(self, rgbs: list) -> dict[str, np.ndarray]:
        """:meth:`encode_rgb` of several images in batched passes (:data:`PASS_IMAGES` a pass, mirrors
        included): outputs ``[len(rgbs), ...]`` in their order."""
        step = max(1, PASS_IMAGES // (2 if self.tta_flip else 1))
        per_size = []
        for size in self.sizes:
            outs = [
                self.forward(np.stack([resize_rgb(im, size).transpose(2, 0, 1) for im in rgbs[i : i + step]]))
                for i in range(0, len(rgbs), step)
            ]
            per_size.append({k: np.concatenate([o[k] for o in outs]) for k in outs[0]})
        return mean_over_sizes(per_size)

    def forward_maps(self, x) -> dict[str, np.ndarray]:
        """:meth:`forward`'s outputs and the maps of :mod:`finegrain.inference.explain`."""
        raise NotImplementedError

    def encode_records(
        self, records, caches: dict | None = None, description: str = "encoding", maps: bool = False
    ) -> Outputs:
        """Every record at every size (``caches``: prepared caches by size), outputs averaged over sizes;
        with ``maps``, each image's embedding map too (every size's resized to the first size's grid
        and averaged, float16)."""
        from finegrain.data.module import eval_loaders  # the loaders are torch's: embedding a split needs it

        loaders = eval_loaders(records, self.cfg.data, caches)
        runs = []
        for loader, size in zip(loaders, self.sizes, strict=True):
            what = description + (f" at {size[0]}x{size[1]}" if len(self.sizes) > 1 else "")
            runs.append(self.run_loader(loader, what, maps))
        first = runs[0]
        if any(not np.array_equal(r.indices, first.indices) for r in runs[1:]):
            raise FinegrainError("the loaders of the evaluation sizes gave different images")
        if len(runs) == 1:
            return first
        mean = mean_over_sizes([r.arrays() for r in runs])
        grid_maps = None
        per_size = [r.maps for r in runs if r.maps is not None]
        if per_size:
            # start-up: deferred until this runs (explain imports this module)
            from finegrain.inference.explain import embedding_grid

            grid = (per_size[0].shape[2], per_size[0].shape[3])
            grid_maps = np.stack(
                [embedding_grid([m[i].astype(np.float32) for m in per_size], grid) for i in range(len(first.labels))]
            ).astype(np.float16)
        return Outputs(
            labels=first.labels,
            indices=first.indices,
            features=mean["features"],
            embeddings=mean["embedding"],
            logits=mean.get("logits"),
            seconds=sum(r.seconds for r in runs),
            maps=grid_maps,
        )

    def run_loader(self, loader, description: str = "encoding", maps: bool = False) -> Outputs:
        """Outputs of one loader's batches (one size), in its order; bad images (None batches) skipped;
        with ``maps``, the embedding maps too (float16)."""

        self.prepare(loader)
        labels: list[np.ndarray] = []
        indices: list[np.ndarray] = []
        outs: list[dict[str, np.ndarray]] = []
        seconds = 0.0
        step = max(1, PASS_IMAGES // (2 if self.tta_flip else 1))  # images per pass, before their mirrors
        for batch in track(loader, len(loader), description):
            if batch is None:
                continue
            x, y, idx = batch
            t0 = time.perf_counter()
            outs.extend(self._forward_kept(x[i : i + step], maps) for i in range(0, len(x), step))
            seconds += time.perf_counter() - t0
            labels.append(np.asarray(y))
            indices.append(np.asarray(idx))
        if not labels:
            raise FinegrainError("no readable images to run the model on")
        cat = {k: np.concatenate([o[k] for o in outs]).astype(np.float32) for k in outs[0] if k != "embedding_map"}
        return Outputs(
            labels=np.concatenate(labels),
            indices=np.concatenate(indices),
            features=cat["features"],
            embeddings=cat["embedding"],
            logits=cat.get("logits"),
            seconds=seconds,
            maps=np.concatenate([o["embedding_map"] for o in outs]) if maps else None,
        )

    def _forward_kept(self, x, maps: bool) -> dict[str, np.ndarray]:
        """:meth:`forward`, or with ``maps`` :meth:`forward_maps` keeping the embedding map only (float16)."""
        if not maps:
            return self.forward(x)
        out = self.forward_maps(x)
        return {**named_outputs(out), "embedding_map": out["embedding_map"].astype(np.float16)}
