"""Helpers shared by the benchmark scripts: a description of the machine and timestamped logging.

Imported as ``from common import log, machine_info`` by scripts run as
``python benchmarks/<name>.py`` (the script's folder is then first on ``sys.path``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# CPU flags that decide which vector kernels (and whether bf16 is native) the libraries can use.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def log(msg: str) -> None:
    """Print ``msg`` with the time of day, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def warn_if_busy() -> str | None:
    """Log and return a warning when the 1-minute load average says other work shares the CPUs."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load[0] <= 0.5 * cores:
        return None
    msg = (
        f"machine busy: load average {load[0]:.1f} on {cores} cores; other processes compete for the "
        "CPUs and the figures will be lower and noisier than on an idle machine"
    )
    log("WARNING: " + msg)
    return msg


def _cpu() -> tuple[str, list[str]]:
    """The CPU model name and which of :data:`CPU_FEATURES` it has."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in CPU_FEATURES if f in flags]


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    """``module.__version__`` when the module is importable, else None."""
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), "__version__", "unknown")


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU, cores, memory, library versions, thread pools and the load average, as a JSON-able dict.

    torch's version and thread counts, and :mod:`finegrain.machine`'s CPU flags, native bf16 and
    ``auto`` precision, are included when torch is importable; ``extra``
    (benchmark-specific details) is merged in last.
    """
    cpu_model, features = _cpu()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_features": features,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "finegrain": _version("finegrain"),
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        info.update(
            {
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
                "torchvision": _version("torchvision"),
                "lightning": _version("lightning"),
            }
        )
        info.update(_finegrain_machine())
    pools: list[dict[str, Any]] = []
    try:
        from threadpoolctl import threadpool_info

        pools = [
            {"library": Path(i["filepath"]).name, "api": i.get("internal_api"), "threads": i.get("num_threads")}
            for i in threadpool_info()
        ]
    except Exception:  # pragma: no cover - informative only
        pass
    info["thread_pools"] = pools
    info.update(extra or {})
    info["load_average"] = load_average()  # when the machine was described
    return info


def _finegrain_machine() -> dict[str, Any]:
    """What :mod:`finegrain.machine` decides from: its CPU flags, whether bf16 is native, and the
    precision ``auto`` picks here and why (empty when finegrain is not importable)."""
    try:
        from finegrain import machine
    except ImportError:
        return {}
    precision, why = machine.auto_precision()
    return {
        "cpu_flags": list(machine.cpu_flags()),
        "native_bf16": machine.cpu_has_native_bf16(),
        "auto_precision": precision,
        "auto_precision_reason": why,
    }


def pin_threads(threads: int) -> None:
    """Hold this benchmark to ``threads`` cores: ``torch.set_num_threads`` alone does not (backward
    passes ran on a second core, measured: 62 CPU-seconds in 34 s of wall time with it set to 1), so
    the process starts again with ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set, which the thread
    pools read when they load."""
    wanted = str(threads)
    if os.environ.get("OMP_NUM_THREADS") == wanted and os.environ.get("MKL_NUM_THREADS") == wanted:
        return
    env = {**os.environ, "OMP_NUM_THREADS": wanted, "MKL_NUM_THREADS": wanted}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_timed(
    jobs: list[tuple[str, list[str], Path]],
    parallel: int,
    threads: int,
    on_done: Callable[[str, int, float, float, float], None],
    cwd: Path | None = None,
) -> None:
    """Run commands ``(name, argv, log file)``, ``parallel`` at a time, each limited to ``threads``
    threads (``OMP_NUM_THREADS``); call ``on_done(name, exit code, wall seconds, CPU seconds, peak GB)``
    as each ends (peak GB: the largest resident memory of the process or one it waited for; Linux
    counts a forked child's pages before its exec too, so it is at least this process's size).

    CPU seconds are the ``rusage`` of the process and of every process it waited for (its
    data-loading workers): user + system time, whatever else the machine runs.
    """
    queue = list(jobs)
    running: dict[int, tuple[str, subprocess.Popen, float, Any]] = {}
    while queue or running:
        while queue and len(running) < parallel:
            name, argv, log_path = queue.pop(0)
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "FINEGRAIN_PROGRESS": "1",
            }
            log_path.parent.mkdir(parents=True, exist_ok=True)
            logf = log_path.open("w")
            log(f"start {name} ({threads} thread(s)): {' '.join(argv[1:])}")
            p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
            running[p.pid] = (name, p, time.perf_counter(), logf)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, p, t0, logf = running.pop(pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        logf.close()
        on_done(
            name, p.returncode, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6
        )  # kilobytes on Linux
