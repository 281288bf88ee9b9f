"""What this machine is and what runs fast on it: CPU features, precision, threads, versions.

Every speed choice is made here, on the machine that runs, never pinned in a config:
``precision: auto`` becomes bf16-mixed only where the hardware computes bf16 natively
(on a CPU without AVX-512 BF16 or AMX, bf16 autocast is 6-13x slower than fp32), and the
threads of torch, the loader workers and FAISS together never outnumber the cores.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from functools import lru_cache
from importlib import metadata

from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
VECTOR_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
    "asimd",
    "sve",
    "bf16",
)
PACKAGES = ("finegrain", "torch", "torchvision", "timm", "lightning", "faiss-cpu", "onnxruntime")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name (``AMD EPYC 9R14``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """The vector-instruction flags of this CPU that matter for speed (a subset of ``VECTOR_FLAGS``)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return tuple(f for f in VECTOR_FLAGS if f in flags)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as torch detects it
    (``torch.cpu.get_capabilities``, torch 2.10 and later); from the CPU's flags without torch or
    with an older one (an ONNX-only server has no torch)."""
    try:
        from torch.cpu import get_capabilities  # optional: the serve extra has no torch
    except ImportError:
        return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    caps = get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cuda_available() -> bool:
    # optional: torch (the train extra), imported only when this runs
    import torch

    return torch.cuda.is_available()


def auto_precision() -> tuple[str, str]:
    """The precision ``auto`` picks on this machine, and why (one sentence)."""
    if cuda_available():
        # optional: torch (the train extra), imported only when this runs
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU supports bf16"
        return "16-mixed", "the GPU has no bf16: fp16 mixed precision"
    if cpu_has_native_bf16():
        return "bf16-mixed", "the CPU computes bf16 natively (AVX-512 BF16 or AMX)"
    return "32", "the CPU has no native bf16 (no AVX-512 BF16 or AMX): bf16 would be emulated and slower"


def resolve_precision(requested: str) -> str:
    """The precision to run with: ``auto`` decided by the machine, an explicit one obeyed
    (with a one-line warning where it is slow or impossible here)."""
    if requested not in PRECISIONS:
        raise FinegrainError(
            f"unknown precision '{requested}' (train.precision or FINEGRAIN_PRECISION); valid: {', '.join(PRECISIONS)}"
        )
    if requested == "auto":
        return auto_precision()[0]
    if not cuda_available():
        if requested == "16-mixed":
            log.warning("precision 16-mixed needs a GPU; running in 32")
            return "32"
        if requested == "bf16-mixed" and not cpu_has_native_bf16():
            log.warning(
                "precision bf16-mixed on a CPU without native bf16 is several times slower than 32; "
                "precision 'auto' would choose 32 here"
            )
    return requested


def inference_precision() -> str:
    """Inference runs in what this machine does fastest, whatever precision the model was trained in."""
    return resolve_precision(os.environ.get("FINEGRAIN_PRECISION", "auto"))


def cores() -> int:
    """The CPU cores this process may run on: its affinity, or fewer where ``OMP_NUM_THREADS`` says
    so (a job that was given one core of a shared machine keeps to it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        n = min(n, int(limit))
    return max(1, n)


def plan_threads(workers: int) -> tuple[int, int]:
    """(loader workers, torch intra-op threads) that together fill the cores without oversubscribing.

    A loader worker keeps one core busy decoding, so the model's threads get the rest; on one
    core, decoding happens in the main process between steps.
    """
    n = cores()
    if not thread_plan_enabled():  # benchmark switch: the configured workers and torch's own default
        return max(0, workers), n
    workers = max(0, min(workers, n - 1))
    return workers, max(1, n - workers)


def thread_plan_enabled() -> bool:
    """False when ``$FINEGRAIN_THREAD_PLAN=0``: a benchmark switch (``benchmarks/new_user_flow.py
    --threads-unplanned``) that restores the behaviour before the thread plan, to measure it; not for use."""
    return os.environ.get("FINEGRAIN_THREAD_PLAN", "1") != "0"


def model_threads(busy_workers: int) -> int:
    """Intra-op threads for a model (torch, ONNX Runtime, FAISS) beside ``busy_workers`` loader
    processes: the cores they leave (every core when the thread plan is switched off)."""
    if not thread_plan_enabled():
        return cores()
    return max(1, cores() - busy_workers)


def query_threads(concurrency: int) -> int:
    """Intra-op threads for each of ``concurrency`` queries served at once: the cores shared out
    (at least one each), so concurrent queries never oversubscribe the cores."""
    if not thread_plan_enabled():
        return cores()
    return max(1, cores() // max(1, concurrency))


def set_threads(busy_workers: int) -> int:
    """Give torch (and FAISS, when loaded) the cores that ``busy_workers`` loader processes leave;
    returns the number of threads set."""
    # optional: torch (the train extra), imported only when this runs
    import torch

    if not thread_plan_enabled():  # benchmark switch: leave torch's threads alone
        return torch.get_num_threads()
    threads = model_threads(busy_workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    set_faiss_threads(threads)
    return threads


def set_faiss_threads(threads: int) -> None:
    """FAISS's OpenMP threads, when FAISS is loaded (it is not imported for this)."""

    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The facts a benchmark or metrics.json records beside its figures."""
    precision, why = auto_precision()
    info = {
        "cpu": cpu_model(),
        "cpu_flags": list(cpu_flags()),
        "native_bf16": cpu_has_native_bf16(),
        "cores": cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": cuda_available(),
        "auto_precision": precision,
        "auto_precision_reason": why,
        "versions": {p: package_version(p) for p in PACKAGES},
    }
    if info["cuda"]:
        # optional: torch (the train extra), imported only when this runs
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
ALLOCATOR_SETTINGS = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}
"""Every block from one heap (one arena, no ``mmap`` per block), returned to the system only above
1 GiB of free heap top, the heap grown 64 MiB at a time. By default glibc maps every block above an
adaptive threshold (at most 32 MiB) anew and trims the heap after large frees: the frozen stages'
activations at a recipe's batch of 32 at 256x341 (100-300 MB each) are mapped, faulted in page by
page and unmapped again on every batch, and so are a training step's: CPU time in the kernel (minor
page faults) that a run's budget pays for nothing. The cost: freed memory stays with the process
(about 0.5 GB more at the peak of building that cache)."""


def tune_allocator() -> bool:
    """Set :data:`ALLOCATOR_SETTINGS` with glibc's ``mallopt`` (through ctypes, once per process) where
    the C library is glibc; ``FINEGRAIN_MALLOC=default`` leaves the allocator alone. Returns whether
    they are set."""
    return _tuned_allocator()


@lru_cache(maxsize=1)
def _tuned_allocator() -> bool:
    if os.environ.get("FINEGRAIN_MALLOC", "").lower() in ("default", "0", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.items())
    log.debug("glibc allocator settings %s", "set" if ok else "refused")
    return ok
