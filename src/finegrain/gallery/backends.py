"""Every gallery store backend, registered: import this module to list or open them."""

from __future__ import annotations

from finegrain.gallery import embedded, milvus_store  # noqa: F401 - each registers itself in STORES
from finegrain.gallery.store import STORES

__all__ = ["STORES"]
