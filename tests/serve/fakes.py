"""The service's test doubles and helpers: :class:`FakeSearcher` (a ``SearchService`` without a
model or an index, over synthetic bird pictures), the app the test client may talk to, and
assertions on error bodies and security headers."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from finegrain.errors import FinegrainError
from finegrain.retrieval.searcher import Hit, Prediction, ServiceInfo
from finegrain.serve.app import create_app

CLASSES = [
    ("Indigo Bunting", (40, 70, 200)),
    ("Scarlet Tanager", (205, 40, 45)),
    ("American Goldfinch", (235, 200, 40)),
    ("Green Jay", (40, 160, 90)),
    ("Orange-crowned Warbler", (240, 130, 40)),
    ("Gray Catbird", (120, 125, 135)),
]
PER_CLASS = 4


def draw_bird(color: tuple[int, int, int], variant: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small synthetic picture: a sky-to-grass gradient and a bird-ish blob of ``color``."""
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([200, 222, 245]) * (1 - y) + np.array([160, 200, 150]) * y
    arr = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8).copy()
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    u = w / 160  # features scale with the picture
    cx = int(w * (0.42 + 0.08 * (variant % 3)))
    cy = int(h * (0.47 + 0.04 * (variant % 2)))
    rw, rh = int(w * 0.2), int(h * 0.19)
    hx, hy, hr = cx + rw - int(4 * u), cy - rh - int(2 * u), int(15 * u)
    dark = tuple(int(c * 0.6) for c in color)
    d.rectangle([0, int(h * 0.72), w, int(h * 0.76)], fill=(110, 80, 50))  # branch
    d.polygon(
        [(cx - rw + 6 * u, cy), (cx - rw - 30 * u, cy - (10 - 5 * variant) * u), (cx - rw - 26 * u, cy + 14 * u)],
        fill=dark,
    )  # tail
    d.ellipse([cx - rw, cy - rh, cx + rw, cy + rh], fill=color)  # body
    d.ellipse([cx - rw * 0.5, cy - rh * 0.2, cx + rw * 0.4, cy + rh * 0.6], fill=dark)  # wing
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=color)  # head
    d.polygon(
        [(hx + hr - 2 * u, hy - 4 * u), (hx + hr + 12 * u, hy), (hx + hr - 2 * u, hy + 4 * u)], fill=(60, 50, 40)
    )  # beak
    d.ellipse([hx + 3 * u, hy - 6 * u, hx + 9 * u, hy], fill=(20, 20, 20))  # eye
    d.line([(cx - 4 * u, cy + rh), (cx - 4 * u, h * 0.72)], fill=(60, 50, 40), width=max(1, int(2 * u)))  # legs
    d.line([(cx + 6 * u, cy + rh), (cx + 6 * u, h * 0.72)], fill=(60, 50, 40), width=max(1, int(2 * u)))
    return im


def _mean_color(im: Image.Image) -> np.ndarray:
    small = np.asarray(im.convert("RGB").resize((32, 24)), dtype=np.float32) / 255.0
    # weight the centre, where the bird is
    return small[4:20, 6:26].reshape(-1, 3).mean(0)


class FakeSearcher:
    """A :class:`~finegrain.retrieval.searcher.SearchService` without a model or an index.

    The gallery is PNG files in ``root`` (one JPEG too); the "embedding" is the centred mean
    colour, so hits are deterministic and sensible. Public are the protocol's members and the
    counters the tests read (``calls``, ``max_active``, ``on_event_loop``); ``dataset`` is
    returned by ``info`` as given, so a test can hand the service a path and check it is hidden.
    """

    def __init__(
        self, root: Path, with_classifier: bool = True, delay: float = 0.0, dataset: str = "synthetic-birds"
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        paths, labels = [], []
        for c, (_name, color) in enumerate(CLASSES):
            for v in range(PER_CLASS):
                ext = "jpg" if (c, v) == (0, 1) else "png"
                p = root / f"{c:02d}_{v}.{ext}"
                if not p.exists():
                    draw_bird(color, v).save(p)
                paths.append(str(p))
                labels.append(c)
        self.run = SimpleNamespace(name="fake-run")
        self.prediction_source = "classifier" if with_classifier else "neighbours"
        self.engine = "torch"
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.on_event_loop = False
        self._with_classifier = with_classifier
        self._dataset = dataset
        self._delay = delay
        self._lock = threading.Lock()
        self._paths = paths
        self._labels = np.array(labels)
        self._class_names = [n for n, _ in CLASSES]
        self._emb = self._norm(np.stack([_mean_color(Image.open(p)) for p in paths]))

    @staticmethod
    def _norm(e: np.ndarray) -> np.ndarray:
        e = e - 0.5
        return e / (np.linalg.norm(e, axis=-1, keepdims=True) + 1e-8)

    @property
    def gallery_size(self) -> int:
        return len(self._paths)

    @property
    def info(self) -> ServiceInfo:
        return {
            "run": self.run.name,
            "model": "tiny_cnn",
            "task": "classification" if self._with_classifier else "metric_learning",
            "dataset": self._dataset,
            "gallery_size": self.gallery_size,
            "embedding_dim": 3,
            "metric": "cosine",
            "index_kind": "flat",
            "index_bytes_per_vector": 32.0,
            "index_recall_at_10": None,
            "index_lists": None,
            "explain": {"available": False, "reason": "the fake draws no maps", "stored_maps": False},
            "has_classifier": self._with_classifier,
            "engine": self.engine,
            "created_at": "2024-01-01T00:00:00Z",
            "precision": "32",
            "image_sizes": [[120, 160]],
        }

    def gallery_path(self, i: int) -> str:
        return self._paths[i]

    def search(self, image: Image.Image, k: int = 10) -> tuple[list[Hit], Prediction | None]:
        try:
            asyncio.get_running_loop()
            self.on_event_loop = True
        except RuntimeError:
            pass
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self._delay:
                time.sleep(self._delay)
            if k < 1 or k > self.gallery_size:
                raise FinegrainError(f"k must be between 1 and the gallery size ({self.gallery_size}); got {k}")
            q = self._norm(_mean_color(image)[None])[0]
            scores = self._emb @ q
            order = np.argsort(-scores, kind="stable")[:k]
            hits = [
                Hit(
                    rank=r + 1,
                    id=int(i),
                    label=self._class_names[int(self._labels[i])],
                    score=float(scores[i]),
                    path=self._paths[i],
                )
                for r, i in enumerate(order)
            ]
            top = None
            if self._with_classifier:
                per_class = np.array([scores[self._labels == c].mean() for c in range(len(CLASSES))])
                p = np.exp(8 * per_class)
                p /= p.sum()
                best = np.argsort(-p)[:5]
                top = [(self._class_names[c], float(p[c])) for c in best]
            return hits, top
        finally:
            with self._lock:
                self.active -= 1


# The test client sends ``Host: testserver``: allowed here explicitly, never by default.
TEST_HOST = "testserver"


def make_app(searcher, **kw):
    """:func:`create_app` answering to the test client's host name too."""
    return create_app(searcher, allow_hosts=[TEST_HOST], **kw)


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def post_image(client, data: bytes, name: str = "q.png", ctype: str = "image/png", **fields):
    return client.post("/api/search", files={"image": (name, data, ctype)}, data={k: str(v) for k, v in fields.items()})


def assert_error(resp, status: int, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert contains.lower() in body["error"].lower(), body["error"]
    return body


def assert_security_headers(r, docs: bool = False) -> None:
    h = r.headers
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, r.url
    if not docs:
        assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] == "DENY"
    assert h["referrer-policy"] == "no-referrer"
    for name in ("content-security-policy", "x-content-type-options", "x-frame-options"):
        assert len(h.get_list(name)) == 1, (name, r.url)
