"""The living gallery's API: add, remove, relabel and list images while the service runs.

Routes (added by :func:`add_gallery_routes` ahead of the static ones they extend)
------
``POST /api/gallery``            multipart ``image`` (repeated), ``label``, ``metadata`` (JSON) -> ids, size
``DELETE /api/gallery/{id}``     remove an entry and its image
``PATCH /api/gallery/{id}``      JSON ``{"label": ..., "metadata": {...}}``
``GET /api/gallery``             ``?label=&offset=&limit=`` -> entries in id order, and the count
``GET /api/gallery/{id}/meta``   one entry
``GET /gallery/{id}``            the stored image
``POST /api/search``             as before, plus an optional ``filter`` (JSON, see
                                 :mod:`finegrain.gallery.filters`); each hit carries its metadata
``GET /api/info``                as before, with the live gallery size and ``gallery_writes``

Writes need ``Authorization: Bearer TOKEN`` with the server's write token (compared in constant
time; 401 otherwise); without a write token the write routes answer 404. With a read token, reads
(searches, listings, images, info) need it or the write token. Tokens are never logged or echoed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from starlette.datastructures import UploadFile

from finegrain.data.images import decode_bytes
from finegrain.errors import FinegrainError, ImageError
from finegrain.gallery.filters import check_label, check_metadata, parse_filter, parse_metadata
from finegrain.gallery.live import AddRequest, ImageBytes, LiveGallery
from finegrain.retrieval.explain_search import Encoded, ExplainService, Explanation
from finegrain.retrieval.searcher import Hit, Prediction
from finegrain.serve.add_batches import AddBatches
from finegrain.serve.app import search_openapi, search_response
from finegrain.serve.errors import ApiError, no_paths
from finegrain.serve.explain_routes import explained_search
from finegrain.serve.uploads import (
    check_headers,
    image_error_message,
    parse_form,
    read_body,
    read_upload,
    too_large,
)

WRITE_TOKEN_ENV = "FINEGRAIN_WRITE_TOKEN"
READ_TOKEN_ENV = "FINEGRAIN_READ_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_IMAGES_PER_ADD = 64
ADD_BODY_FACTOR = 4
"""An add's whole request may be this many times the per-image upload limit."""
MAX_PAGE = 1000
ADD_YIELD_S = 0.5
"""How long a batch of adds waits for the searches queued before it (searches go first)."""
ADD_PASS_WHILE_SEARCHING = 1
"""Images encoded in one pass of an add while searches wait (as before batching; the whole batch otherwise)."""
_ID_RE = re.compile(r"[0-9]{1,18}")  # any int64 id of 18 digits (a Milvus store's are 16)


@dataclass(frozen=True)
class Tokens:
    """The server's write and read tokens (None: writes are off / reads are open)."""

    write: str | None = None
    read: str | None = None

    def __repr__(self) -> str:  # never print a token
        return f"Tokens(write={'set' if self.write else None}, read={'set' if self.read else None})"


def load_token(file: Path | None, env: str, option: str) -> str | None:
    """A token from ``file`` (its first line), else from ``$env``; at least 16 characters."""
    if file is not None:
        try:
            text = Path(file).read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise FinegrainError(f"{option}: cannot read {file}: {e.__class__.__name__}") from None
        token = text[0].strip() if text else ""
        where = f"{option} {file}"
    else:
        token = os.environ.get(env, "").strip()
        where = f"${env}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise FinegrainError(
            f"{where}: a token is at least {MIN_TOKEN_CHARS} characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def _bearer_ok(request: Request, *tokens: str | None) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, sent = header.partition(" ")
    if scheme.lower() != "bearer" or not sent:
        return False
    given = sent.strip().encode()
    ok = False
    for token in tokens:  # every token is compared, in constant time
        if token is not None:
            ok |= hmac.compare_digest(given, token.encode())
    return ok


def _unauthorized(what: str) -> ApiError:
    return ApiError(401, f"{what} needs the server's token: send 'Authorization: Bearer TOKEN'")


def require_write(request: Request, tokens: Tokens) -> None:
    if tokens.write is None:
        raise ApiError(404, "this server does not accept changes to its gallery (start it with a write token)")
    if not _bearer_ok(request, tokens.write):
        raise _unauthorized("changing the gallery")


def require_read(request: Request, tokens: Tokens) -> None:
    if tokens.read is not None and not _bearer_ok(request, tokens.read, tokens.write):
        raise _unauthorized("reading from this server")


def parse_id(text: str) -> int:
    if not _ID_RE.fullmatch(text):
        raise ApiError(404, "no gallery entry with this id")
    return int(text)


def _int_param(request: Request, name: str, default: int, upper: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > upper:
        raise ApiError(422, f"{name} must be a whole number between 0 and {upper}")
    return int(raw)


def _field_text(form: Any, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise ApiError(422, f"{name} was given {len(values)} times; send it once")
    if values and not isinstance(values[0], str):
        raise ApiError(422, f"{name} must be text, not a file")
    return values[0] if values else None


# --------------------------------------------------------------------------- the routes


def add_gallery_routes(
    app: FastAPI, live: LiveGallery, tokens: Tokens, info: dict[str, Any], max_concurrency: int
) -> None:
    """Put the gallery routes (and the live search, image and info routes) ahead of the app's."""
    router = APIRouter(tags=["gallery"])
    app.state.authorize_read = functools.partial(require_read, tokens=tokens)  # POST /api/explain's
    limit = asyncio.Semaphore(max(1, int(max_concurrency)))
    max_bytes, max_k, max_pixels = app.state.max_upload_bytes, app.state.max_k, app.state.max_image_pixels
    body_timeout = app.state.body_timeout

    def refusal(e: FinegrainError) -> ApiError:
        if isinstance(e, ImageError):
            return ApiError(400, image_error_message(e, max_pixels))
        return ApiError(422, no_paths(str(e)))

    async def run(fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, at most ``max_concurrency`` at once; refusals as 4xx."""
        async with limit:
            try:
                return await anyio.to_thread.run_sync(fn, *args)
            except FinegrainError as e:
                raise refusal(e) from None

    searching = [0]  # searches waiting for a slot or in one: adds let them go first

    async def run_search(fn: Any) -> Any:
        searching[0] += 1
        try:
            return await run(fn)
        finally:
            searching[0] -= 1

    async def yield_to_searches() -> None:
        """Wait while searches are queued, at most :data:`ADD_YIELD_S` (adds are never starved)."""
        deadline = time.monotonic() + ADD_YIELD_S
        while searching[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def add_many(requests: list[AddRequest]) -> list[list[int] | FinegrainError]:
        """A batch of adds: decoded, encoded in passes that let waiting searches go first (short ones
        while searches wait), stored in one transaction."""
        adds = await run(live.decode_adds, requests, max_pixels)
        vectors: list[np.ndarray] = []
        done = 0
        while done < len(adds.rgbs):
            await yield_to_searches()
            step = ADD_PASS_WHILE_SEARCHING if searching[0] else len(adds.rgbs)
            chunk = adds.rgbs[done : done + step]
            vectors.append((await run(live.encoder.encode_rgbs, chunk))["embedding"])
            done += len(chunk)
        return await run(live.store_adds, adds, np.concatenate(vectors) if vectors else np.empty((0, 0)))

    batches = AddBatches(add_many)

    @router.get("/api/info", tags=["service"], summary="What the service runs")
    async def api_info(request: Request) -> dict[str, Any]:
        """As the static service's, with the gallery's current size and whether it accepts writes."""
        require_read(request, tokens)
        size = await anyio.to_thread.run_sync(live.store.count)
        return {
            **info,
            "gallery_size": size,
            "gallery_writes": tokens.write is not None,
            "gallery_store": type(live.store).__name__,
        }

    search_doc = search_openapi(max_k, max_bytes)
    search_doc["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["filter"] = {
        "type": "string",
        "description": 'JSON: {"label": NAME} or {"metadata.FIELD": VALUE}.',
    }

    @router.post(
        "/api/search",
        tags=["search"],
        summary="Search the gallery with an image, optionally filtered",
        openapi_extra=search_doc,
    )
    async def search(request: Request) -> dict[str, Any]:
        """Multipart ``image`` (+ ``k``, + ``filter``: JSON ``{"label": NAME}`` or
        ``{"metadata.FIELD": VALUE}``): the prediction and the k nearest entries, with labels and metadata."""
        require_read(request, tokens)
        started = time.perf_counter()
        size = await anyio.to_thread.run_sync(live.store.count)
        upload = await read_upload(request, max_bytes, size, max_k, body_timeout)
        try:
            where = parse_filter(upload.filter)
        except FinegrainError as e:
            raise ApiError(422, str(e)) from None
        explanation = None
        if upload.explain:  # the filtered search, explained from the same pass of the model over the query

            def filtered(rgb: Image.Image, encoded: Encoded) -> tuple[list[Hit], tuple[Prediction | None, Any]]:
                hits, top, entries = live.search_where(rgb, upload.k, where, encoded)
                return hits, (top, entries)

            def explained(
                explainer: ExplainService, image: Image.Image
            ) -> tuple[list[Hit], tuple[Prediction | None, Any], Explanation]:
                return explainer.search_with(image, filtered)

            searching[0] += 1
            try:
                hits, (top, entries), explanation = await explained_search(request, upload, limit, explained)
            finally:
                searching[0] -= 1
        else:

            def decode_and_search() -> Any:
                image = decode_bytes(upload.data, upload.name, max_pixels=max_pixels)
                return live.search_where(image, upload.k, where)

            hits, top, entries = await run_search(decode_and_search)
        out = search_response(live.prediction_source, hits, top, upload.k, started)
        for result in out["results"]:
            result["metadata"] = entries[result["id"]].metadata
        return out if explanation is None else {**out, "explanation": explanation}

    @router.post("/api/gallery", summary="Add images to the gallery (needs the write token)")
    async def add(request: Request) -> dict[str, Any]:
        """Multipart ``image`` (one or more), optional ``label`` and ``metadata`` (a JSON object):
        the ids in the order sent (an image already stored keeps its id) and the gallery's new size."""
        require_write(request, tokens)
        total = max_bytes * ADD_BODY_FACTOR
        check_headers(request.headers, total)
        body = await read_body(request, total, body_timeout)
        form = await parse_form(request, body, max_files=MAX_IMAGES_PER_ADD)
        try:
            files = form.getlist("image")
            if not files or not all(isinstance(f, UploadFile) for f in files):
                raise ApiError(400, "No image: send each picture in a multipart file field named 'image'.")
            images = []
            for f in files:
                assert isinstance(f, UploadFile)
                data = await f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise too_large(max_bytes)
                images.append(ImageBytes(data, f.filename or "upload"))
            label = _field_text(form, "label") or ""
            try:
                metadata = parse_metadata(_field_text(form, "metadata"))
            except FinegrainError as e:
                raise ApiError(422, str(e)) from None
        finally:
            await form.close()
        # encoded with the adds of other requests waiting (after the searches waiting), stored in one transaction
        try:
            ids = await batches.add(AddRequest(images, label, metadata))
        except FinegrainError as e:
            raise refusal(e) from None
        return {"ids": ids, "size": await anyio.to_thread.run_sync(live.store.count)}

    @router.delete("/api/gallery/{entry_id}", summary="Remove an entry and its image (needs the write token)")
    async def remove(entry_id: str, request: Request) -> dict[str, Any]:
        require_write(request, tokens)
        if not await run(live.store.remove, parse_id(entry_id)):
            raise ApiError(404, "no gallery entry with this id")
        return {"removed": int(entry_id), "size": await anyio.to_thread.run_sync(live.store.count)}

    @router.patch("/api/gallery/{entry_id}", summary="Change an entry's label or metadata (needs the write token)")
    async def update(entry_id: str, request: Request) -> dict[str, Any]:
        """JSON body ``{"label": "...", "metadata": {...}}`` (either or both; metadata is replaced)."""

        require_write(request, tokens)
        i = parse_id(entry_id)
        raw = await read_body(request, 64 * 1024, body_timeout)
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict) or not body or set(body) - {"label", "metadata"}:
                raise FinegrainError('send a JSON object with "label" and/or "metadata"')
            label = None if body.get("label") is None else check_label(body["label"])
            metadata = check_metadata(body["metadata"]) if "metadata" in body else None
        except (ValueError, FinegrainError) as e:
            raise ApiError(422, str(e) if isinstance(e, FinegrainError) else "the body is not JSON") from None
        entry = await run(live.store.update, i, label, metadata)
        if entry is None:
            raise ApiError(404, "no gallery entry with this id")
        return entry.to_dict()

    @router.get("/api/gallery", summary="List the gallery's entries")
    async def listing(request: Request) -> dict[str, Any]:
        """Entries in id order, ``?label=`` to keep one label, ``offset`` and ``limit`` (at most 1000) to page."""
        require_read(request, tokens)
        label = request.query_params.get("label")
        offset = _int_param(request, "offset", 0, 10**12)
        size = _int_param(request, "limit", 100, MAX_PAGE)
        entries = await anyio.to_thread.run_sync(live.store.list, label, offset, size)
        total = await anyio.to_thread.run_sync(live.store.count, label)
        return {"entries": [e.to_dict() for e in entries], "count": total, "offset": offset, "limit": size}

    @router.get("/api/gallery/{entry_id}/meta", summary="One entry's label and metadata")
    async def meta(entry_id: str, request: Request) -> dict[str, Any]:
        require_read(request, tokens)
        entry = await anyio.to_thread.run_sync(live.store.get, parse_id(entry_id))
        if entry is None:
            raise ApiError(404, "no gallery entry with this id")
        return entry.to_dict()

    @router.get(
        "/gallery/{entry_id}",
        tags=["search"],
        summary="One gallery image by id",
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "No such image"}},
    )
    async def image(entry_id: str, request: Request) -> Response:
        require_read(request, tokens)
        stored = await anyio.to_thread.run_sync(live.store.image, parse_id(entry_id))
        if stored is None:
            raise ApiError(404, "no gallery image with this id")
        data, media_type = stored
        return Response(
            data,
            media_type=media_type or "application/octet-stream",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    app.include_router(router)
