"""How fast this machine runs a model: the ``finegrain info --bench`` measurement."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from finegrain.machine import cuda_available
from finegrain.models.model import build_model

BENCH_BACKBONE = "efficientnet_lite0"  # timm's tf_efficientnet_lite0: the project's CPU recipes' backbone


def measure_inference_speed(
    seconds: float = 5.0, precisions: tuple[str, ...] = ("32", "bf16-mixed"), batch_size: int = 8, image_size: int = 224
) -> dict[str, float]:
    """Images/s of EfficientNet-Lite0 inference (random weights: speed only) per precision, on uint8
    channels-last batches as the loaders give them, under ``torch.inference_mode``: one warm-up
    batch, then batches for ``seconds / len(precisions)``. Where the warm-up batch alone outlasts
    that share (bf16 emulated on a CPU without it: one batch of 8 takes 10 s or more), it is the
    measurement, so the whole takes about one batch of each precision at worst."""
    device = "cuda" if cuda_available() else "cpu"
    dtypes = {"32": None, "bf16-mixed": torch.bfloat16, **({"16-mixed": torch.float16} if device == "cuda" else {})}
    for p in precisions:
        if p not in dtypes:
            raise ValueError(f"cannot measure precision '{p}' on {device}; valid: {', '.join(dtypes)}")
    model = build_model(BENCH_BACKBONE, weights="none", num_classes=196).eval().to(device)
    x = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    budget = seconds / max(1, len(precisions))
    speeds: dict[str, float] = {}

    def step(dtype) -> None:
        with torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for p in precisions:
            t0 = time.perf_counter()
            step(dtypes[p])  # warm-up: allocations, oneDNN kernel selection
            elapsed = time.perf_counter() - t0
            if elapsed >= budget:
                speeds[p] = batch_size / elapsed
                continue
            n, t0 = 0, time.perf_counter()
            while True:
                step(dtypes[p])
                n += batch_size
                elapsed = time.perf_counter() - t0
                if elapsed >= budget:
                    break
            speeds[p] = n / elapsed
    return speeds
