"""Benchmarks that time one core hold their process to it (``common.pin_threads``)."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

SCRIPT = f"""
import os, sys
with open(sys.argv[1], "a") as f:  # one line per start of the process
    f.write("start\\n")
sys.path.insert(0, {str(BENCH)!r})
from common import pin_threads
pin_threads(1)
print(os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"], sys.argv[2:])
"""


def _run(tmp_path: Path, **pools: str) -> tuple[list[str], int]:
    script, starts = tmp_path / "bench.py", tmp_path / "starts.txt"
    script.write_text(SCRIPT)
    starts.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} | pools
    out = subprocess.run(
        [sys.executable, str(script), str(starts), "--rounds", "3"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split(), len(starts.read_text().splitlines())


def test_pin_threads_restarts_the_process_with_the_thread_pools_limited(tmp_path):
    # the thread pools read these when they load, so only a new process with them set is held to one
    # core: the benchmark starts again, with its own arguments
    assert _run(tmp_path) == (["1", "1", "['--rounds',", "'3']"], 2)
    # already set: no restart
    assert _run(tmp_path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") == (["1", "1", "['--rounds',", "'3']"], 1)
    assert _run(tmp_path, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")[1] == 2
