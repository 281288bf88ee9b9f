"""Tiny synthetic samples for the data tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def make_samples(num_classes: int = 3, per_class: int = 3, size: int = 16, seed: int = 0):
    """``[(image, label, bbox)]``: distinct smooth RGB images (a random colour plus a
    gradient, so JPEG keeps them close), boxes inside the image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 60, size)[None, :, None]
    out = []
    for label in range(num_classes):
        for i in range(per_class):
            base = rng.integers(20, 180, 3)[None, None, :]
            arr = np.broadcast_to(base + ramp, (size, size, 3)).astype(np.uint8)
            box = (i, label, size - 1 - i, size - 2)
            out.append((Image.fromarray(arr, "RGB"), label, box))
    return out


@pytest.fixture
def samples():
    return make_samples
