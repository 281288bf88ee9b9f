"""FAISS, imported in one place so that its bundled OpenBLAS uses this CPU's vector kernels.

Every module that needs ``faiss`` (or imports pytorch-metric-learning, which loads it)
calls :func:`import_faiss` first.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import platform
import sys


def _openblas_coretype() -> str | None:
    """An ``OPENBLAS_CORETYPE`` this CPU can run, or None when unsure (non-x86 or no /proc/cpuinfo)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def import_faiss():
    """The ``faiss`` module, imported so that its bundled OpenBLAS uses this CPU's vector kernels.

    The faiss-cpu wheel ships OpenBLAS 0.3.15, which does not recognise recent
    Xeons (e.g. Sapphire/Emerald Rapids) and falls back to its generic SSE3
    ("Prescott") kernels: exact search then runs 4-6x slower. Unless the user set
    ``OPENBLAS_CORETYPE`` themselves, it is set to a kernel family the CPU
    supports while faiss (and so its OpenBLAS) loads, then removed again so no
    other library or child process sees it.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise to users
    coretype = None if "OPENBLAS_CORETYPE" in os.environ else _openblas_coretype()
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        # optional: FAISS (the train/serve extra), imported only when this runs
        import faiss
    finally:
        if coretype:
            os.environ.pop("OPENBLAS_CORETYPE", None)
    return faiss


def faiss_blas_core() -> str | None:
    """The kernel family FAISS's bundled OpenBLAS runs with (diagnostics; None if unknown)."""

    faiss = import_faiss()
    libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), os.pardir, "faiss_cpu.libs", "libopenblas*"))
    if not libs:
        return None
    try:
        lib = ctypes.CDLL(libs[0])
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None
