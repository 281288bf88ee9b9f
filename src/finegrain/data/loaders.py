"""Data loaders of a config's records: at its sizes, with its augmentation, workers and cache."""

from __future__ import annotations

from torch.utils.data import DataLoader

from finegrain.config import DataConfig
from finegrain.config.schema import eval_sizes
from finegrain.data.dataset import build_loader
from finegrain.data.records import ImageRecord
from finegrain.machine import plan_threads


def bbox_margin(data: DataConfig) -> float | None:
    return data.bbox_margin if data.crop_bbox else None


def make_loader(
    records: list[ImageRecord],
    data: DataConfig,
    train: bool,
    *,
    sampler=None,
    batch_sampler=None,
    batch_size: int | None = None,
    seed: int = 0,
    cache=None,
    size: tuple[int, int] | None = None,
) -> DataLoader:
    """A loader over ``records`` at ``size``, by default the training size (with the config's
    augmentation) or the first evaluation size; ``cache`` is read if it holds that size."""
    return build_loader(
        records,
        size=size or (data.image_size if train else eval_sizes(data)[0]),
        preset=data.augment if train else "plain",
        train=train,
        batch_size=batch_size or (data.batch_size if train else (data.eval_batch_size or data.batch_size)),
        num_workers=plan_threads(data.num_workers)[0],
        sampler=sampler,
        batch_sampler=batch_sampler,
        bbox_margin=bbox_margin(data),
        cache=cache,
        on_bad_image=data.on_bad_image,
        drop_last=False,
        seed=seed,
    )


def eval_loaders(records: list[ImageRecord], data: DataConfig, caches: dict | None = None) -> list[DataLoader]:
    """One evaluation loader per evaluation size (``caches``: prepared caches by size)."""
    return [make_loader(records, data, False, size=s, cache=(caches or {}).get(s)) for s in eval_sizes(data)]
