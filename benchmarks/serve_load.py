"""Load test of the search service: N requests from C concurrent clients, latency and throughput.

    python benchmarks/serve_load.py                      # starts a server with a tiny real CNN
    python benchmarks/serve_load.py --run runs/my-run    # starts a server for a real run (Searcher)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # targets a running server

Only loopback servers are ever targeted (127.0.0.0/8, ::1, localhost); any other URL is
refused. The request count and the wall time are both bounded. Results go to
``benchmarks/out/serve_load.json`` and are copied to ``benchmarks/results/serve_load.json``
(with ``--out PATH`` they go to PATH only).

Without ``--run`` or ``--url`` the server (a separate process) serves a searcher that runs a
real, randomly initialised small CNN forward pass per query over a synthetic gallery, so the
numbers include image decoding, the model and the index search, not just HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

from common import machine_info

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "serve_load.json"
RESULTS = HERE / "results" / "serve_load.json"


# ----------------------------------------------------------------------------- a tiny real searcher


def synthetic_image(seed: int, size: int = 192):
    """A reproducible picture: a coloured background, a few shapes; ``seed % 10`` is its class."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    cls = seed % 10
    hue = np.array([(cls * 37) % 256, (cls * 91 + 60) % 256, (cls * 53 + 120) % 256])
    y = np.linspace(0, 1, size)[:, None, None]
    bg = (hue * 0.3 + 170) * (1 - y) + (hue * 0.6 + 40) * y
    im = Image.fromarray(np.broadcast_to(bg, (size, size, 3)).astype(np.uint8).copy())
    d = ImageDraw.Draw(im)
    for _ in range(3 + cls % 3):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, 90, 2)
        color = tuple(int(c) for c in np.clip(hue + rng.integers(-40, 40, 3), 0, 255))
        (d.ellipse if cls % 2 else d.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
    return im


class TinyCnnSearcher:
    """A :class:`~finegrain.retrieval.searcher.SearchService`: a small CNN (random weights, fixed seed)
    and a cosine index over a synthetic gallery in ``root``. ``search`` decodes nothing itself: the
    service hands it a PIL image."""

    def __init__(
        self, root: Path, gallery: int = 300, image_size: int = 128, dim: int = 128, num_classes: int = 10
    ) -> None:
        import numpy as np
        import torch
        from torch import nn

        torch.manual_seed(0)
        self._size = image_size
        self._model = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, 2, 1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, 2, 1),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).eval()
        self._embed = nn.Linear(256, dim).eval()
        self._classifier = nn.Linear(256, num_classes).eval()
        self._class_names = [f"class {c:02d}" for c in range(num_classes)]
        root.mkdir(parents=True, exist_ok=True)
        paths, labels = [], []
        for i in range(gallery):
            p = root / f"{i:05d}.jpg"
            if not p.exists():
                synthetic_image(i).save(p, quality=90)
            paths.append(str(p))
            labels.append(i % num_classes)
        from PIL import Image

        embs = []
        for start in range(0, gallery, 64):
            batch = torch.stack([self._tensor(Image.open(p).convert("RGB")) for p in paths[start : start + 64]])
            embs.append(self._forward(batch)[0])
        self._emb = np.concatenate(embs)
        self._paths, self._labels = paths, np.array(labels)
        self._created_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.run = SimpleNamespace(name="tiny-cnn-benchmark")
        self.prediction_source = "classifier"
        self.engine = "torch"

    @property
    def gallery_size(self) -> int:
        return len(self._paths)

    @property
    def info(self) -> dict:
        return {
            "run": self.run.name,
            "model": "tiny_cnn (random init)",
            "task": "classification",
            "dataset": "synthetic",
            "gallery_size": self.gallery_size,
            "embedding_dim": int(self._emb.shape[1]),
            "metric": "cosine",
            "index_kind": "flat",
            "index_bytes_per_vector": None,
            "index_recall_at_10": None,
            "index_lists": None,
            "explain": {"available": False, "reason": "a benchmark model without maps", "stored_maps": False},
            "has_classifier": True,
            "engine": self.engine,
            "created_at": self._created_at,
            "precision": "32",
            "image_sizes": [[self._size, self._size]],
        }

    def gallery_path(self, i: int) -> str:
        return self._paths[i]

    def _tensor(self, im):
        import numpy as np
        import torch

        arr = np.asarray(im.resize((self._size, self._size)), dtype=np.float32) / 255.0
        return torch.from_numpy((arr - 0.45) / 0.25).permute(2, 0, 1)

    def _forward(self, x):
        import torch

        with torch.inference_mode():
            f = self._model(x)
            e = torch.nn.functional.normalize(self._embed(f), dim=-1)
            return e.numpy(), self._classifier(f).softmax(-1).numpy()

    def search(self, image, k: int = 10):
        import numpy as np

        from finegrain.errors import FinegrainError
        from finegrain.retrieval.searcher import Hit

        if k < 1 or k > self.gallery_size:
            raise FinegrainError(f"k must be between 1 and the gallery size ({self.gallery_size}); got {k}")
        emb, probs = self._forward(self._tensor(image.convert("RGB"))[None])
        scores = self._emb @ emb[0]
        ids = np.argsort(-scores)[:k]
        hits = [
            Hit(
                rank=r + 1,
                id=int(i),
                label=self._class_names[int(self._labels[i])],
                score=float(scores[i]),
                path=self._paths[i],
            )
            for r, i in enumerate(ids)
        ]
        order = np.argsort(-probs[0])[:5]
        return hits, [(self._class_names[c], float(probs[0][c])) for c in order]


# ----------------------------------------------------------------------------- the server process


def run_server(args: argparse.Namespace) -> None:
    """``--serve``: the server side, in its own process."""
    import torch
    import uvicorn

    from finegrain.machine import query_threads
    from finegrain.serve.app import create_app

    if args.run:  # threads per query as `finegrain serve` gives them
        from finegrain.retrieval.searcher import Searcher

        searcher = Searcher(args.run, index_dir=Path(args.index) if args.index else None, engine=args.engine)
        searcher.share_cores(args.max_concurrency)
    else:
        torch.set_num_threads(query_threads(args.max_concurrency))
        searcher = TinyCnnSearcher(Path(args.gallery_dir), gallery=args.gallery)
    app = create_app(searcher, max_concurrency=args.max_concurrency)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # other names are never resolved: they could point anywhere


def start_server(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve",
        "--port",
        str(port),
        "--max-concurrency",
        str(args.max_concurrency),
        "--gallery",
        str(args.gallery),
        "--gallery-dir",
        str(tmp / "gallery"),
    ]
    if args.run:
        cmd += ["--run", str(args.run)]
    if args.index:
        cmd += ["--index", str(args.index)]
    cmd += ["--engine", args.engine]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"server exited with code {proc.returncode}")
            try:
                r = await client.get(url + "/api/health")
                if r.status_code == 200:
                    return (await client.get(url + "/api/info")).json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f} s")


# ----------------------------------------------------------------------------- the load


async def load(url: str, query: bytes, n: int, concurrency: int, k: int, warmup: int, max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    server_ms: list[float] = []
    statuses: dict[str, int] = {}
    failures: list[str] = []
    next_i = 0
    deadline = time.monotonic() + max_seconds

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def one() -> tuple[float, int, dict | None]:
            t0 = time.perf_counter()
            r = await client.post(
                "/api/search", files={"image": ("query.jpg", query, "image/jpeg")}, data={"k": str(k)}
            )
            dt = (time.perf_counter() - t0) * 1000.0
            return dt, r.status_code, (r.json() if r.status_code == 200 else None)

        for _ in range(warmup):
            await one()

        async def worker() -> None:
            nonlocal next_i
            while next_i < n and time.monotonic() < deadline:
                next_i += 1
                try:
                    dt, status, body = await one()
                except httpx.HTTPError as e:
                    statuses["exception"] = statuses.get("exception", 0) + 1
                    failures.append(type(e).__name__)
                    continue
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200 and body is not None:
                    latencies.append(dt)
                    server_ms.append(float(body.get("query_ms", 0.0)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0

    sent = sum(statuses.values())
    ok = statuses.get("200", 0)

    def q(values: list[float], p: float) -> float | None:
        if not values:
            return None
        s = sorted(values)
        return round(s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))], 2)

    return {
        "requests": sent,
        "ok": ok,
        "errors": sent - ok,
        "status_counts": statuses,
        "failures": sorted(set(failures)),
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 2) if wall > 0 else None,
        "latency_ms": {
            "p50": q(latencies, 50),
            "p95": q(latencies, 95),
            "p99": q(latencies, 99),
            "mean": round(statistics.fmean(latencies), 2) if latencies else None,
            "max": round(max(latencies), 2) if latencies else None,
        },
        "server_query_ms": {"p50": q(server_ms, 50), "p95": q(server_ms, 95)},
        "stopped_by_time_limit": sent < n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server to target (loopback only)")
    ap.add_argument("--run", help="start a server for this run directory (needs its index)")
    ap.add_argument("--index", help="index folder for --run (default RUN/index)")
    ap.add_argument("--engine", default="auto", help="what runs the model of --run: auto, torch, onnx, onnx-int8")
    ap.add_argument("-n", "--requests", type=int, default=200)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long")
    ap.add_argument("--max-concurrency", type=int, default=2, help="the server's inference concurrency")
    ap.add_argument("--gallery", type=int, default=300, help="synthetic gallery size (tiny CNN mode)")
    ap.add_argument("--image", help="query image file (default: a synthetic 640x480 JPEG)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gallery-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve:
        run_server(args)
        return 0
    if args.requests < 1 or args.requests > 100_000 or args.concurrency < 1 or args.concurrency > 256:
        ap.error("--requests must be 1..100000 and --concurrency 1..256")
    if args.url and not is_loopback_url(args.url):
        ap.error(f"refusing to load-test {args.url}: only loopback servers (127.0.0.0/8, ::1, localhost)")

    if args.image:
        query = Path(args.image).read_bytes()
    else:
        buf = io.BytesIO()
        synthetic_image(7, size=480).resize((640, 480)).save(buf, "JPEG", quality=90)
        query = buf.getvalue()

    tmp = Path(tempfile.mkdtemp(prefix="finegrain-serve-load-"))
    proc = None
    try:
        if args.url:
            url, mode = args.url.rstrip("/"), "external"
        else:
            proc, url = start_server(args, tmp)
            mode = "run" if args.run else "tiny-cnn"
        t0 = time.perf_counter()
        info = asyncio.run(wait_ready(url, proc))
        startup_s = time.perf_counter() - t0
        print(
            f"target {url} ({mode}): {info.get('model')} over {info.get('gallery_size')} gallery images; "
            f"{args.requests} requests, {args.concurrency} concurrent, k={args.k}"
        )
        stats = asyncio.run(load(url, query, args.requests, args.concurrency, args.k, args.warmup, args.max_seconds))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "serve_load",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "url": url if mode == "external" else "http://127.0.0.1:<ephemeral>",
        "model": info.get("model"),
        "run": info.get("run"),
        "gallery_size": info.get("gallery_size"),
        "concurrency": args.concurrency,
        "requests_planned": args.requests,
        "k": args.k,
        "server_max_concurrency": args.max_concurrency if mode != "external" else None,
        "query_image_bytes": len(query),
        "server_startup_s": round(startup_s, 2) if proc else None,
        **stats,
        "machine": machine_info(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    copied = out.resolve() == OUT.resolve()  # a custom --out is a one-off: the recorded result stays
    if copied:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, RESULTS)
    lat = result["latency_ms"]
    print(
        f"ok {result['ok']}/{result['requests']}  errors {result['errors']}  "
        f"p50 {lat['p50']} ms  p95 {lat['p95']} ms  throughput {result['throughput_rps']} req/s  "
        f"(server p50 {result['server_query_ms']['p50']} ms)"
    )
    print(f"wrote {out}" + (f" and {RESULTS}" if copied else ""))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
