"""``POST /api/explain``: why a search answered as it did, computed on demand (a plain search costs
nothing more).

Multipart ``image`` file (the query, read and limited as for ``/api/search``) and ``ids`` in the
query string: the gallery ids of the hits to explain (comma-separated, at most ``max_k``). Answers

``kind`` (``class``: the query's map is the class activation map of ``explains``, the predicted
class; ``similarity``: the query's map against the closest match), ``query.map``, and for each id
``map`` (the gallery image's map against the query) and ``query_map`` (the query's against it).
Maps are viridis PNGs (``data:`` URLs) shaped as their image, each scaled from its own least
(dark purple) to most (yellow) evidence. Errors as ``/api/search``'s, and 409 for a model that
gives no maps (an export made before maps existed: re-export it; a backbone without them), said
before the upload is read, 501 for a service that cannot explain; an id the gallery does not hold is a
422. A living gallery explains as a static index does (its hits' images read from its store), behind
its read token when it has one.

``POST /api/search`` with ``explain=1`` answers the same payload as its ``explanation``, for its own
hits, from the one pass of the model that searches (:func:`explained_search`; a living gallery's
search with its ``filter``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from finegrain.data.images import decode_bytes
from finegrain.errors import FinegrainError, ImageError
from finegrain.inference.explain import NoMaps, map_png, resize_map
from finegrain.retrieval.explain_search import (
    ExplainService,
    Explanation,
    SearchExplainer,
)
from finegrain.retrieval.searcher import Hit, Prediction
from finegrain.serve.errors import ApiError, echo, no_paths
from finegrain.serve.uploads import Upload, image_error_message, read_upload

router = APIRouter()
T = TypeVar("T")

MAP_SIDE = 96
"""Pixels along a map PNG's longer side: maps are a few cells a side, the browser smooths them further."""
LEGEND = {
    "colormap": "viridis",
    "low": "least evidence",
    "high": "most evidence",
    "note": "each map is scaled to its own range",
}


def parse_ids(raw: list[str], max_k: int) -> list[int]:
    """The ``ids`` query parameter: comma-separated gallery ids, each once, at most ``max_k`` (whether
    the gallery holds them is the explainer's to say: a living gallery's ids are not 0..N-1)."""
    if len(raw) > 1:
        raise ApiError(422, f"ids was given {len(raw)} times; send it once, comma-separated")
    parts = [p.strip() for p in (raw[0].split(",") if raw else []) if p.strip()]
    if len(parts) > max_k:
        raise ApiError(422, f"ids names {len(parts)} images; at most {max_k}")
    ids: list[int] = []
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 18:  # int() of '²' fails; a store's ids are int64
            raise ApiError(422, f"ids must be gallery ids (whole numbers); got {echo(p, 18)}")
        ids.append(int(p))
    return list(dict.fromkeys(ids))


def data_url(m: np.ndarray, image_size: tuple[int, int]) -> str:
    """A [0, 1] map as a viridis PNG ``data:`` URL shaped as the image (``(height, width)``)."""
    h, w = image_size
    scale = MAP_SIDE / max(h, w, 1)
    png = map_png(resize_map(m, (max(1, round(h * scale)), max(1, round(w * scale)))))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def explanation_body(e: Explanation) -> dict[str, Any]:
    """The maps of ``e`` as the API answers them (``/api/explain``, and ``explanation`` of an explained search)."""
    return {
        "kind": e.kind,
        "explains": e.explains,
        "legend": LEGEND,
        "query": {"map": data_url(e.query_map, e.query_size)},
        "results": [
            {
                "id": h.id,
                "similarity": round(h.similarity, 6),
                "map": data_url(h.map, h.image_size),
                "query_map": data_url(h.query_map, e.query_size),
            }
            for h in e.hits
        ],
    }


def explanation_response(e: Explanation, started: float) -> dict[str, Any]:
    return {**explanation_body(e), "query_ms": round((time.perf_counter() - started) * 1000.0, 2)}


def explainer_of(request: Request) -> ExplainService:
    """The app's explainer: ``app.state.explainer`` if set, else one made once from its searcher."""
    state = request.app.state
    explainer = getattr(state, "explainer", None)
    if explainer is None:
        if not hasattr(state.searcher, "encoder"):
            raise ApiError(501, "this service cannot explain its answers")
        explainer = state.explainer = SearchExplainer(state.searcher)
    return explainer


def _limit(request: Request) -> asyncio.Semaphore:
    state = request.app.state
    if getattr(state, "explain_limit", None) is None:
        state.explain_limit = asyncio.Semaphore(1)  # up to a pass of the query and one of the hits: one at a time
    return state.explain_limit


@router.post("/api/explain", tags=["search"], summary="Why a search answered as it did")
async def explain(request: Request) -> dict[str, Any]:
    """Maps of the query and of the hits ``ids`` (see the module docstring)."""
    started = time.perf_counter()
    state = request.app.state
    authorize = getattr(state, "authorize_read", None)  # a living gallery's read token
    if authorize is not None:
        authorize(request)
    searcher = state.searcher
    explainer = explainer_of(request)
    why_not = explainer.unavailable()
    if why_not is not None:
        raise ApiError(409, f"this service cannot explain its answers: {no_paths(why_not)}")
    size = await anyio.to_thread.run_sync(lambda: searcher.gallery_size)  # a living gallery asks its store
    upload = await read_upload(request, state.max_upload_bytes, size, state.max_k)
    ids = parse_ids(request.query_params.getlist("ids"), state.max_k)

    def run() -> Explanation:
        image = decode_bytes(upload.data, upload.name, max_pixels=state.max_image_pixels)
        return explainer.explain(image, ids)

    async with _limit(request):
        explanation = await _explaining(run, state.max_image_pixels)
    return explanation_response(explanation, started)


async def _explaining(fn: Callable[[], T], max_pixels: int | None) -> T:
    """``fn()`` in a worker thread; an unreadable image is a 400, a model without maps a 409, any other
    refusal a 422 (without server paths)."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except ImageError as e:
        raise ApiError(400, image_error_message(e, max_pixels)) from None
    except NoMaps as e:
        raise ApiError(409, f"this service cannot explain its answers: {no_paths(str(e))}") from None
    except FinegrainError as e:
        raise ApiError(422, no_paths(str(e))) from None


ExplainedSearch = Callable[[ExplainService, Image.Image], tuple[list[Hit], T, Explanation]]
"""An explained search of a decoded query by an explainer (e.g. ``lambda e, im: e.search(im, k)``)."""


def plain_search(k: int) -> ExplainedSearch[Prediction | None]:
    """The explained search of a static index: its k nearest images and its prediction."""

    def search(explainer: ExplainService, image: Image.Image) -> tuple[list[Hit], Prediction | None, Explanation]:
        return explainer.search(image, k)

    return search


async def explained_search(
    request: Request, upload: Upload, limit: asyncio.Semaphore, search: ExplainedSearch[T]
) -> tuple[list[Hit], T, dict[str, Any]]:
    """``POST /api/search`` with ``explain=1``: the hits, the rest of ``search``'s answer and
    :func:`explanation_body` of the hits, from one pass of the model over the query
    (:meth:`SearchExplainer.search_with`), at most ``limit`` at once as plain searches. A 409 (as
    ``/api/explain``'s) when the service cannot explain."""
    state = request.app.state
    explainer = explainer_of(request)
    why_not = explainer.unavailable()
    if why_not is not None:
        raise ApiError(409, f"this service cannot explain its answers: {no_paths(why_not)}")

    def run() -> tuple[list[Hit], T, Explanation]:
        image = decode_bytes(upload.data, upload.name, max_pixels=state.max_image_pixels)
        return search(explainer, image)

    async with limit:
        hits, rest, explanation = await _explaining(run, state.max_image_pixels)
    return hits, rest, explanation_body(explanation)
