"""finegrain.machine: the precision `auto` picks, the thread plan, and the inference speed measurement."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from finegrain import machine
from finegrain.errors import FinegrainError
from tests.conftest import ROOT


@pytest.fixture
def cpu(monkeypatch):
    """Set whether this (GPU-less) machine's CPU computes bf16 natively."""
    monkeypatch.setattr(machine, "cuda_available", lambda: False)
    monkeypatch.delenv("FINEGRAIN_PRECISION", raising=False)

    def native(has: bool) -> None:
        monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: has)

    return native


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu):
    cpu(False)
    precision, why = machine.auto_precision()
    assert precision == "32" and "no native bf16" in why
    assert machine.resolve_precision("auto") == "32"
    assert machine.inference_precision() == "32"


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu):
    cpu(True)
    assert machine.auto_precision()[0] == "bf16-mixed"
    assert machine.resolve_precision("auto") == "bf16-mixed"
    assert machine.inference_precision() == "bf16-mixed"


def test_explicit_precisions_on_cpu(cpu, caplog, monkeypatch):
    cpu(False)
    with caplog.at_level(logging.WARNING, logger="finegrain.machine"):
        assert machine.resolve_precision("bf16-mixed") == "bf16-mixed"  # obeyed, with a warning
    assert "slower" in caplog.text
    assert machine.resolve_precision("16-mixed") == "32"  # fp16 needs a GPU
    assert machine.resolve_precision("32") == "32"
    monkeypatch.setenv("FINEGRAIN_PRECISION", "32")
    cpu(True)
    assert machine.inference_precision() == "32"  # the environment overrides auto
    with pytest.raises(FinegrainError, match="unknown precision 'bf16'.*FINEGRAIN_PRECISION"):
        machine.resolve_precision("bf16")
    monkeypatch.setenv("FINEGRAIN_PRECISION", "fp16")
    with pytest.raises(FinegrainError, match="'fp16'"):  # a typo in the environment: one line, no traceback
        machine.inference_precision()


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_a_gpu(monkeypatch, bf16):
    monkeypatch.setattr(machine, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert machine.auto_precision()[0] == ("bf16-mixed" if bf16 else "16-mixed")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64])
def test_plan_threads_never_oversubscribes(monkeypatch, n):
    monkeypatch.setattr(machine, "cores", lambda: n)
    for asked in range(0, 12):
        workers, threads = machine.plan_threads(asked)
        assert 0 <= workers <= asked and threads >= 1
        assert workers + threads <= n, (n, asked, workers, threads)
        if n >= 2 and asked >= 1:
            assert workers >= 1  # a worker asked for and a core to spare: it runs
    assert machine.plan_threads(0) == (0, n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_concurrent_queries_share_the_cores_out(monkeypatch, n):
    monkeypatch.setattr(machine, "cores", lambda: n)
    for concurrency in range(1, 10):
        threads = machine.query_threads(concurrency)
        assert threads >= 1 and (threads * concurrency <= n or threads == 1), (n, concurrency, threads)
    assert machine.query_threads(1) == n and machine.query_threads(0) == n
    monkeypatch.setenv("FINEGRAIN_THREAD_PLAN", "0")  # the benchmark switch: every query gets every core
    assert machine.query_threads(2) == n


def test_machine_info_names_the_auto_precision(cpu):
    cpu(False)
    info = machine.machine_info()
    assert info["auto_precision"] == "32" and info["native_bf16"] is False
    assert info["cores"] == machine.cores() and torch.__version__.startswith(info["versions"]["torch"])
    with open("/proc/cpuinfo") as f:  # the flags this CPU declares, in the order VECTOR_FLAGS lists them
        declared = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    assert info["cpu_flags"] == [flag for flag in machine.VECTOR_FLAGS if flag in declared]


def test_measure_inference_speed_small():
    from finegrain.inference.speed import measure_inference_speed

    speeds = measure_inference_speed(0.05, batch_size=2, image_size=32)
    assert set(speeds) == {"32", "bf16-mixed"}
    assert all(v > 0 and math.isfinite(v) for v in speeds.values())
    with pytest.raises(ValueError, match="16-mixed"):
        measure_inference_speed(0.05, precisions=("16-mixed",))  # fp16 autocast needs a GPU


def test_benchmarks_record_the_machine_facts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("common", None)
    from common import machine_info

    info = machine_info()
    assert info["auto_precision"] == machine.auto_precision()[0]
    assert info["native_bf16"] == machine.cpu_has_native_bf16() and info["cpu_flags"] == list(machine.cpu_flags())
    assert "cpu_features" in info and "torch_threads" in info  # what it had before stays


def test_cores_keep_to_an_explicit_thread_limit(monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert machine.cores() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert machine.cores() == 1 and machine.plan_threads(2) == (0, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert machine.cores() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert machine.cores() == 4


@pytest.mark.slow
def test_timed_benchmark_runs_report_each_process_peak_memory(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("common", None)
    import resource

    from common import run_timed

    # a forked child starts with its parent's pages (this test process holds torch and what the suite
    # made before): the big one grows past that, touching every page so that it is resident
    size = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1000 + 800_000_000
    grow = f"b = bytearray({size}); b[::4096] = b'1' * len(b[::4096])"
    done = {}
    run_timed(
        [
            ("big", [sys.executable, "-c", grow], tmp_path / "big.log"),
            ("small", [sys.executable, "-c", "pass"], tmp_path / "small.log"),
        ],
        2,
        1,
        lambda name, code, wall, cpu, peak_gb: done.update({name: (code, peak_gb)}),
    )
    assert done["big"][0] == done["small"][0] == 0
    assert done["big"][1] - done["small"][1] > 0.3


BLOCKS = """
import ctypes, json, resource
from finegrain import machine
tuned = machine.tune_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def block():  # a 64 MiB activation (a frozen stage's output at a recipe's batch): made, written, freed
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)

block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

STEP = """
import json, resource
from finegrain import machine
tuned = machine.tune_allocator()
import torch
from finegrain.config import load_config
from finegrain.models.build import build_from_config
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = load_config("classify", overrides=["data.root=synthetic", "data.image_size=[256, 341]"])
model = build_from_config(cfg, 196, weights="none").train().to(memory_format=torch.channels_last)
with torch.no_grad():
    maps = model.frozen_prefix(model.normalise_input(torch.randint(0, 256, (32, 3, 256, 341), dtype=torch.uint8)))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

def step():  # what training on the frozen cache does each step (a recipe's batch of 32 at 256x341)
    out = model(maps.contiguous(memory_format=torch.channels_last), frozen=True)
    out["logits"].logsumexp(1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step()
step()  # the heap has grown to what a step needs
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
step()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(script: str, malloc: str) -> dict:
    import json
    import os
    import subprocess

    env = {**os.environ, "FINEGRAIN_MALLOC": malloc, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _glibc() -> None:
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt: Linux with glibc only")


def test_the_tuned_allocator_keeps_freed_large_blocks_mapped():
    """glibc maps every block above 32 MiB anew (its adaptive threshold stops there), so each of four 64 MiB
    blocks faults all its 16,384 pages in again; tuned, the freed block stays in the heap and is reused."""
    _glibc()
    default, tuned = _faults(BLOCKS, "default"), _faults(BLOCKS, "")
    assert tuned["tuned"] and not default["tuned"]
    assert default["faults"] >= 4 * 16384, default
    assert tuned["faults"] < 1000, tuned


@pytest.mark.slow
def test_a_training_step_with_the_tuned_allocator_faults_few_pages():
    """Two training steps at a recipe's batch touch hundreds of MB of activations (tens of thousands of
    pages); tuned, the heap holds them between steps. (glibc's defaults churn here from run to run by
    between a few and 160,000 faults, so the default is the other test's, where it is deterministic.)"""
    _glibc()
    tuned = _faults(STEP, "")
    assert tuned["tuned"] and tuned["faults"] < 20_000, tuned
