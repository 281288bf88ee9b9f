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
Every response, errors and static files included, carries the security headers of
:data:`SECURITY_HEADERS`; a request whose ``Host`` is not one of the server's own names
(DNS rebinding) is refused with 400; no response names a server file path.
The searcher is duck-typed: anything with ``run``, ``cfg``, ``index`` (``paths``,
``labels``, ``meta``), ``class_names``, ``gallery_size`` and ``search(image, k)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mimetypes
import re
import time
from collections.abc import Iterable
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

from finegrain.data.images import DEFAULT_MAX_IMAGE_MPIXELS, decode_bytes
from finegrain.errors import FinegrainError, ImageError
from finegrain.machine import package_version

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_K = 8
# Room for the multipart boundaries, headers and the ``k`` field around the image itself.
MULTIPART_OVERHEAD = 64 * 1024
_ID_RE = re.compile(r"[0-9]{1,12}")
_K_RE = re.compile(r"[0-9]{1,9}")
IMAGE_LIMIT_SETTING = "--max-image-mpixels"

# The page's policy: everything from this origin, no inline code, never framed.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc pages are inline scripts + CDN assets; still never framed.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
            "https://cdn.jsdelivr.net; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_HOST_HEADER_RE = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]{0,5})?")

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
truncated, or more pixels than `max_image_pixels` of `/api/info`: larger JPEGs are decoded at a
reduced scale instead), 413 for an upload over the size limit, 422 for a `k` out of range or
given twice, 400 for a request whose `Host` is not one of the server's names.
"""


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _echo(value: str, limit: int = 12) -> str:
    """A client's value quoted for an error message, cut to ``limit`` characters."""
    value = str(value)
    return repr(value if len(value) <= limit else value[:limit] + "…")


_ABS_PATH_RE = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:\\)[^\s'\"`()\[\],;]*")


def _no_paths(message: str) -> str:
    """``message`` with every absolute file path replaced by its last component."""
    return _ABS_PATH_RE.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1] or "…", message)


# --------------------------------------------------------------------------- hosts and headers


def normalise_host(name: str) -> str:
    """A host name or IP address as a ``Host`` header names it (lower case, IPv6 in brackets);
    :class:`FinegrainError` for anything else (a port, a URL, spaces)."""
    h = str(name).strip().lower()
    if h.count(":") >= 2 and not h.startswith("["):
        h = f"[{h}]"
    if not _HOST_RE.fullmatch(h):
        raise FinegrainError(f"not a host name or IP address: {_echo(name, 40)} "
                             "(give a name such as myhost.lan or 192.168.1.5, without a port)")
    return h


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names the service answers to: localhost, 127.0.0.1, [::1], the bound
    address (unless it is a wildcard such as 0.0.0.0) and ``extra``."""
    hosts = set(LOCAL_HOSTS)
    if bind.strip().lower() not in _WILDCARD_BINDS:
        hosts.add(normalise_host(bind))
    hosts.update(normalise_host(h) for h in extra)
    return frozenset(hosts)


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _host_of(header: str) -> str | None:
    m = _HOST_HEADER_RE.fullmatch(header.strip().lower())
    return m.group(1) if m and m.group(1) else None


class _Guard:
    """Outermost ASGI layer: refuses requests for a ``Host`` not in ``hosts`` (a DNS-rebinding
    page names its own domain) and puts the security headers on every response, errors too."""

    def __init__(self, app: Any, hosts: frozenset[str], docs_paths: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.docs_paths = docs_paths
        self.page_headers = _raw_headers(SECURITY_HEADERS)
        self.docs_headers = _raw_headers({**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP})
        self.names = {k for k, _ in self.page_headers}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", ()) if k == b"host"]
        host = _host_of(values[0].decode("latin-1")) if len(values) == 1 else None
        extra = self.docs_headers if scope.get("path") in self.docs_paths else self.page_headers

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":  # ours replace any the route set
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in self.names]
                message = {**message, "headers": kept + extra}
            await send(message)

        if host not in self.hosts:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            refusal = _error(400, "Unknown Host header: this server answers only to its own address "
                                  "(start it with --allow-host NAME to add a name).")
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


class _GuardedFastAPI(FastAPI):
    """FastAPI with :class:`_Guard` outside even the 500 handler."""

    def build_middleware_stack(self) -> Any:
        docs = frozenset(p for p in (self.docs_url, self.redoc_url, self.swagger_ui_oauth2_redirect_url) if p)
        return _Guard(super().build_middleware_stack(), self.state.allowed_hosts, docs)


# --------------------------------------------------------------------------- decoding uploads


_REASON_TEXT = {
    "empty": "The uploaded file is empty.",
    "not-an-image": "This file is not an image we can read. Upload a JPEG, PNG, WebP, GIF or BMP picture.",
    "truncated": "This image is truncated (the file is incomplete). Try uploading it again.",
    "corrupt": "This image is corrupt and cannot be decoded.",
    "too-large": "This image has too many pixels to process safely.",
}


def image_error_message(e: ImageError, max_pixels: int | None = None) -> str:
    """What the client is told about an unusable upload (never a server path)."""
    text = _REASON_TEXT.get(e.reason, "This file cannot be read as an image.")
    if e.reason != "too-large":
        return text
    if e.detail:
        text = f"{text[:-1]} ({_no_paths(e.detail)})."
    if max_pixels:
        text += (f" This server accepts at most {max_pixels / 1e6:g} Mpixel per image (setting "
                 f"{IMAGE_LIMIT_SETTING}); larger JPEGs are decoded at a reduced scale.")
    return text


def _display_name(location: Any) -> str:
    """The last component of a path (a dataset root): the server's folders stay private."""
    text = str(location).rstrip("\\/")
    return re.split(r"[\\/]", text)[-1] or text


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
        "dataset": _display_name(cfg.data.root),
        "gallery_size": int(searcher.gallery_size),
        "embedding_dim": meta.get("dim"),
        "metric": meta.get("metric"),
        "index_kind": meta.get("kind"),
        "has_classifier": _has_classifier(searcher),
        "engine": getattr(searcher, "engine", None),
        "created_at": meta.get("created_at"),
    }


# --------------------------------------------------------------------------- the application


def create_app(searcher: Any, max_upload_bytes: int = 10 * 2**20, max_concurrency: int = 2,
               max_k: int = 50, max_image_pixels: int | None = int(DEFAULT_MAX_IMAGE_MPIXELS * 1e6),
               host: str = "127.0.0.1", allow_hosts: Iterable[str] = ()) -> FastAPI:
    """The FastAPI application serving ``searcher``.

    Uploads over ``max_image_pixels`` are refused (JPEGs decoded reduced); requests are answered
    only for the ``Host`` names of :func:`allowed_hosts` (``host`` is the bound address)."""
    max_upload_bytes = int(max_upload_bytes)
    max_image_pixels = int(max_image_pixels) if max_image_pixels else None
    app = _GuardedFastAPI(
        title="finegrain search",
        description=DESCRIPTION,
        version=(package_version("finegrain") or "0"),
        openapi_tags=[{"name": "search", "description": "Image search and classification"},
                      {"name": "service", "description": "Health and metadata"}],
    )
    app.state.searcher = searcher
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_k = max_k
    app.state.max_image_pixels = max_image_pixels
    app.state.allowed_hosts = allowed_hosts(host, allow_hosts)
    semaphore = asyncio.Semaphore(max(1, int(max_concurrency)))
    info = {**describe(searcher), "max_upload_bytes": max_upload_bytes, "max_k": int(max_k),
            "max_image_pixels": max_image_pixels}

    # ---- errors: always {"error": ...}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"not found: {_echo(request.url.path, 60)}"
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
        # the security headers (CSP, nosniff, ...) are added to every response by _Guard
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

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
            k = _parse_k(form.getlist("k"), request.query_params.getlist("k"), searcher.gallery_size, max_k)
            name = upload.filename or "upload"
        finally:
            await form.close()
        del body

        async with semaphore:
            try:
                hits, top = await anyio.to_thread.run_sync(
                    _decode_and_search, searcher, data, name, k, max_image_pixels)
            except ImageError as e:
                raise ApiError(400, image_error_message(e, max_image_pixels)) from None
            except FinegrainError as e:
                raise ApiError(422, _no_paths(str(e))) from None
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
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})

    return app


def _decode_and_search(searcher: Any, data: bytes, name: str, k: int, max_pixels: int | None = None):
    image = decode_bytes(data, name, max_pixels=max_pixels)
    return searcher.search(image, k)


def _parse_k(form_k: list[Any], query_k: list[str], gallery_size: int, max_k: int) -> int:
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
        raise ApiError(422, f"k must be a whole number between 1 and {upper}; got {_echo(text, 8)}")
    k = int(text)
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


def check_serve_options(host: str, port: Any, max_upload_mb: Any, max_image_mpixels: Any,
                        allow_hosts: Iterable[str]) -> frozenset[str]:
    """Validate ``serve``'s options (one :class:`FinegrainError` naming the option); return the allowed hosts."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FinegrainError(f"--port must be between 1 and 65535; got {_echo(port, 12)}")
    for option, value in (("--max-upload-mb", max_upload_mb), (IMAGE_LIMIT_SETTING, max_image_mpixels)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise FinegrainError(f"{option} must be a number above 0; got {_echo(value, 12)}")
    if not str(host).strip():
        raise FinegrainError("--host must not be empty")
    return allowed_hosts(host, allow_hosts)


def serve(run_path: str | Path, index_dir: Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10, max_image_mpixels: float = DEFAULT_MAX_IMAGE_MPIXELS,
          allow_hosts: Iterable[str] = (), engine: str = "auto") -> None:
    """Load a run's model (on ``engine``: torch, onnx or auto) and gallery index; serve the page and API
    with uvicorn.

    Options are checked before anything loads: a bad one is a :class:`FinegrainError`."""
    import uvicorn

    allow_hosts = list(allow_hosts or ())
    hosts = check_serve_options(host, port, max_upload_mb, max_image_mpixels, allow_hosts)

    from finegrain.retrieval.searcher import Searcher

    searcher = Searcher(run_path, index_dir=Path(index_dir) if index_dir else None, engine=engine)
    app = create_app(searcher, max_upload_bytes=int(max_upload_mb * 2**20),
                     max_image_pixels=int(max_image_mpixels * 1e6), host=host, allow_hosts=allow_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service is reachable from other machines", host)
    if host.strip().lower() in _WILDCARD_BINDS and not allow_hosts:
        log.warning("listening on all interfaces, but only %s are accepted as Host: add this machine's "
                    "name or address with --allow-host", ", ".join(sorted(hosts)))
    print(f"finegrain: serving {searcher.run.name} ({searcher.gallery_size} gallery images) "
          f"with the {getattr(searcher, 'engine', 'torch')} engine on http://{host}:{port}/  (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")
