"""Training on cached outputs of the frozen stages (``train.frozen_cache_views``).

With ``model.freeze_stages``, the stem and first stages never change, yet every training step
recomputes them. :func:`build_frozen_views` runs them once over every training image in N views
and keeps the outputs in memory (float16 ``[num_images, N, C, H, W]``):

- view 0: the image at ``data.image_size`` (the evaluation transform);
- view 1: its mirror;
- views 2 to N-1: draws of the training augmentation (``data.augment``), seeded.

:func:`frozen_loader` then yields ``(features [B, C, h, w] float16, labels, indices)`` batches
in the order of the usual training sampler: each epoch every image comes as one of its views,
drawn from a generator seeded by (seed, epoch), so a resumed run sees what an unbroken one would.
As a cheap feature-space augmentation each batch is cropped to a random 75-100% of the map's height
and width (one size per batch, a random position per image; global pooling follows, so any size
works), from a generator seeded by (seed, epoch) too.

This module knows no model: the caller passes the frozen prefix as a function of uint8 image
batches (:meth:`finegrain.tasks.base.FinegrainTask.on_fit_start` does, with the training precision).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finegrain.config import DataConfig
from finegrain.data.loaders import make_loader
from finegrain.data.records import ImageRecord
from finegrain.data.transforms import build_transform
from finegrain.errors import ConfigError
from finegrain.machine import set_threads
from finegrain.progress import track
from finegrain.runs import human_bytes

log = logging.getLogger(__name__)

MIN_KEEP = 0.75
"""The feature-map crop keeps a random 75-100% of the height and of the width."""


@dataclass
class FrozenViews:
    """The frozen stages' outputs of the readable training images, in memory."""

    features: np.ndarray
    """float16 ``[num_images, views, C, H, W]``."""
    labels: np.ndarray
    """int64 ``[num_images]``."""
    indices: np.ndarray
    """int64 ``[num_images]``: each image's position among the records given (unreadable ones are skipped)."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def views(self) -> int:
        return self.features.shape[1]


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _allocate(n: int, views: int, shape: tuple[int, ...]) -> np.ndarray:
    need = n * views * math.prod(shape) * 2
    free = _available_bytes()
    if free is not None and need > 0.8 * free:
        raise ConfigError(
            f"train.frozen_cache_views: {views} view(s) of {n} images at {list(shape)} need "
            f"{human_bytes(need)} of memory and {human_bytes(free)} are available; lower "
            "train.frozen_cache_views or data.image_size, or set train.frozen_cache_views: 0"
        )
    log.info(
        "caching the frozen stages' outputs: %d images x %d view(s) x %s float16 = %s",
        n,
        views,
        list(shape),
        human_bytes(need),
    )
    return np.empty((n, views, *shape), dtype=np.float16)


def build_frozen_views(
    records: list[ImageRecord],
    data: DataConfig,
    prefix: Callable[[torch.Tensor], torch.Tensor],
    views: int,
    seed: int,
    cache=None,
) -> FrozenViews:
    """Run ``prefix`` (uint8 images ``[B, 3, H, W]`` to the frozen stages' output) over ``views`` views of
    every readable record (see the module docstring); ``cache``: the prepared cache at ``data.image_size``."""
    if views < 1:
        raise ConfigError(f"train.frozen_cache_views must be 1 or more to build a cache, got {views}")
    if views > 2 and data.augment == "plain":
        log.warning(
            "train.frozen_cache_views: %d with data.augment: plain: views 2 to %d repeat view 0", views, views - 1
        )
    augment = build_transform(data.augment, data.image_size, train=True)
    loader = make_loader(records, data, False, size=data.image_size, cache=cache, seed=seed)
    set_threads(loader.num_workers)  # torch's threads and the decoding workers share the cores
    features: np.ndarray | None = None
    labels, indices, done, t0 = [], [], 0, time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded draws that leave the global RNG as it was
        torch.manual_seed(seed)
        for batch in track(loader, total=len(loader), description="caching the frozen stages"):
            if batch is None:  # every image of the batch was unreadable
                continue
            x, y, idx = batch
            for v in range(views):
                if v == 0:
                    xv = x
                elif v == 1:
                    xv = torch.flip(x, dims=[3])
                else:
                    xv = torch.stack([augment(img.contiguous()) for img in x])
                f = prefix(xv).to("cpu", torch.float16)
                if features is None:
                    features = _allocate(len(records), views, tuple(f.shape[1:]))
                features[done : done + len(f), v] = f.numpy()
            labels.append(y)
            indices.append(idx)
            done += len(x)
    if features is None:
        raise ConfigError("train.frozen_cache_views: no readable training image to cache")
    seconds = time.perf_counter() - t0
    log.info(
        "cached %d view(s) of %d images in %.0f s (%.1f images/s per view)",
        views,
        done,
        seconds,
        done * views / max(seconds, 1e-9),
    )
    return FrozenViews(
        features[:done], torch.cat(labels).numpy().astype(np.int64), torch.cat(indices).numpy().astype(np.int64)
    )


class FrozenViewDataset(Dataset):
    """Item ``i``: (one view of image ``i``'s frozen features, its label, its record index). The view is
    drawn per image per epoch (:meth:`set_epoch`); a batch (``__getitems__``) is also cropped."""

    def __init__(self, frozen: FrozenViews, seed: int = 0, min_keep: float = MIN_KEEP) -> None:
        self.frozen, self.seed, self.min_keep = frozen, int(seed) % 2**63, float(min_keep)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """The views of ``epoch`` and a fresh crop generator: both depend on (seed, epoch) only."""
        self.epoch = int(epoch)
        self.view_of = np.random.default_rng([self.seed, self.epoch]).integers(0, self.frozen.views, len(self))
        self._crop_rng = np.random.default_rng([self.seed, self.epoch, 1])

    def __len__(self) -> int:
        return len(self.frozen)

    def __getitem__(self, i: int):
        f = self.frozen
        return torch.from_numpy(f.features[i, self.view_of[i]]), int(f.labels[i]), int(f.indices[i])

    def __getitems__(self, indices: list[int]):
        """A whole batch ``(features [B, C, h, w], labels [B], indices [B])``, cropped to one random
        size of at least ``min_keep`` of the height and width, at a random position per image."""
        f, rng = self.frozen, self._crop_rng
        idx = np.asarray(indices, dtype=np.int64)
        _, _, c, h, w = f.features.shape
        kh, kw = (int(rng.integers(math.ceil(self.min_keep * s), s + 1)) for s in (h, w))
        tops, lefts = rng.integers(0, h - kh + 1, len(idx)), rng.integers(0, w - kw + 1, len(idx))
        out = np.empty((len(idx), c, kh, kw), dtype=np.float16)
        for row, (i, t, left) in enumerate(zip(idx, tops, lefts, strict=True)):
            out[row] = f.features[i, self.view_of[i], :, t : t + kh, left : left + kw]
        return torch.from_numpy(out), torch.from_numpy(f.labels[idx]), torch.from_numpy(f.indices[idx])


class EpochOrder(Protocol):
    """A sampler with a new order each epoch (torch's DistributedSampler, the m-per-class one)."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class _EpochSampler(Sampler[int]):
    """``sampler``'s order; :meth:`set_epoch` (Lightning calls it each epoch) reaches the dataset too."""

    def __init__(self, sampler: EpochOrder, dataset: FrozenViewDataset) -> None:
        self.sampler, self.dataset = sampler, dataset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _batch_as_is(batch):
    return batch


def frozen_loader(frozen: FrozenViews, sampler: EpochOrder, batch_size: int, seed: int = 0) -> DataLoader:
    """Training batches of cached features in ``sampler``'s order (over ``range(len(frozen))``),
    in the main process: the features are in its memory already."""
    ds = FrozenViewDataset(frozen, seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=_EpochSampler(sampler, ds),
        collate_fn=_batch_as_is,
        num_workers=0,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )
