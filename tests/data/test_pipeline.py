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
def test_every_preset_keeps_the_size_and_normalises(preset):
    x = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    for train in (True, False):
        y = build_transform(preset, (24, 32), train=train, mean=(0.5,) * 3, std=(0.5,) * 3)(x)
        assert y.shape == (3, 24, 32) and y.dtype == torch.float32
        assert -1.01 <= float(y.min()) and float(y.max()) <= 1.01 or preset == "strong"
    plain = build_transform(preset, (24, 32), train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(x)
    assert torch.allclose(plain, x.float() / 255 * 2 - 1, atol=1e-6)


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
    kw = dict(size=(16, 20), preset="plain", train=False, mean=(0, 0, 0), std=(1, 1, 1), batch_size=5,
              bbox_margin=margin)
    a = torch.cat([b[0] for b in build_loader(records, cache=cache, **kw)])
    b = torch.cat([b[0] for b in build_loader(records, cache=None, **kw)])
    assert a.shape == (len(records), 3, 16, 20)
    assert torch.equal(a, b)


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
    kw = dict(size=(8, 8), preset="plain", train=False, mean=(0, 0, 0), std=(1, 1, 1), batch_size=10)
    batches = list(build_loader(records, **kw))
    assert len(batches) == 1 and len(batches[0][1]) == 4  # the text file was dropped
    assert list(build_loader([ImageRecord(bad, 0)], **kw)) == [None]
    with pytest.raises(ImageError, match="text.jpg"):
        list(build_loader(records, on_bad_image="fail", **kw))


def test_m_per_class_batches_are_balanced_and_split_across_processes():
    labels = np.repeat(np.arange(10), 7)
    samplers = [DistributedMPerClassSampler(labels, m=4, batch_size=8, num_replicas=2, rank=r, seed=3)
                for r in range(2)]
    draws = [list(s) for s in samplers]
    assert len(draws[0]) == len(draws[1]) == len(samplers[0])
    for idx in draws:
        for start in range(0, len(idx), 8):
            counts = Counter(labels[idx[start:start + 8]])
            assert sorted(counts.values()) == [4, 4]
    assert draws[0] != draws[1]
    again = DistributedMPerClassSampler(labels, m=4, batch_size=8, num_replicas=2, rank=0, seed=3)
    assert list(again) == draws[0]  # seeded
    again.set_epoch(1)
    assert list(again) != draws[0]  # a new draw each epoch


def test_m_per_class_refuses_impossible_batches():
    with pytest.raises(ConfigError, match="multiple"):
        DistributedMPerClassSampler([0, 1, 2], m=4, batch_size=6)
    with pytest.raises(ConfigError, match="classes"):
        DistributedMPerClassSampler([0, 0, 1, 1], m=2, batch_size=8)
