"""Fixtures of the service tests: a fake searcher's gallery, a client of its app, query images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .fakes import FakeSearcher, draw_bird, make_app, png_bytes


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture(scope="module")
def searcher(gallery_dir) -> FakeSearcher:
    return FakeSearcher(gallery_dir)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(make_app(searcher, max_upload_bytes=200_000, max_k=20)) as c:
        yield c


@pytest.fixture(scope="module")
def blue_query() -> bytes:
    return png_bytes(draw_bird((45, 75, 195), 1))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """400 Mpixel (over twice Pillow's limit), about 50 KB on disk."""
    return png_bytes(Image.new("1", (20000, 20000)))


@pytest.fixture(scope="module")
def real_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(noise), "JPEG", quality=90)
