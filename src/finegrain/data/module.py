"""From a config to data loaders: dataset → protocol split → datasets → loaders.

:class:`FinegrainDataModule` is the Lightning data module every task uses; the
same helpers serve evaluation, embedding extraction and ``data prepare``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from finegrain.config import DataConfig, ExperimentConfig
from finegrain.config.schema import eval_sizes
from finegrain.data.cache import default_cache_root, find_cache, prepare_cache
from finegrain.data.dataset import preflight
from finegrain.data.detect import open_collection
from finegrain.data.frozen_features import FrozenViews, frozen_loader
from finegrain.data.loaders import bbox_margin, eval_loaders, make_loader
from finegrain.data.records import ImageCollection, ImageRecord
from finegrain.data.splits import Split, make_split
from finegrain.data.synth import make_synthetic
from finegrain.errors import DataError

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


def synthetic_root(data: DataConfig, cache_root: Path | None = None) -> Path:
    """The built-in synthetic dataset (Stanford Cars devkit layout), written on first use."""

    s = data.synthetic
    key = hashlib.sha1(json.dumps(s.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]
    root = (cache_root or default_cache_root()) / "synthetic" / key
    marker = root / ".complete"
    if not marker.is_file():
        log.info("writing the built-in synthetic dataset to %s", root)
        make_synthetic(
            root,
            format="stanford_cars",
            num_classes=s.num_classes,
            train_per_class=s.train_per_class,
            test_per_class=s.test_per_class,
            size=s.image_size,
            seed=s.seed,
        )
        marker.write_text("ok\n")
    return root


def dataset_root(data: DataConfig) -> Path:
    return synthetic_root(data) if data.root == SYNTHETIC else Path(data.root).expanduser()


def open_data(data: DataConfig) -> ImageCollection:

    return open_collection(dataset_root(data), format=data.format)


def split_for(data: DataConfig, collection: ImageCollection | None = None) -> Split:
    """The protocol split (train / val / test records) a config asks for."""
    return make_split(
        collection or open_data(data),
        protocol=data.protocol,
        holdout=data.holdout,
        val_fraction=data.val_fraction,
        seed=data.split_seed,
        holdout_fraction=data.holdout_fraction,
    )


def sizes_read(data: DataConfig) -> list[tuple[int, int]]:
    """Every size a config reads images at (what ``data prepare`` caches): training, then evaluation,
    then the progressive-resizing stages'."""
    return list(dict.fromkeys([data.image_size, *eval_sizes(data), *((h, w) for h, w, _ in data.progressive_sizes)]))


def train_size(data: DataConfig, epoch: int) -> tuple[int, int]:
    """The training image size of ``epoch`` (0-based): a ``data.progressive_sizes`` stage's, else ``image_size``."""
    end = 0
    for h, w, n in data.progressive_sizes:
        end += n
        if epoch < end:
            return h, w
    return data.image_size


def cache_for(collection: ImageCollection, data: DataConfig, size: tuple[int, int] | None = None):
    """The prepared cache of the whole dataset at ``size`` (default: the training size), if
    `data prepare` made one."""
    if data.cache == "off":
        return None

    size = size or data.image_size
    return find_cache(collection.all_records(), size, default_cache_root(), bbox_margin(data))


def checked_records(records: list[ImageRecord], data: DataConfig, what: str) -> list[ImageRecord]:
    """Drop files that fail a quick header check, with a warning and a count (or fail)."""

    good, problems = preflight(records, on_bad_image=data.on_bad_image)
    if problems:
        log.warning(
            "%s: skipped %d unreadable image(s) of %d (first: %s); set data.on_bad_image=fail to stop instead",
            what,
            len(problems),
            len(records),
            problems[0],
        )
    return good


class FinegrainDataModule(L.LightningDataModule):
    """Train / val / test loaders for one config (uint8 batches: the model normalises them)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.data
        collection = open_data(d)
        self.collection_format: str = collection.format  # what was detected when the config says "auto"
        self.split: Split = split_for(d, collection)
        log.info("tested on %s", self.split.tested_on)
        self.caches = {size: cache_for(collection, d, size) for size in sizes_read(d)}
        """Prepared caches by (height, width), None where there is none."""
        self.cache = self.caches[d.image_size]
        for (h, w), c in self.caches.items():
            if c is not None:
                log.info("using the prepared cache %s (%dx%d)", c.path, h, w)
            elif d.cache == "auto":
                log.info("no prepared cache at %dx%d: images are decoded (`finegrain data prepare` makes one)", h, w)
        self.train_records = checked_records(self.split.train, d, "train")
        self.val_records = checked_records(self.split.val, d, "val")
        self.test_records = self.split.test
        if not self.train_records:
            raise DataError(f"no usable training images in {dataset_root(d)}")
        self.frozen_views: FrozenViews | None = None
        """``train.frozen_cache_views``: the frozen stages' outputs of the training images, computed by
        the task being fitted (it has the model) when the training loader is first asked for."""

    @property
    def class_names(self) -> list[str]:
        return self.split.class_names

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        if t is None:
            return 1, 0
        return t.world_size, t.global_rank

    def train_dataloader(self) -> DataLoader:
        d, seed = self.cfg.data, self.cfg.train.seed
        if self.cfg.train.frozen_cache_views:  # batches of the frozen stages' outputs, not images
            if self.frozen_views is None:  # first asked for: by the schedule's step count, or the fit loop
                task = getattr(getattr(self, "trainer", None), "lightning_module", None)
                cache_outputs = getattr(task, "cache_frozen_outputs", None)
                if not callable(cache_outputs):
                    raise DataError(
                        "train.frozen_cache_views: the frozen stages' outputs are computed by the task "
                        "being fitted (FinegrainTask.cache_frozen_outputs); there is none"
                    )
                cache_outputs()  # sets self.frozen_views
            views = self.frozen_views
            if views is None:
                raise DataError("train.frozen_cache_views: the task computed no frozen stages' outputs")
            sampler = self._train_sampler(views.labels.tolist())
            return frozen_loader(views, sampler, d.batch_size, seed)
        sampler = self._train_sampler([r.label for r in self.train_records])
        trainer = getattr(self, "trainer", None)
        size = train_size(d, trainer.current_epoch if trainer is not None else 0)
        if d.progressive_sizes:
            log.info("training images at %dx%d this epoch (data.progressive_sizes)", *size)
        return make_loader(
            self.train_records, d, True, sampler=sampler, seed=seed, cache=self.caches.get(size), size=size
        )

    def _train_sampler(self, labels: list[int]):
        """Class-balanced batches (``data.sampler: m_per_class``) or one seeded shuffle per epoch
        (Lightning calls ``set_epoch``), identical after a resume, over the images of ``labels``."""
        d = self.cfg.data
        replicas, rank = self._world()
        seed = self.cfg.train.seed
        if d.sampler == "m_per_class":
            # optional: torch, FAISS (the train extra and the train/serve extra), imported only when this runs
            from finegrain.data.samplers import DistributedMPerClassSampler

            return DistributedMPerClassSampler(
                labels,
                m=d.m_per_class,
                batch_size=d.batch_size,
                num_replicas=replicas,
                rank=rank,
                seed=seed,
            )
        # DistributedSampler takes only len() of its dataset (torch types it as a Dataset)
        return DistributedSampler(
            range(len(labels)),  # type: ignore[arg-type]
            num_replicas=replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_records:
            return []
        return self._first_size_loader(self.val_records)

    def test_dataloader(self) -> DataLoader:
        return self._first_size_loader(self.test_records)

    def _first_size_loader(self, records: list[ImageRecord]) -> DataLoader:
        size = eval_sizes(self.cfg.data)[0]
        return make_loader(records, self.cfg.data, False, size=size, cache=self.caches[size])

    def eval_loaders(self, records: list[ImageRecord]) -> list[DataLoader]:
        """:func:`eval_loaders` with this module's caches."""
        return eval_loaders(records, self.cfg.data, self.caches)


def prepare_for_config(cfg: ExperimentConfig, cache_dir: Path | None = None, workers: int = 2) -> list[str]:
    """Build the prepared cache for every split of a config; returns lines to print."""

    collection = open_data(cfg.data)
    root = cache_dir or default_cache_root()
    lines = []
    for h, w in sizes_read(cfg.data):
        cache = prepare_cache(
            collection.all_records(),
            size=(h, w),
            cache_dir=root,
            bbox_margin=bbox_margin(cfg.data),
            num_workers=workers,
        )
        lines.append(f"prepared {len(cache)} images at {h}x{w} in {cache.path}")
        if cache.bad:
            lines.append(
                f"{len(cache.bad)} unreadable image(s) recorded: "
                + ", ".join(f"{p} ({r})" for p, r in list(cache.bad.items())[:5])
            )
    return lines
