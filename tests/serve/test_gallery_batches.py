"""Adds are encoded in batches: concurrent requests share one model pass and one transaction, each
answered with its own ids or its own error, never losing another request's images."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from finegrain.data.images import decode_bytes, to_rgb
from finegrain.errors import FinegrainError, ImageError
from finegrain.gallery.live import AddRequest, ImageBytes
from finegrain.serve import add_batches
from finegrain.serve.add_batches import AddBatches
from finegrain.serve.gallery_routes import Tokens

from .fakes import make_app
from .test_gallery_api import AUTH, TOKEN, live, png  # noqa: F401 - live is a fixture


def _request(n: int, label: str = "") -> AddRequest:
    return AddRequest([ImageBytes(bytes([i]), f"{label}{i}") for i in range(n)], label)


def test_waiting_requests_form_batches_of_whole_requests():
    calls: list[list[str]] = []

    async def add_many(requests: list[AddRequest]) -> list[list[int] | FinegrainError]:
        calls.append([r.label for r in requests])
        await asyncio.sleep(0)
        return [FinegrainError("refused") if r.label == "bad" else [len(r.images)] for r in requests]

    async def go():
        batches = AddBatches(add_many, batch_images=8, window_s=5.0)
        sizes = {"a": 3, "b": 1, "bad": 2, "c": 2, "d": 5, "e": 20}
        return await asyncio.gather(
            *(batches.add(_request(n, label)) for label, n in sizes.items()), return_exceptions=True
        )

    a, b, bad, c, d, e = asyncio.run(go())
    assert calls == [["a", "b", "bad", "c"], ["d"], ["e"]]  # whole requests, in order; a large one alone
    assert (a, b, c, d, e) == ([3], [1], [2], [5], [20])
    assert isinstance(bad, FinegrainError) and str(bad) == "refused"


def test_a_failing_batch_answers_each_of_its_requests_and_the_next_batch_runs():
    async def add_many(requests: list[AddRequest]) -> list[list[int] | FinegrainError]:
        if requests[0].label == "x":
            raise OSError("disk full")
        return [[1] for _ in requests]

    async def go():
        batches = AddBatches(add_many, batch_images=2, window_s=5.0)
        return await asyncio.gather(
            *(batches.add(_request(1, label)) for label in ("x", "x", "y")), return_exceptions=True
        )

    first, second, third = asyncio.run(go())
    assert isinstance(first, OSError) and isinstance(second, OSError) and third == [1]


def test_concurrent_posts_share_a_batch_and_each_gets_its_answer(live, monkeypatch):  # noqa: F811
    monkeypatch.setattr(add_batches, "WINDOW_S", 2.0)  # every request below joins the first batch
    app = make_app(live, max_upload_bytes=200_000, tokens=Tokens(write=TOKEN))
    seen: list[int] = []
    real = live.decode_adds

    def counting(requests, max_pixels=None):
        seen.append(len(requests))
        return real(requests, max_pixels)

    monkeypatch.setattr(live, "decode_adds", counting)
    before = live.store.count()
    sent = [
        [png(101)],
        [png(102), png(103)],
        [png(104), b"not an image"],  # refused whole: neither image is stored
        [png(101)],  # the same bytes as the first request's, in the same batch: one entry
        [png(105), png(105)],  # twice in one request: one entry
    ]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            return await asyncio.gather(
                *(
                    ac.post(
                        "/api/gallery",
                        files=[("image", (f"{i}.png", data, "image/png")) for data in images],
                        data={"label": f"batch{i}", "metadata": json.dumps({"n": i})},
                        headers=AUTH,
                    )
                    for i, images in enumerate(sent)
                )
            )

    answers = asyncio.run(go())
    assert seen == [5]  # one batch: one model pass, one transaction
    assert [r.status_code for r in answers] == [200, 200, 400, 200, 200]
    assert "error" in answers[2].json()
    ids = [r.json()["ids"] if r.status_code == 200 else None for r in answers]
    assert ids[0] == ids[3] and ids[4][0] == ids[4][1] and len({ids[0][0], *ids[1], ids[4][0]}) == 4
    assert live.store.count() == before + 4
    assert live.store.get(ids[1][1]).label == "batch1" and live.store.get(ids[1][1]).metadata == {"n": 1}
    for i, data in ((ids[1][0], png(102)), (ids[1][1], png(103)), (ids[4][0], png(105))):
        assert live.store.image(i)[0] == data  # stored whole
        hits, _, _ = live.search_where(decode_bytes(data), 1, None)
        assert hits[0].id == i and hits[0].same_image  # and searchable
    assert not any(png(104) == live.store.image(e.id)[0] for e in live.store.list(limit=1000))


def test_a_batch_encodes_as_one_image_at_a_time_does(live):  # noqa: F811
    rgbs = [to_rgb(decode_bytes(png(200 + i)))[0] for i in range(5)]
    batched = live.encoder.encode_rgbs(rgbs)["embedding"]
    singles = [live.encoder.encode_rgb(im)["embedding"][0] for im in rgbs]
    assert batched.shape == (5, len(singles[0]))
    for b, s in zip(batched, singles, strict=True):
        assert float(b @ s / (((b @ b) * (s @ s)) ** 0.5)) > 0.99


@pytest.mark.parametrize(("bad", "reason"), [(b"", "empty"), (b"GIF89a not really", "not-an-image")])
def test_a_refused_image_names_its_reason(live, bad, reason):  # noqa: F811
    before = live.store.count()
    [result] = live.add_many([AddRequest([ImageBytes(bad, "x.gif")])])
    assert isinstance(result, ImageError) and result.reason == reason and str(result).startswith(f"x.gif: {reason}")
    assert live.store.count() == before
