"""Fault injection for tests/test_faults.py, kept out of the shipped package.

The fault tests put this folder first on ``PYTHONPATH``; Python imports ``sitecustomize`` at start-up,
and this one, when ``FINEGRAIN_FAULT=<point>[@<n>]`` is set, SIGKILLs the process (no cleanup, no
``finally``) the n-th time (default the first) the point is reached:

- ``write:<file name>``: finegrain's atomic writer, with half the temporary file written;
- ``batch:<epoch>:<batch>``: training, after that batch (both counted from 0);
- ``swap:<folder name>``: an index save, between moving the old index aside and the new one in.

and ``nospace:<file name>`` makes the atomic writer fail as on a full disk, with half the
temporary file written (an ``OSError`` ENOSPC, not a kill).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

FAULT = os.environ.get("FINEGRAIN_FAULT", "")
POINT, _, NTH = FAULT.partition("@")
_reached = 0


def _due(point: str) -> bool:
    global _reached
    if point != POINT:
        return False
    _reached += 1
    return _reached == int(NTH or 1)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_writer_fault(kind: str, wrap: type) -> None:
    """finegrain's atomic writer, the real one, with its temporary file wrapped in ``wrap`` the time
    ``<kind>:<file name>`` is due (:class:`_KilledMidWrite` or :class:`_FullDisk`)."""
    from finegrain import runs  # before any module imports atomic_write_bytes by name

    real = runs.atomic_write_bytes
    real_fdopen = os.fdopen

    def atomic_write_bytes(path: Path, data: bytes) -> None:
        if not _due(f"{kind}:{path.name}"):
            return real(path, data)
        os.fdopen = lambda *a, **k: wrap(real_fdopen(*a, **k))
        try:
            return real(path, data)
        finally:
            os.fdopen = real_fdopen

    runs.atomic_write_bytes = atomic_write_bytes


def _install_batch_fault() -> None:
    from finegrain.tasks import engine

    real = engine.RunState.on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _due(f"batch:{trainer.current_epoch}:{batch_idx}"):
            _die()
        real(self, trainer, pl_module, outputs, batch, batch_idx)

    engine.RunState.on_train_batch_end = on_train_batch_end


class _FullDisk:
    """A file whose next write fills the disk: half the data lands, then ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class _KilledMidWrite(_FullDisk):
    """A file whose next write lands half its data, synced, and then the process dies."""

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        _die()
        return 0


class _SwapOs:
    """``os`` for the index module, dying at the rename that moves a new index into place."""

    def rename(self, src, dst) -> None:
        if str(src).endswith(".new.tmp") and _due(f"swap:{Path(dst).name}"):
            _die()
        os.rename(src, dst)

    def __getattr__(self, name: str):
        return getattr(os, name)


def _install_swap_fault() -> None:
    from finegrain.retrieval import index

    index.os = _SwapOs()


if POINT.startswith("write:"):
    _install_writer_fault("write", _KilledMidWrite)
elif POINT.startswith("batch:"):
    _install_batch_fault()
elif POINT.startswith("nospace:"):
    _install_writer_fault("nospace", _FullDisk)
elif POINT.startswith("swap:"):
    _install_swap_fault()
