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

from rich.progress import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


def wanted() -> bool:
    return os.environ.get("FINEGRAIN_PROGRESS", "1") != "0"


def track(
    items: Iterable[T], total: int, description: str, every_fraction: float = 0.1, min_seconds: float = 5.0
) -> Iterator[T]:
    """Yield ``items``; show a bar on a terminal, else log about every tenth of the way, at most once
    every ``min_seconds`` (a loop of a second says nothing until its end), and the end."""
    if not wanted() or total <= 0:
        yield from items
        return
    if sys.stderr.isatty():
        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    t0 = last = time.perf_counter()
    step = max(1, int(total * every_fraction))
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if done == total or (done % step == 0 and now - last >= min_seconds):
            last = now
            log.info("%s: %d/%d (%.0f%%), %.0f s elapsed", description, done, total, 100 * done / total, now - t0)
