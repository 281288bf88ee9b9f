"""The search service: a web page and a JSON API over a :class:`~finegrain.retrieval.searcher.Searcher`.

``create_app(searcher)`` builds the FastAPI application; ``serve(run)`` loads a
run's model and index and runs it with uvicorn (``finegrain serve RUN``).

Routes
------
``GET /``                 the search page (``static/index.html``; CSS and JS from ``/static``)
``POST /api/search``      multipart ``image`` file (+ ``k``) -> prediction and the k most similar images
``GET /api/health``       ``{"status": "ok"}``
``GET /api/info``         the run, model, gallery and index behind the service
``GET /gallery/{id}``     one indexed gallery image, by its integer id in the index

Every error is JSON ``{"error": message}`` with a 4xx status (5xx only for a bug).
The searcher is duck-typed: anything with ``run``, ``cfg``, ``index`` (``paths``,
``labels``, ``meta``), ``class_names``, ``gallery_size`` and ``search(image, k)``.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from finegrain.data.images import decode_bytes
from finegrain.errors import FinegrainError, ImageError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_K = 8
# Room for the multipart boundaries, headers and the ``k`` field around the image itself.
MULTIPART_OVERHEAD = 64 * 1024
_ID_RE = re.compile(r"[0-9]{1,12}")

DESCRIPTION = """\
Search a gallery of images for the ones most similar to an uploaded picture, and (when the
model has a classifier) predict its class.

* `POST /api/search` — multipart form with an `image` file and an optional `k` (number of
  results, default 8, at most `min(max_k, gallery_size)`). Returns the top-5 class
  probabilities (`prediction`, or `null` without a classifier) and the `k` nearest gallery
  images, each with a `url` under `/gallery/{id}`.
* `GET /api/info` — what the service runs: run, backbone, task, dataset, gallery size, index.
* `GET /gallery/{id}` — one gallery image by its integer id.

Errors are JSON `{"error": "..."}`: 400 for a file that is not a readable image (corrupt,
truncated, too many pixels), 413 for an upload over the size limit, 422 for a `k` out of range.
"""


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --------------------------------------------------------------------------- decoding uploads


_REASON_TEXT = {
    "empty": "The uploaded file is empty.",
    "not-an-image": "This file is not an image we can read. Upload a JPEG, PNG, WebP, GIF or BMP picture.",
    "truncated": "This image is truncated (the file is incomplete). Try uploading it again.",
    "corrupt": "This image is corrupt and cannot be decoded.",
    "too-large": "This image has too many pixels to process safely.",
}


def image_error_message(e: ImageError) -> str:
    text = _REASON_TEXT.get(e.reason, "This file cannot be read as an image.")
    return f"{text} ({e.detail})" if e.reason == "too-large" and e.detail else text


# --------------------------------------------------------------------------- describing the searcher


def _has_classifier(searcher: Any) -> bool:
    explicit = getattr(searcher, "has_classifier", None)
    if explicit is not None:
        return bool(explicit)
    model = getattr(getattr(searcher, "loaded", None), "model", None)
    if model is not None:
        return getattr(model, "classifier", None) is not None
    return getattr(getattr(searcher, "cfg", None), "task", None) == "classification"


def describe(searcher: Any) -> dict[str, Any]:
    """The ``/api/info`` payload."""
    cfg = searcher.cfg
    meta = dict(getattr(searcher.index, "meta", {}) or {})
    run = getattr(searcher, "run", None)
    run_name = getattr(run, "name", None) or (Path(run.path).name if getattr(run, "path", None) else cfg.name)
    return {
        "run": str(run_name),
        "model": str(cfg.model.backbone),
        "task": str(cfg.task),
        "dataset": str(cfg.data.root),
        "gallery_size": int(searcher.gallery_size),
        "embedding_dim": meta.get("dim"),
        "metric": meta.get("metric"),
        "index_kind": meta.get("kind"),
        "has_classifier": _has_classifier(searcher),
        "created_at": meta.get("created_at"),
    }


# --------------------------------------------------------------------------- the application


def create_app(searcher: Any, max_upload_bytes: int = 10 * 2**20, max_concurrency: int = 2,
               max_k: int = 50) -> FastAPI:
    """The FastAPI application serving ``searcher``."""
    max_upload_bytes = int(max_upload_bytes)
    app = FastAPI(
        title="finegrain search",
        description=DESCRIPTION,
        version=_version(),
        openapi_tags=[{"name": "search", "description": "Image search and classification"},
                      {"name": "service", "description": "Health and metadata"}],
    )
    app.state.searcher = searcher
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_k = max_k
    semaphore = asyncio.Semaphore(max(1, int(max_concurrency)))
    info = {**describe(searcher), "max_upload_bytes": max_upload_bytes, "max_k": int(max_k)}

    # ---- errors: always {"error": ...}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"not found: {request.url.path}"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error")

    # ---- the page

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        })

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---- the API

    @app.get("/api/health", tags=["service"], summary="Liveness check")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info", tags=["service"], summary="What the service runs")
    async def api_info() -> dict[str, Any]:
        """Run name, backbone, task, dataset, gallery size, embedding dimension, metric,
        index kind, whether the model has a classifier and when the index was built."""
        return info

    @app.post(
        "/api/search", tags=["search"], summary="Search the gallery with an image",
        openapi_extra={
            "parameters": [{
                "name": "k", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": max_k, "default": DEFAULT_K},
                "description": "Number of results (may also be sent as a form field).",
            }],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary",
                              "description": f"The query image (at most {max_upload_bytes} bytes)."},
                    "k": {"type": "integer", "minimum": 1, "maximum": max_k, "default": DEFAULT_K},
                },
            }}}},
            "responses": {
                "400": {"description": "Not an image, corrupt, truncated or too many pixels"},
                "413": {"description": "Upload too large"},
                "422": {"description": "k out of range"},
            },
        },
    )
    async def search(request: Request) -> dict[str, Any]:
        """Top-5 class probabilities (``prediction``, ``null`` without a classifier) and the
        ``k`` most similar gallery images (``results``), with the query time in ms."""
        t0 = time.perf_counter()
        body_limit = max_upload_bytes + MULTIPART_OVERHEAD
        too_large = ApiError(413, f"The file is too large: uploads are limited to {_human(max_upload_bytes)}.")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > body_limit:
                    raise too_large
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "Send the image as multipart/form-data with an 'image' file field.")

        body = bytearray()  # read the body ourselves, counting: Content-Length may be absent or lie
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > body_limit:
                    raise too_large
        except ClientDisconnect:
            raise ApiError(400, "the upload was interrupted") from None
        form_request = Request(request.scope, receive=_replay(bytes(body)))
        try:
            form = await form_request.form(max_files=1, max_fields=10)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise ApiError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "No image: send the picture in a multipart file field named 'image'.")
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise too_large
            k = _parse_k(form.get("k"), request.query_params.get("k"), searcher.gallery_size, max_k)
            name = upload.filename or "upload"
        finally:
            await form.close()
        del body

        async with semaphore:
            try:
                hits, top = await anyio.to_thread.run_sync(_decode_and_search, searcher, data, name, k)
            except ImageError as e:
                raise ApiError(400, image_error_message(e)) from None
            except FinegrainError as e:
                raise ApiError(422, str(e)) from None
        return {
            "prediction_source": getattr(searcher, "prediction_source", "classifier"),
            "prediction": None if top is None else [
                {"label": str(label), "probability": float(p)} for label, p in top],
            "results": [
                {"rank": int(h.rank), "id": int(h.id), "label": str(h.label), "score": float(h.score),
                 "same_image": bool(h.same_image), "url": f"/gallery/{int(h.id)}"} for h in hits],
            "query_ms": round((time.perf_counter() - t0) * 1000.0, 2),
            "k": k,
        }

    # ---- gallery images

    @app.get("/gallery/{image_id}", tags=["search"], summary="One gallery image by id",
             responses={200: {"content": {"image/*": {}}}, 404: {"description": "No such image"}})
    async def gallery(image_id: str) -> Response:
        """The indexed image with this integer id (as in ``results[].id``)."""
        if not _ID_RE.fullmatch(image_id):
            raise ApiError(404, "no gallery image with this id")
        i = int(image_id)
        paths = searcher.index.paths
        if i >= len(paths):
            raise ApiError(404, "no gallery image with this id")
        path = Path(paths[i])
        if not path.is_file():
            raise ApiError(404, "this gallery image is no longer on disk")
        media_type = await anyio.to_thread.run_sync(_image_media_type, path)
        if media_type is None:
            raise ApiError(404, "this gallery entry is not a readable image")
        return FileResponse(path, media_type=media_type, headers={
            "Cache-Control": "public, max-age=86400",
            "X-Content-Type-Options": "nosniff",
        })

    return app


def _decode_and_search(searcher: Any, data: bytes, name: str, k: int):
    image = decode_bytes(data, name)
    return searcher.search(image, k)


def _parse_k(form_k: Any, query_k: str | None, gallery_size: int, max_k: int) -> int:
    upper = min(int(max_k), int(gallery_size))
    raw = form_k if form_k not in (None, "") else query_k
    if raw in (None, ""):
        if upper < 1:
            raise ApiError(422, "the gallery is empty")
        return min(DEFAULT_K, upper)
    if not isinstance(raw, str):
        raise ApiError(422, "k must be an integer")
    try:
        k = int(raw.strip())
    except ValueError:
        raise ApiError(422, f"k must be an integer; got '{raw[:20]}'") from None
    if k < 1 or k > upper:
        raise ApiError(422, f"k must be between 1 and {upper}; got {k}")
    return k


def _replay(body: bytes):
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


_MEDIA_CACHE: dict[str, str | None] = {}


def _image_media_type(path: Path) -> str | None:
    """Content type of a gallery image: from its extension, else sniffed by Pillow."""
    key = str(path)
    if key in _MEDIA_CACHE:
        return _MEDIA_CACHE[key]
    guessed, _ = mimetypes.guess_type(path.name)
    media: str | None = guessed if guessed and guessed.startswith("image/") else None
    if media is None:
        try:
            with Image.open(path) as im:
                media = Image.MIME.get(im.format or "")
        except Exception:  # noqa: BLE001
            media = None
    if len(_MEDIA_CACHE) < 100_000:
        _MEDIA_CACHE[key] = media
    return media


def _human(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.3g} MB"
    if n >= 2**10:
        return f"{n / 2**10:.0f} KB"
    return f"{n} bytes"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("finegrain")
    except Exception:  # noqa: BLE001
        return "0"


def serve(run_path: str | Path, index_dir: Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10) -> None:
    """Load a run's model and gallery index and serve the page and API with uvicorn."""
    import uvicorn

    from finegrain.retrieval.searcher import Searcher

    searcher = Searcher(run_path, index_dir=Path(index_dir) if index_dir else None)
    app = create_app(searcher, max_upload_bytes=int(max_upload_mb * 2**20))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service is reachable from other machines", host)
    print(f"finegrain: serving {searcher.run.name} ({searcher.gallery_size} gallery images) "
          f"on http://{host}:{port}/  (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")
