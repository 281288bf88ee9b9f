"""``POST /api/explain``: why a search answered as it did, computed on demand (a plain search costs
nothing more).

Multipart ``image`` file (the query, read and limited as for ``/api/search``) and ``ids`` in the
query string: the gallery ids of the hits to explain (comma-separated, at most ``max_k``). Answers

``kind`` (``class``: the query's map is the class activation map of ``explains``, the predicted
class; ``similarity``: the query's map against the closest match), ``legend``, ``query`` (its
``map`` and ``size``), and for each id its ``map`` (the gallery image's map against the query),
``size`` and ``query_map`` (the query's map against it). A map is its cells on the model's grid (a
few a side): rows of numbers in [0, 1], top row first, each map scaled from its own least (0) to
most (1) evidence; ``size`` is its image's (height, width), over which a viewer stretches the map
bilinearly and colours it with ``legend.colors`` (viridis), as the page does. Errors as
``/api/search``'s, and 409 for a model that gives no maps (an export made before maps existed:
re-export it; a backbone without them), said before the upload is read, 501 for a service that
cannot explain; an id the gallery does not hold is a 422. A living gallery explains as a static
index does (its hits' images read from its store), behind its read token when it has one.

``POST /api/search`` with ``explain=1`` answers the same payload as its ``explanation``, for its own
hits and without their ``query_map`` (the page shows the query's map and each hit's), from the one
pass of the model that searches (:func:`explained_search`; a living gallery's search with its
``filter``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from finegrain.data.images import decode_bytes
from finegrain.errors import FinegrainError, ImageError
from finegrain.inference.explain import VIRIDIS_STOPS, NoMaps
from finegrain.retrieval.explain_search import (
    ExplainService,
    Explanation,
    SearchExplainer,
)
from finegrain.retrieval.searcher import Hit, Prediction
from finegrain.serve.errors import ApiError, echo, no_paths
from finegrain.serve.uploads import Upload, image_error_message, read_upload, upload_openapi

router = APIRouter()
T = TypeVar("T")

LEGEND = {
    "colormap": "viridis",
    "colors": list(VIRIDIS_STOPS),
    "low": "least evidence",
    "high": "most evidence",
    "note": "each map is scaled to its own range",
}
"""``colors``: viridis at evenly spaced stops from 0 to 1, to interpolate linearly (as the CLI's sheet does)."""
CELL_DECIMALS = 3

_MAP = {
    "type": "array",
    "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
    "description": "The map's cells on the model's grid, top row first, from 0 (least) to 1 (most evidence): "
    "stretch it bilinearly over the image and colour it with legend.colors.",
}
_SIZE = {
    "type": "array",
    "items": {"type": "integer"},
    "minItems": 2,
    "maxItems": 2,
    "description": "(height, width) of the image the map lies over",
}
EXPLAIN_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "ids",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"},
            "description": "The gallery ids of the results to explain, comma-separated (at most max_k of /api/info).",
        }
    ],
    "requestBody": upload_openapi({"image": {"type": "string", "format": "binary", "description": "The query image."}}),
    "responses": {
        "200": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "kind": {"type": "string", "enum": ["class", "similarity"]},
                            "explains": {"type": "string", "description": "the predicted class, or closest match"},
                            "legend": {"type": "object"},
                            "query": {"type": "object", "properties": {"map": _MAP, "size": _SIZE}},
                            "results": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "id": {"type": "integer"},
                                        "similarity": {"type": "number"},
                                        "map": {**_MAP, "description": "the gallery image's map against the query"},
                                        "size": _SIZE,
                                        "query_map": {
                                            **_MAP,
                                            "description": "the query's map against this image (not in an "
                                            "explained search's explanation)",
                                        },
                                    },
                                },
                            },
                            "query_ms": {"type": "number"},
                        },
                    }
                }
            }
        },
        "400": {"description": "Not an image, corrupt, truncated or too many pixels"},
        "409": {"description": "The model gives no maps (re-export it, or a backbone without them)"},
        "413": {"description": "Upload too large"},
        "422": {"description": "ids not whole numbers, given twice, too many, or not in the gallery"},
        "501": {"description": "This service cannot explain"},
    },
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


def cells(m: np.ndarray) -> list[list[float]]:
    """A [0, 1] map ``[h, w]`` as rows of numbers (JSON), to :data:`CELL_DECIMALS` decimals."""
    return np.round(np.asarray(m, dtype=np.float64), CELL_DECIMALS).tolist()


def explanation_body(e: Explanation, query_maps: bool = True) -> dict[str, Any]:
    """The maps of ``e`` as the API answers them: ``/api/explain``'s, and without each hit's
    ``query_map`` (``query_maps=False``) an explained search's ``explanation``."""
    return {
        "kind": e.kind,
        "explains": e.explains,
        "legend": LEGEND,
        "query": {"map": cells(e.query_map), "size": list(e.query_size)},
        "results": [
            {
                "id": h.id,
                "similarity": round(h.similarity, 6),
                "map": cells(h.map),
                "size": list(h.image_size),
                **({"query_map": cells(h.query_map)} if query_maps else {}),
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


@router.post("/api/explain", tags=["search"], summary="Why a search answered as it did", openapi_extra=EXPLAIN_OPENAPI)
async def explain(request: Request) -> dict[str, Any]:
    """The maps of the query (the predicted class's evidence, or what made it alike its closest match)
    and, for each of the gallery images ``ids``, its map against the query and the query's against it;
    each map as its cells on the model's grid, in [0, 1]."""
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
    :func:`explanation_body` of the hits (without their ``query_map``), from one pass of the model over the query
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
    return hits, rest, explanation_body(explanation, query_maps=False)
