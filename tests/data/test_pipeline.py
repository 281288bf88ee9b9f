"""Transforms, the prepared cache, the dataset/loader and the class-balanced sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.data.cache import find_cache, prepare_cache
from finegrain.data.dataset import build_loader, preflight
from finegrain.data.records import ImageRecord
from finegrain.data.samplers import DistributedMPerClassSampler
from finegrain.data.transforms import PRESETS, build_transform
from finegrain.errors import ConfigError, FinegrainError, ImageError


def _records(tmp_path: Path, n_classes: int = 3, per_class: int = 4) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    out = []
    for c in range(n_classes):
        for i in range(per_class):
            p = tmp_path / f"c{c}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (37 + i, 53, 3), dtype=np.uint8)).save(p, quality=90)
            out.append(ImageRecord(p, c, (3, 4, 30, 30)))
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_the_size_and_uint8(preset):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    for train in (True, False):
        y = build_transform(preset, (24, 32), train=train)(x)
        assert y.shape == (3, 24, 32) and y.dtype == torch.uint8
    assert torch.equal(build_transform(preset, (24, 32), train=False)(x), x)  # evaluation: untouched
    if preset != "plain":  # training augments
        assert not all(torch.equal(build_transform(preset, (24, 32), train=True)(x), x) for _ in range(3))


def test_the_model_normalises_uint8_batches_with_its_backbone_statistics():
    from finegrain.models.model import build_model

    model = build_model("tin_cnn", num_classes=3).eval()
    model.mean, model.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    assert torch.allclose(model.normalise_input(x), expected, atol=1e-5)
    assert model.normalise_input(expected) is expected  # float input is taken as normalised
    with torch.no_grad():
        assert torch.allclose(model.logits(x), model.logits(expected), atol=1e-5)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(FinegrainError, match="plain"):
        build_transform("strnog", (8, 8), True)


@pytest.mark.parametrize("margin", [None, 0.1])
def test_cached_and_uncached_loading_give_the_same_pixels(tmp_path, margin):
    records = _records(tmp_path)
    cache = prepare_cache(records, (16, 20), tmp_path / "cache", bbox_margin=margin, progress=False)
    assert len(cache) == len(records)
    assert find_cache(records, (16, 20), tmp_path / "cache", margin) is not None
    assert find_cache(records, (16, 24), tmp_path / "cache", margin) is None  # another size: not this cache
    kw = dict(size=(16, 20), preset="plain", train=False, batch_size=5, bbox_margin=margin)
    a = torch.cat([b[0] for b in build_loader(records, cache=cache, **kw)])
    b = torch.cat([b[0] for b in build_loader(records, cache=None, **kw)])
    assert a.shape == (len(records), 3, 16, 20)
    assert torch.equal(a, b)


def test_batches_gather_cached_images_in_order_and_fall_back_for_the_rest(tmp_path):
    records = _records(tmp_path)
    bad = tmp_path / "text.jpg"
    bad.write_text("not a jpeg")
    prepared = records[:-3] + [ImageRecord(bad, 1)]  # the cache records the text file as unreadable
    cache = prepare_cache(prepared, (16, 20), tmp_path / "cache", progress=False)
    assert list(cache.bad) == [str(bad)]
    everything = records + [ImageRecord(bad, 1)]  # the last 3 real images are not in the cache
    order = list(np.random.default_rng(1).permutation(len(everything)))
    kw = dict(size=(16, 20), preset="plain", train=False, batch_size=5, sampler=order, num_workers=2)
    loader = build_loader(everything, cache=cache, **kw)
    assert loader.num_workers == 0  # un-augmented reads from the cache stay in the main process
    assert build_loader(everything, cache=None, **kw).num_workers == 2
    seen = []
    for x, y, idx in loader:
        assert x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
        for k, i in enumerate(idx.tolist()):
            expected = build_loader([everything[i]], cache=None, **{**kw, "sampler": None})
            assert torch.equal(x[k], next(iter(expected))[0][0])
            assert y[k] == everything[i].label
        seen += idx.tolist()
    assert seen == [i for i in order if everything[i].path != bad]  # sampler order, unreadable one skipped


def test_augmented_batches_from_worker_processes_are_channels_last(tmp_path):
    records = _records(tmp_path)
    cache = prepare_cache(records, (16, 20), tmp_path / "cache", progress=False)
    loader = build_loader(records, size=(16, 20), preset="light", train=True, batch_size=5, num_workers=2, cache=cache)
    assert loader.num_workers == 2  # augmentation runs in the workers
    batches = list(loader)
    assert sorted(i for _, _, idx in batches for i in idx.tolist()) == list(range(len(records)))
    for x, y, idx in batches:
        assert x.shape[1:] == (3, 16, 20) and x.is_contiguous(memory_format=torch.channels_last)
        assert y.tolist() == [records[i].label for i in idx.tolist()]


def test_a_changed_file_invalidates_the_cache(tmp_path):
    records = _records(tmp_path)
    prepare_cache(records, (16, 16), tmp_path / "cache", progress=False)
    Image.new("RGB", (10, 10), "red").save(records[0].path)
    assert find_cache(records, (16, 16), tmp_path / "cache") is None


def test_bad_images_are_skipped_or_stop_the_run(tmp_path):
    records = _records(tmp_path, 2, 2)
    bad = tmp_path / "text.jpg"
    bad.write_text("not a jpeg")
    records.append(ImageRecord(bad, 0))
    good, problems = preflight(records)
    assert len(good) == 4 and len(problems) == 1 and "text.jpg" in problems[0]
    with pytest.raises(ImageError, match="text.jpg"):
        preflight(records, on_bad_image="fail")
    kw = dict(size=(8, 8), preset="plain", train=False, batch_size=10)
    batches = list(build_loader(records, **kw))
    assert len(batches) == 1 and len(batches[0][1]) == 4  # the text file was dropped
    assert list(build_loader([ImageRecord(bad, 0)], **kw)) == [None]
    with pytest.raises(ImageError, match="text.jpg"):
        list(build_loader(records, on_bad_image="fail", **kw))


def test_m_per_class_batches_are_balanced_and_split_across_processes():
    labels = np.repeat(np.arange(10), 7)
    samplers = [
        DistributedMPerClassSampler(labels, m=4, batch_size=8, num_replicas=2, rank=r, seed=3) for r in range(2)
    ]
    draws = [list(s) for s in samplers]
    assert len(draws[0]) == len(draws[1]) == len(samplers[0])
    for idx in draws:
        for start in range(0, len(idx), 8):
            counts = Counter(labels[idx[start : start + 8]])
            assert sorted(counts.values()) == [4, 4]
    assert draws[0] != draws[1]
    again = DistributedMPerClassSampler(labels, m=4, batch_size=8, num_replicas=2, rank=0, seed=3)
    assert list(again) == draws[0]  # seeded
    again.set_epoch(1)
    assert list(again) != draws[0]  # a new draw each epoch


def test_m_per_class_draw_is_the_librarys_own_for_the_seed():
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    from finegrain.data.samplers import epoch_seed

    labels = np.repeat(np.arange(10), 7)
    ours = DistributedMPerClassSampler(labels, m=4, batch_size=8, seed=3)
    draws = []
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        assert c_f.NUMPY_RANDOM is np.random  # the library's default: numpy's global state
        np.random.seed(99)
        before = np.random.get_state()[1].copy()
        draw = list(ours)
        assert c_f.NUMPY_RANDOM is np.random and (np.random.get_state()[1] == before).all()  # global untouched
        np.random.seed(epoch_seed(3, epoch))  # the library seeded the way its users seed it
        assert draw == list(MPerClassSampler(labels, 4, batch_size=8, length_before_new_iter=len(ours)))
        ours.set_epoch(epoch)
        assert list(ours) == draw  # the same seed and epoch repeat
        draws.append(draw)
    assert draws[0] != draws[1]  # each epoch a new draw
    assert list(DistributedMPerClassSampler(labels, m=4, batch_size=8, seed=4)) != draws[0]  # and each seed


def test_m_per_class_refuses_impossible_batches():
    with pytest.raises(ConfigError, match="multiple"):
        DistributedMPerClassSampler([0, 1, 2], m=4, batch_size=6)
    with pytest.raises(ConfigError, match="classes"):
        DistributedMPerClassSampler([0, 0, 1, 1], m=2, batch_size=8)


def test_eval_image_sizes_are_what_evaluation_reads_and_prepare_caches_every_size(tmp_path):
    from finegrain.data.dataset import build_loader
    from finegrain.data.module import FinegrainDataModule, prepare_for_config
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, data={"image_size": [32, 32], "eval_image_sizes": [[40, 36], [32, 32]]})
    lines = prepare_for_config(cfg)
    assert [line.split(" in ")[0].split(" at ")[1] for line in lines] == ["32x32", "40x36"]
    dm = FinegrainDataModule(cfg)
    assert set(dm.caches) == {(32, 32), (40, 36)} and dm.cache.size == (32, 32)
    assert next(iter(dm.train_dataloader()))[0].shape[2:] == (32, 32)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):  # the first evaluation size
        assert loader.dataset.cache is dm.caches[(40, 36)]
        assert next(iter(loader))[0].shape[2:] == (40, 36)
    loaders = dm.eval_loaders(dm.test_records)
    assert [ld.dataset.size for ld in loaders] == [(40, 36), (32, 32)]
    assert [ld.dataset.cache for ld in loaders] == [dm.caches[(40, 36)], dm.caches[(32, 32)]]
    # a cache of another size is never read: the loader decodes instead
    loader = build_loader(dm.test_records, size=(24, 24), preset="plain", train=False, batch_size=4, cache=dm.cache)
    assert loader.dataset.cache is None and next(iter(loader))[0].shape[2:] == (24, 24)
