"""The search service: a web page and a JSON API over a :class:`~finegrain.retrieval.searcher.SearchService`.

``create_app(searcher)`` builds the FastAPI application; ``serve(run)`` loads a
run's model and index and runs it with uvicorn (``finegrain serve RUN``).

Routes
------
``GET /``                 the search page (``static/index.html``; CSS and JS from ``/static``)
``POST /api/search``      multipart ``image`` file (+ ``k``, + ``explain``) -> prediction and the k most similar images
``GET /api/health``       ``{"status": "ok"}``
``GET /api/info``         the run, model, gallery and index behind the service, and its limits
``GET /gallery/{id}``     one indexed gallery image, by its integer id in the index
``POST /api/explain``     maps of why: :mod:`~finegrain.serve.explain_routes`

Every error is JSON ``{"error": message}`` with a 4xx status (5xx only for a bug), see
:mod:`~finegrain.serve.errors`; hosts and security headers are :mod:`~finegrain.serve.security`'s,
reading and decoding uploads :mod:`~finegrain.serve.uploads`'. The searcher is used only
through what :class:`~finegrain.retrieval.searcher.SearchService` declares.
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
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from finegrain.data.images import DEFAULT_MAX_IMAGE_MPIXELS
from finegrain.errors import FinegrainError
from finegrain.gallery import live
from finegrain.gallery.live import LiveGallery
from finegrain.machine import package_version
from finegrain.retrieval.searcher import (
    Hit,
    Prediction,
    SearchService,
    ServiceInfo,
    dataset_name,
)
from finegrain.serve.connections import BODY_TIMEOUT, guarded_protocol
from finegrain.serve.errors import ApiError, echo, install_error_handlers
from finegrain.serve.explain_routes import explained_search, plain_search
from finegrain.serve.explain_routes import router as explain_router
from finegrain.serve.security import WILDCARD_BINDS, GuardedFastAPI, allowed_hosts
from finegrain.serve.uploads import (
    DEFAULT_K,
    IMAGE_LIMIT_SETTING,
    read_upload,
    search_upload,
    upload_openapi,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_ID_RE = re.compile(r"[0-9]{1,12}")

DESCRIPTION = """\
Search a gallery of images for the ones most similar to an uploaded picture, and (when the
model has a classifier) predict its class.

* `POST /api/search` — multipart form with an `image` file and an optional `k` (number of
  results, default 8, at most `min(max_k, gallery_size)`). Returns the top-5 class
  probabilities (`prediction`, or `null` without a classifier) and the `k` nearest gallery
  images, each with a `url` under `/gallery/{id}`. With `explain=1` also `explanation`: the maps of
  why (the payload of `POST /api/explain` for these results, without their `query_map`), from the
  same pass of the model.
* `POST /api/explain?ids=...` — the maps of why for a query and the results `ids`.
* `GET /api/info` — what the service runs: run, backbone, task, dataset, gallery size, index.
* `GET /gallery/{id}` — one gallery image by its integer id.

Errors are JSON `{"error": "..."}`: 400 for a file that is not a readable image (corrupt,
truncated, or more pixels than `max_image_pixels` of `/api/info`: larger JPEGs are decoded at a
reduced scale instead), 413 for an upload over the size limit, 422 for a `k` out of range or
given twice, 400 for a request whose `Host` is not one of the server's names.
"""


# --------------------------------------------------------------------------- what the service says


def service_info(
    searcher: SearchService, max_upload_bytes: int, max_k: int, max_image_pixels: int | None
) -> dict[str, Any]:
    """The ``/api/info`` payload: the searcher's :class:`ServiceInfo` (the dataset's folder name
    only, whatever it gives) and the server's limits. TypeError for an incomplete ``info``."""
    info = dict(searcher.info)
    missing = sorted(ServiceInfo.__required_keys__ - set(info))
    if missing:
        raise TypeError(f"{type(searcher).__name__}.info lacks {', '.join(missing)}")
    info["dataset"] = dataset_name(str(info["dataset"]))
    return {**info, "max_upload_bytes": max_upload_bytes, "max_k": max_k, "max_image_pixels": max_image_pixels}


def search_openapi(max_k: int, max_upload_bytes: int) -> dict[str, Any]:
    """The OpenAPI description of ``POST /api/search`` (FastAPI cannot infer it: we read the body ourselves)."""
    k_schema = {"type": "integer", "minimum": 1, "maximum": max_k, "default": DEFAULT_K}
    image = {
        "type": "string",
        "format": "binary",
        "description": f"The query image (at most {max_upload_bytes} bytes).",
    }
    explain = {
        "type": "string",
        "enum": ["1", "0", "true", "false"],
        "default": "0",
        "description": "1: also answer `explanation`, the maps `POST /api/explain` gives for these results "
        "(without each result's `query_map`), from the same pass of the model (may also be sent in the query "
        "string).",
    }
    return {
        "parameters": [
            {
                "name": "k",
                "in": "query",
                "required": False,
                "schema": k_schema,
                "description": "Number of results (may also be sent as a form field).",
            }
        ],
        "requestBody": upload_openapi({"image": image, "k": k_schema, "explain": explain}),
        "responses": {
            "400": {"description": "Not an image, corrupt, truncated or too many pixels"},
            "409": {"description": "explain=1 for a service that cannot explain (its model gives no maps)"},
            "413": {"description": "Upload too large"},
            "422": {"description": "k out of range, explain not 1 or 0"},
        },
    }


def search_response(
    prediction_source: str, hits: list[Hit], top: Prediction | None, k: int, started: float
) -> dict[str, Any]:
    """The ``POST /api/search`` answer: gallery ids and URLs, never file names."""
    return {
        "prediction_source": prediction_source,
        "prediction": None if top is None else [{"label": str(label), "probability": float(p)} for label, p in top],
        "results": [
            {
                "rank": int(h.rank),
                "id": int(h.id),
                "label": str(h.label),
                "score": float(h.score),
                "same_image": bool(h.same_image),
                "url": f"/gallery/{int(h.id)}",
            }
            for h in hits
        ],
        "query_ms": round((time.perf_counter() - started) * 1000.0, 2),
        "k": k,
    }


_MEDIA_CACHE: dict[str, str | None] = {}


def image_media_type(path: Path) -> str | None:
    """Content type of a gallery image: from its extension, else sniffed by Pillow (None: not an image)."""
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


# --------------------------------------------------------------------------- the application


def create_app(
    searcher: SearchService,
    max_upload_bytes: int = 10_000_000,
    max_concurrency: int = 2,
    max_k: int = 50,
    max_image_pixels: int | None = int(DEFAULT_MAX_IMAGE_MPIXELS * 1e6),
    host: str = "127.0.0.1",
    allow_hosts: Iterable[str] = (),
    body_timeout: float = BODY_TIMEOUT,
    tokens: Any = None,
) -> FastAPI:
    """The FastAPI application serving ``searcher``.

    A living gallery (:class:`~finegrain.gallery.live.LiveGallery`) also gets the gallery routes of
    :mod:`~finegrain.serve.gallery_routes`, with ``tokens`` (its write and read tokens).

    Uploads over ``max_image_pixels`` are refused (JPEGs decoded reduced); requests are answered
    only for the ``Host`` names of :func:`allowed_hosts` (``host`` is the bound address).
    TypeError if ``searcher`` is not a :class:`SearchService`."""
    if not isinstance(searcher, SearchService):
        raise TypeError(f"{type(searcher).__name__} is not a SearchService (see finegrain.retrieval.searcher)")
    max_upload_bytes, max_k = int(max_upload_bytes), int(max_k)
    max_image_pixels = int(max_image_pixels) if max_image_pixels else None
    app = GuardedFastAPI(
        title="finegrain search",
        description=DESCRIPTION,
        version=(package_version("finegrain") or "0"),
        openapi_tags=[
            {"name": "search", "description": "Image search and classification"},
            {"name": "service", "description": "Health and metadata"},
        ],
    )
    app.state.searcher = searcher
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_k = max_k
    app.state.max_image_pixels = max_image_pixels
    app.state.body_timeout = float(body_timeout)
    app.state.allowed_hosts = allowed_hosts(host, allow_hosts)
    install_error_handlers(app)
    info = service_info(searcher, max_upload_bytes, max_k, max_image_pixels)
    live = isinstance(searcher, LiveGallery)
    if isinstance(searcher, LiveGallery):  # its own info, search and image routes
        # import cycle: gallery_routes uses this module's search_response and search_openapi
        from finegrain.serve.gallery_routes import Tokens, add_gallery_routes

        add_gallery_routes(app, searcher, tokens or Tokens(), info, max_concurrency)
    _add_page(app)
    _add_service_routes(app, None if live else info)
    if not live:
        _add_search_route(app, searcher, asyncio.Semaphore(max(1, int(max_concurrency))))
        _add_gallery_route(app, searcher)
    app.include_router(explain_router)  # POST /api/explain
    return app


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        # the security headers (CSP, nosniff, ...) are added to every response by the Guard
        return FileResponse(
            STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_service_routes(app: FastAPI, info: dict[str, Any] | None) -> None:
    """``/api/health``, and ``/api/info`` answering ``info`` unless it is None (a live gallery answers its own)."""

    @app.get("/api/health", tags=["service"], summary="Liveness check")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if info is None:
        return

    @app.get("/api/info", tags=["service"], summary="What the service runs")
    async def api_info() -> dict[str, Any]:
        """Run name, backbone, task, dataset, gallery size, embedding dimension, metric,
        index kind, whether the model has a classifier, the engine, when the index was built
        and the server's limits."""
        return info


def _add_search_route(app: FastAPI, searcher: SearchService, limit: asyncio.Semaphore) -> None:
    max_upload_bytes, max_k, max_pixels = app.state.max_upload_bytes, app.state.max_k, app.state.max_image_pixels

    @app.post(
        "/api/search",
        tags=["search"],
        summary="Search the gallery with an image",
        openapi_extra=search_openapi(max_k, max_upload_bytes),
    )
    async def search(request: Request) -> dict[str, Any]:
        """Top-5 class probabilities (``prediction``, ``null`` without a classifier) and the
        ``k`` most similar gallery images (``results``), with the query time in ms."""
        started = time.perf_counter()
        upload = await read_upload(request, max_upload_bytes, searcher.gallery_size, max_k, app.state.body_timeout)
        if not upload.explain:
            hits, top = await search_upload(searcher, upload, max_pixels, limit)
            return search_response(searcher.prediction_source, hits, top, upload.k, started)
        hits, top, explanation = await explained_search(request, upload, limit, plain_search(upload.k))
        return {**search_response(searcher.prediction_source, hits, top, upload.k, started), "explanation": explanation}


def _add_gallery_route(app: FastAPI, searcher: SearchService) -> None:
    @app.get(
        "/gallery/{image_id}",
        tags=["search"],
        summary="One gallery image by id",
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "No such image"}},
    )
    async def gallery(image_id: str) -> Response:
        """The indexed image with this integer id (as in ``results[].id``)."""
        if not _ID_RE.fullmatch(image_id) or int(image_id) >= searcher.gallery_size:
            raise ApiError(404, "no gallery image with this id")
        try:
            path = Path(searcher.gallery_path(int(image_id)))
        except FinegrainError:  # outside the gallery folder recorded with the index
            raise ApiError(404, "this gallery entry is not served") from None
        if not path.is_file():
            raise ApiError(404, "this gallery image is no longer on disk")
        media_type = await anyio.to_thread.run_sync(image_media_type, path)
        if media_type is None:
            raise ApiError(404, "this gallery entry is not a readable image")
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})


# --------------------------------------------------------------------------- finegrain serve


def check_serve_options(
    host: str,
    port: Any,
    max_upload_mb: Any,
    max_image_mpixels: Any,
    allow_hosts: Iterable[str],
    max_concurrency: Any = 2,
) -> frozenset[str]:
    """Validate ``serve``'s options (one :class:`FinegrainError` naming the option); return the allowed hosts."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FinegrainError(f"--port must be between 1 and 65535; got {echo(port, 12)}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or not 1 <= max_concurrency <= 64:
        raise FinegrainError(f"--max-concurrency must be between 1 and 64; got {echo(max_concurrency, 12)}")
    for option, value in (("--max-upload-mb", max_upload_mb), (IMAGE_LIMIT_SETTING, max_image_mpixels)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise FinegrainError(f"{option} must be a number above 0; got {echo(value, 12)}")
    if not str(host).strip():
        raise FinegrainError("--host must not be empty")
    return allowed_hosts(host, allow_hosts)


def serve(
    run_path: str | Path,
    index_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 10,
    max_image_mpixels: float = DEFAULT_MAX_IMAGE_MPIXELS,
    allow_hosts: Iterable[str] = (),
    engine: str = "auto",
    max_concurrency: int = 2,
    store: str | None = None,
    write_token_file: Path | None = None,
    read_token_file: Path | None = None,
) -> None:
    """Load a run's model (on ``engine``: torch, onnx or auto) and its gallery store (``store``, by default
    RUN/gallery, made from the index on first use); serve the page and API with uvicorn,
    ``max_concurrency`` searches at once, each on its share of the cores. Writes are on with a write token.

    Options are checked before anything loads: a bad one is a :class:`FinegrainError`."""
    # optional: uvicorn (the serve extra), imported only when this runs
    import uvicorn

    allow_hosts = list(allow_hosts or ())
    hosts = check_serve_options(host, port, max_upload_mb, max_image_mpixels, allow_hosts, max_concurrency)

    # import cycle: gallery_routes imports this module
    from finegrain.serve.gallery_routes import READ_TOKEN_ENV, WRITE_TOKEN_ENV, Tokens, load_token

    tokens = Tokens(
        write=load_token(write_token_file, WRITE_TOKEN_ENV, "--write-token-file"),
        read=load_token(read_token_file, READ_TOKEN_ENV, "--read-token-file"),
    )
    searcher = live.LiveGallery(run_path, store=store, index_dir=Path(index_dir) if index_dir else None, engine=engine)
    threads = searcher.share_cores(max_concurrency)  # concurrent searches must not oversubscribe the cores
    app = create_app(
        searcher,
        max_upload_bytes=int(max_upload_mb * 1e6),
        max_concurrency=max_concurrency,
        max_image_pixels=int(max_image_mpixels * 1e6),
        host=host,
        allow_hosts=allow_hosts,
        tokens=tokens,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service is reachable from other machines", host)
    if host.strip().lower() in WILDCARD_BINDS and not allow_hosts:
        log.warning(
            "listening on all interfaces, but only %s are accepted as Host: add this machine's "
            "name or address with --allow-host",
            ", ".join(sorted(hosts)),
        )
    print(
        f"finegrain: serving {searcher.run.name} ({searcher.gallery_size} gallery images) "
        f"with the {searcher.engine} engine ({max_concurrency} searches at once, {threads} thread(s) each) "
        f"on http://{host}:{port}/  (API docs at /docs; gallery writes "
        f"{'on, with the write token' if tokens.write else 'off'})",
        flush=True,
    )
    # uvicorn's own answers (malformed requests, slow headers) carry the security headers too; no
    # "server: uvicorn" header
    uvicorn.run(app, host=host, port=port, log_level="info", http=guarded_protocol(), server_header=False)
