"""The service needs only :class:`SearchService`: the test fake, the benchmark's searcher and the real
:class:`Searcher` all implement it, and the service answers the same through each of them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from finegrain.retrieval.searcher import SearchService, ServiceInfo
from finegrain.serve.app import create_app, service_info

from .fakes import FakeSearcher, draw_bird, png_bytes

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MEMBERS = {"run", "prediction_source", "engine", "gallery_size", "info", "gallery_path", "search"}
LIMITS = {"max_upload_bytes", "max_k", "max_image_pixels"}
FAKE_COUNTERS = {"calls", "active", "max_active", "on_event_loop"}  # read by the tests, never by the service


class ProtocolOnly:
    """A searcher seen through :class:`SearchService` alone: reading any other attribute fails the test."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        if name not in MEMBERS:
            raise AssertionError(f"the service read {name!r}, which SearchService does not declare")
        return getattr(self._inner, name)


def public(obj: Any) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def answers(searcher: Any, query: bytes) -> tuple[dict, dict]:
    """``/api/info`` and one ``/api/search`` (k=3) of the service over ``searcher``, through :class:`ProtocolOnly`."""
    with TestClient(create_app(ProtocolOnly(searcher)), base_url="http://127.0.0.1:8000") as c:
        info = c.get("/api/info")
        found = c.post("/api/search", files={"image": ("q.png", query, "image/png")}, data={"k": "3"})
        gallery = c.get(found.json()["results"][0]["url"]) if found.status_code == 200 else None
    assert info.status_code == 200, info.text
    assert found.status_code == 200, found.text
    assert gallery is not None and gallery.status_code == 200 and gallery.headers["content-type"].startswith("image/")
    return info.json(), found.json()


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> FakeSearcher:
    return FakeSearcher(tmp_path_factory.mktemp("protocol-gallery"))


@pytest.fixture(scope="module")
def fake_answers(fake) -> tuple[dict, dict]:
    return answers(fake, png_bytes(draw_bird((45, 75, 195), 1)))


def test_the_protocol_declares_what_the_service_uses():
    declared = set(SearchService.__annotations__) | {n for n in vars(SearchService) if not n.startswith("_")}
    assert declared == MEMBERS


def test_the_fake_is_exactly_a_search_service(fake):
    assert isinstance(fake, SearchService)
    assert public(fake) - FAKE_COUNTERS == MEMBERS
    assert set(fake.info) == set(ServiceInfo.__annotations__)


def test_the_service_reads_only_the_protocol(fake_answers):
    info, found = fake_answers
    assert set(info) == set(ServiceInfo.__annotations__) | LIMITS
    assert found["prediction_source"] == "classifier" and len(found["results"]) == 3


def test_something_else_is_refused_with_a_type_error(fake):
    class NoInfo:
        run, prediction_source, engine, gallery_size = fake.run, "classifier", "torch", 3

        def gallery_path(self, i: int) -> str: ...

        def search(self, image, k=10): ...

    with pytest.raises(TypeError, match="not a SearchService"):
        create_app(NoInfo())
    with pytest.raises(TypeError, match="not a SearchService"):
        create_app(object())


def test_an_incomplete_info_is_a_type_error_naming_the_keys(fake):
    class Partial(FakeSearcher):
        @property
        def info(self) -> dict:
            return {k: v for k, v in super().info.items() if k not in ("engine", "created_at")}

    with pytest.raises(TypeError, match="lacks created_at, engine"):
        create_app(_partial(fake, Partial))


def _partial(fake: FakeSearcher, cls: type) -> Any:
    clone = cls.__new__(cls)
    clone.__dict__.update(fake.__dict__)
    return clone


def test_service_info_keeps_only_the_dataset_folder_name(fake):
    class Leaky(FakeSearcher):
        @property
        def info(self) -> dict:
            return {**super().info, "dataset": "C:\\data\\birds\\"}

    info = service_info(_partial(fake, Leaky), 10, 5, None)
    assert info["dataset"] == "birds"
    assert (info["max_upload_bytes"], info["max_k"], info["max_image_pixels"]) == (10, 5, None)


def test_the_benchmark_searcher_is_exactly_a_search_service(monkeypatch, tmp_path, fake_answers):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "serve_load", raising=False)
    from serve_load import TinyCnnSearcher, synthetic_image

    tiny = TinyCnnSearcher(tmp_path / "gallery", gallery=6, image_size=32, dim=8, num_classes=3)
    assert isinstance(tiny, SearchService)
    assert public(tiny) == MEMBERS
    info, found = answers(tiny, png_bytes(synthetic_image(100, size=64)))
    assert set(info) == set(fake_answers[0]) and info["gallery_size"] == 6 and info["embedding_dim"] == 8
    assert set(found) == set(fake_answers[1])


@pytest.mark.slow
def test_the_real_searcher_is_a_search_service_answering_like_the_fake(trained_run, tmp_path, fake_answers):
    from finegrain.retrieval.searcher import Searcher

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    searcher = Searcher(run, engine="torch")
    assert isinstance(searcher, SearchService)
    assert set(searcher.info) == set(ServiceInfo.__annotations__)
    info, found = answers(searcher, Path(searcher.gallery_path(0)).read_bytes())
    fake_info, fake_found = fake_answers
    assert set(info) == set(fake_info)
    assert set(found) == set(fake_found)
    assert set(found["results"][0]) == set(fake_found["results"][0])
    assert found["prediction"] and set(found["prediction"][0]) == set(fake_found["prediction"][0])
    assert info["run"] == "run" and info["gallery_size"] == searcher.gallery_size
    assert info["has_classifier"] is True and info["engine"] == "torch" and info["task"] == "classification"
    assert str(run) not in repr(info) and "/" not in info["dataset"]
    assert found["results"][0]["same_image"] is True
