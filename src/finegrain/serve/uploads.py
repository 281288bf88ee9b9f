"""Reading a search request: the multipart body within its byte limit, ``k``, and the image
decoded within its pixel budget, then searched off the event loop.

Every refusal is an :class:`~finegrain.serve.errors.ApiError`: 400 for a request or file we
cannot read, 413 for an upload over the limit, 422 for a bad ``k``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect

from finegrain.data.images import decode_bytes
from finegrain.errors import FinegrainError, ImageError
from finegrain.retrieval.searcher import Hit, Prediction, SearchService
from finegrain.runs import human_bytes as human
from finegrain.serve.connections import BODY_TIMEOUT
from finegrain.serve.errors import ApiError, echo, no_paths

DEFAULT_K = 8
# Room for the multipart boundaries, headers and the ``k`` field around the image itself.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_LIMIT_SETTING = "--max-image-mpixels"
_K_RE = re.compile(r"[0-9]{1,9}")
_FLAGS = {"1": True, "true": True, "0": False, "false": False}

_REASON_TEXT = {
    "empty": "The uploaded file is empty.",
    "not-an-image": "This file is not an image we can read. Upload a JPEG, PNG, WebP, GIF or BMP picture.",
    "truncated": "This image is truncated (the file is incomplete). Try uploading it again.",
    "corrupt": "This image is corrupt and cannot be decoded.",
    "too-large": "This image has too many pixels to process safely.",
}


def upload_openapi(properties: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a multipart form with these fields, ``image`` required (for the
    routes that read their body themselves, which FastAPI cannot describe)."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": properties}}
        },
    }


@dataclass(frozen=True)
class Upload:
    """A search request, read: the image file's bytes, its name and the number of results."""

    data: bytes
    name: str
    k: int
    filter: str | None = None
    """The ``filter`` form field or query parameter, unparsed (the living gallery's search reads it)."""
    explain: bool = False
    """The ``explain`` form field or query parameter: answer the search's explanation too."""


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The file is too large: uploads are limited to {human(max_bytes)}.")


def parse_k(form_k: list[Any], query_k: list[str], gallery_size: int, max_k: int) -> int:
    """``k`` from the form or the query string (at most once in all); errors quote at most a few characters."""
    upper = min(int(max_k), int(gallery_size))
    given = [v for v in [*form_k, *query_k] if v != ""]
    if len(given) > 1:
        raise ApiError(422, f"k was given {len(given)} times; send it once")
    if not given:
        if upper < 1:
            raise ApiError(422, "the gallery is empty")
        return min(DEFAULT_K, upper)
    raw = given[0]
    if not isinstance(raw, str):
        raise ApiError(422, "k must be an integer, not a file")
    text = raw.strip()
    if not _K_RE.fullmatch(text):
        raise ApiError(422, f"k must be a whole number between 1 and {upper}; got {echo(text, 8)}")
    k = int(text)
    if k < 1 or k > upper:
        raise ApiError(422, f"k must be between 1 and {upper}; got {k}")
    return k


def parse_flag(name: str, values: list[Any]) -> bool:
    """A yes/no field (``1``/``true`` or ``0``/``false``, at most once in the form and query string)."""
    given = [v for v in values if v != ""]
    if len(given) > 1:
        raise ApiError(422, f"{name} was given {len(given)} times; send it once")
    if not given:
        return False
    if not isinstance(given[0], str):
        raise ApiError(422, f"{name} must be 1 or 0, not a file")
    if given[0].strip().lower() not in _FLAGS:
        raise ApiError(422, f"{name} must be 1 or 0 (true or false); got {echo(given[0], 8)}")
    return _FLAGS[given[0].strip().lower()]


def check_headers(headers: Any, max_bytes: int) -> None:
    """Refuse from its headers a body over the limit or one that is not a multipart form."""
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if declared > max_bytes + MULTIPART_OVERHEAD:
            raise too_large(max_bytes)
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "Send the image as multipart/form-data with an 'image' file field.")


async def read_body(request: Request, max_bytes: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The body, counted as it arrives (Content-Length may be absent or lie): 413 past the limit,
    408 when it has not all arrived within ``timeout`` seconds."""
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes + MULTIPART_OVERHEAD:
                    raise too_large(max_bytes)
    except ClientDisconnect:
        raise ApiError(400, "the upload was interrupted") from None
    except TimeoutError:
        raise ApiError(408, f"the upload did not arrive within {timeout:g} s", {"Connection": "close"}) from None
    return bytes(body)


def replay(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` that hands over ``body`` once, then a disconnect."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def parse_form(request: Request, body: bytes, max_files: int = 1) -> FormData:
    """``body`` parsed as the request's multipart form (``max_files`` files, a few fields)."""
    try:
        return await Request(request.scope, receive=replay(body)).form(max_files=max_files, max_fields=10)
    except Exception as e:  # noqa: BLE001 - malformed multipart, or too many files
        raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None


async def read_upload(
    request: Request, max_bytes: int, gallery_size: int, max_k: int, body_timeout: float = BODY_TIMEOUT
) -> Upload:
    """The image and ``k`` of a ``POST /api/search`` request, within ``max_bytes`` of image and
    ``body_timeout`` seconds."""
    check_headers(request.headers, max_bytes)
    form = await parse_form(request, await read_body(request, max_bytes, body_timeout))
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "No image: send the picture in a multipart file field named 'image'.")
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large(max_bytes)
        k = parse_k(form.getlist("k"), request.query_params.getlist("k"), gallery_size, max_k)
        given = [v for v in [*form.getlist("filter"), *request.query_params.getlist("filter")] if v != ""]
        if len(given) > 1 or not all(isinstance(v, str) for v in given):
            raise ApiError(422, "send one filter, as text")
        explain = parse_flag("explain", [*form.getlist("explain"), *request.query_params.getlist("explain")])
        return Upload(data, upload.filename or "upload", k, str(given[0]) if given else None, explain)
    finally:
        await form.close()


def image_error_message(e: ImageError, max_pixels: int | None = None) -> str:
    """What the client is told about an unusable upload (never a server path)."""
    text = _REASON_TEXT.get(e.reason, "This file cannot be read as an image.")
    if e.reason != "too-large":
        return text
    if e.detail:
        text = f"{text[:-1]} ({no_paths(e.detail)})."
    if max_pixels:
        text += (
            f" This server accepts at most {max_pixels / 1e6:g} Mpixel per image (setting "
            f"{IMAGE_LIMIT_SETTING}); larger JPEGs are decoded at a reduced scale."
        )
    return text


def decode_and_search(
    searcher: SearchService, upload: Upload, max_pixels: int | None
) -> tuple[list[Hit], Prediction | None]:
    """Decode the upload (at most ``max_pixels``; JPEGs reduced) and search with it."""
    return searcher.search(decode_bytes(upload.data, upload.name, max_pixels=max_pixels), upload.k)


async def search_upload(
    searcher: SearchService, upload: Upload, max_pixels: int | None, limit: asyncio.Semaphore
) -> tuple[list[Hit], Prediction | None]:
    """:func:`decode_and_search` in a worker thread, at most ``limit`` at once; an unreadable
    image is a 400, any other refusal of the searcher a 422 (without server paths)."""
    async with limit:
        try:
            return await anyio.to_thread.run_sync(decode_and_search, searcher, upload, max_pixels)
        except ImageError as e:
            raise ApiError(400, image_error_message(e, max_pixels)) from None
        except FinegrainError as e:
            raise ApiError(422, no_paths(str(e))) from None
