"""Datasets and loaders over image records.

Each item is ``(image [3, H, W] uint8, label, index)``; an unreadable image is
skipped (its item is ``None`` and :func:`collate_skip_bad` drops it, counting it
in a warning) or, with ``on_bad_image="fail"``, stops with the file's name.

Batches are channels-last: ``[B, 3, H, W]`` tensors whose memory is ``[B, H, W, 3]``,
the layout images are decoded and cached in, so neither the loader nor the model
transposes the pixels of un-augmented images. A loader batch reads its cached images
with one gather from the memory map (:meth:`ImageDataset.__getitems__`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from finegrain.data.cache import PreparedCache
from finegrain.data.images import load_resized
from finegrain.data.records import ImageRecord
from finegrain.data.transforms import build_transform
from finegrain.errors import ImageError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(
        self,
        records: list[ImageRecord],
        size: tuple[int, int],
        transform,
        bbox_margin: float | None = None,
        cache: PreparedCache | None = None,
        on_bad_image: str = "skip",
    ) -> None:
        self.records, self.transform = records, transform
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.bbox_margin, self.cache, self.on_bad_image = bbox_margin, cache, on_bad_image

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, i: int):
        """uint8 ``[H, W, 3]`` pixels of record ``i``: from the cache when it holds them, else decoded."""
        r = self.records[i]
        arr = self.cache.get(r) if self.cache is not None else None
        if arr is None:
            box = r.bbox if self.bbox_margin is not None else None
            arr = load_resized(r.path, self.size, box, self.bbox_margin or 0.0)
        return arr

    def _item(self, i: int, arr: np.ndarray):
        x = torch.from_numpy(arr).permute(2, 0, 1)  # CHW view of the HWC pixels: no copy
        if not isinstance(self.transform, v2.Identity):
            x = self.transform(x.contiguous())  # augmentations run fastest on contiguous CHW
        return x, self.records[i].label, i

    def __getitem__(self, i: int):
        try:
            arr = self.pixels(i)
        except ImageError as e:
            if self.on_bad_image == "fail":
                raise
            log.warning("skipping %s", e)
            return None
        return self._item(i, arr)

    def __getitems__(self, indices: list[int]) -> list:
        """The items of a batch (what the DataLoader asks for); the cached ones come from one gather."""
        if self.cache is None:
            return [self[i] for i in indices]
        block, found = self.cache.get_many([self.records[i] for i in indices])
        items: list = [None] * len(indices)
        for row, pos in enumerate(found):
            items[pos] = self._item(indices[pos], block[row])
        cached = set(found)
        for pos, i in enumerate(indices):
            if pos not in cached:  # not in the cache, or recorded unreadable: the one-by-one path says why
                items[pos] = self[i]
        return items


def collate_skip_bad(items):
    """A batch ``(images [B, 3, H, W] channels-last uint8, labels [B], indices [B])`` of the items,
    without the ``None`` items of unreadable images (``None`` if all were)."""
    good = [(x.permute(1, 2, 0), label, i) for x, label, i in (it for it in items if it is not None)]
    if not good:
        return None
    # stacked as [B, H, W, 3] (in shared memory inside a worker): a plain copy of un-augmented items
    images, labels, indices = default_collate(good)
    return images.permute(0, 3, 1, 2), labels, indices


def preflight(records: list[ImageRecord], on_bad_image: str = "skip") -> tuple[list[ImageRecord], list[str]]:
    """A quick check (file exists, non-empty, Pillow recognises the header) before training starts.

    Returns the records that passed and one message per record that did not;
    with ``on_bad_image="fail"`` the first problem raises instead.
    """
    good, problems = [], []
    for r in records:
        try:
            if r.path.stat().st_size == 0:
                raise ImageError(r.path, "empty", "zero-byte file")
            with Image.open(r.path) as im:
                im.verify()
        except ImageError as e:
            problem = e
        except FileNotFoundError:
            problem = ImageError(r.path, "missing", "no such file")
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
            problem = ImageError(r.path, "not-an-image", str(e) or type(e).__name__)
        else:
            good.append(r)
            continue
        if on_bad_image == "fail":
            raise problem
        problems.append(str(problem))
    return good, problems


def build_loader(
    records: list[ImageRecord],
    size: tuple[int, int],
    preset: str,
    train: bool,
    batch_size: int,
    num_workers: int = 0,
    sampler=None,
    batch_sampler=None,
    bbox_margin: float | None = None,
    cache: PreparedCache | None = None,
    on_bad_image: str = "skip",
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``records``; no shuffling here (samplers decide the order)."""
    if cache is not None and tuple(cache.size) != tuple(size):
        cache = None  # a cache holds one size
    transform = build_transform(preset, size, train)
    if cache is not None and isinstance(transform, v2.Identity):
        num_workers = 0  # a gather from the memory map costs less than sending the batch from a worker
    ds = ImageDataset(records, size, transform, bbox_margin, cache, on_bad_image)
    generator = torch.Generator().manual_seed(seed)
    kwargs: dict = dict(
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last, **kwargs)
