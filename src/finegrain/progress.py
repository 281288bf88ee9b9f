"""Progress of long loops: a live bar in a terminal, log lines when output goes to a file.

``FINEGRAIN_PROGRESS=0`` silences it. Training uses Lightning's callbacks for the same
behaviour (tasks/engine.py); everything else iterates through :func:`track`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def wanted() -> bool:
    return os.environ.get("FINEGRAIN_PROGRESS", "1") != "0"


def track(items: Iterable[T], total: int, description: str, every_fraction: float = 0.1) -> Iterator[T]:
    """Yield ``items``; show a bar on a terminal, else log about every tenth of the way (and the end)."""
    if not wanted() or total <= 0:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    t0 = time.perf_counter()
    step = max(1, int(total * every_fraction))
    done = 0
    for item in items:
        yield item
        done += 1
        if done % step == 0 or done == total:
            elapsed = time.perf_counter() - t0
            log.info("%s: %d/%d (%.0f%%), %.0f s elapsed", description, done, total, 100 * done / total, elapsed)
