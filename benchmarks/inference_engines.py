"""Benchmark: inference images/s of the engines, PyTorch eager against ONNX Runtime fp32 and int8.

    python benchmarks/inference_engines.py [--models efficientnet_lite0 resnet50] [--size 224]
                                           [--batches 1 32] [--seconds 4] [--rounds 2] [--threads N] [--out PATH]

For each model (random weights: speed only; 196 classes, a classifier head) this builds the
model with ``finegrain.models.model.build_model``, exports it with ``finegrain export``'s code
(``finegrain.inference.export.export_onnx``: uint8 in, the whole graph, dynamic batch and size)
and quantizes it to int8 with its code (``quantize_int8``: static, QDQ, calibrated here on 32
random images, which is enough for speed and meaningless for accuracy). The three engines are
then timed on the same random uint8 batches through the project's own inference path:

- ``torch``: ``finegrain.inference.encoder.Encoder.forward`` in the precision
  ``finegrain.machine.inference_precision()`` picks on this machine, on channels-last input (as
  finegrain's loaders give it);
- ``torch-nchw``: the same on a contiguous NCHW batch, plain eager PyTorch as most scripts run it;
- ``onnx-fp32`` / ``onnx-int8``: ``finegrain.inference.onnx_engine.OnnxEncoder.forward``
  (ONNX Runtime's CPU provider, one intra-op thread per core).

Every engine runs on ``--threads`` intra-op threads (default: one per core, as finegrain does).
One warm-up batch each, then ``--rounds`` rounds in which every engine runs batches for
``--seconds``, the order rotated each round; images/s is the median over rounds, and the ratios
against torch use figures of this same run. Results go to ``--out`` (default
``benchmarks/results/inference_engines.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import log, machine_info, warn_if_busy  # noqa: E402
from finegrain.runs import RunDir, atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "inference_engines.json"


def build_encoders(backbone: str, size: int, work: Path) -> tuple[dict, dict]:
    """The torch, onnx-fp32 and onnx-int8 encoders of one randomly initialised model, and facts about the files."""
    import numpy as np

    from finegrain.config import build_config
    from finegrain.inference.encoder import Encoder
    from finegrain.inference.export import check_parity, export_onnx, quantize_int8
    from finegrain.inference.load import LoadedModel, file_sha256
    from finegrain.inference.onnx_engine import FP32_FILE, INT8_FILE, OnnxEncoder
    from finegrain.models.model import build_model

    cfg = build_config(
        {
            "name": f"bench-{backbone}",
            "model": {"backbone": backbone, "weights": "none"},
            "data": {"image_size": [size, size]},
        }
    )
    model = build_model(backbone, weights="none", num_classes=196).eval()
    names = [f"class {i}" for i in range(196)]
    loaded = LoadedModel(model, cfg, names, Path("-"), "-")
    run = RunDir(work / backbone)
    dest = run.path / "export"
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    (dest / FP32_FILE).write_bytes(export_onnx(loaded, (size, size)))
    export_s = time.perf_counter() - t0
    parity = check_parity(dest / FP32_FILE, loaded, [(size, size)])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    how = quantize_int8(
        dest / FP32_FILE, dest / INT8_FILE, (rng.integers(0, 256, (8, 3, size, size), dtype=np.uint8) for _ in range(4))
    )
    quant_s = time.perf_counter() - t0
    meta = {
        "model_checksum": "-",
        "config": cfg.model_dump(mode="json"),
        "class_names": names,
        "has_classifier": True,
        "files": {
            k: {"file": f, "sha256": file_sha256(dest / f)} for k, f in (("fp32", FP32_FILE), ("int8", INT8_FILE))
        },
    }
    encoders = {
        "torch": Encoder(loaded),
        "torch-nchw": Encoder(loaded),
        "onnx-fp32": OnnxEncoder(run, meta, "32"),
        "onnx-int8": OnnxEncoder(run, meta, "int8"),
    }
    facts = {
        "export_seconds": round(export_s, 2),
        "quantize_seconds": round(quant_s, 2),
        "parity_max_abs_diff": parity,
        "torch_precision": encoders["torch"].precision,
        "fp32_mb": round((dest / FP32_FILE).stat().st_size / 1e6, 1),
        "int8_mb": round((dest / INT8_FILE).stat().st_size / 1e6, 1),
        "quantization": how,
    }
    return encoders, facts


def measure(encoders: dict, size: int, batch: int, seconds: float, rounds: int, threads: int) -> dict:
    """Median images/s of each encoder's ``forward`` over ``rounds`` rounds of ``seconds`` each, every
    engine on ``threads`` intra-op threads."""
    import numpy as np
    import torch

    for encoder in encoders.values():
        encoder.use_threads(threads)

    x = np.random.default_rng(1).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    inputs = {
        "torch": torch.from_numpy(x).contiguous(memory_format=torch.channels_last),  # as the loaders give it
        "torch-nchw": torch.from_numpy(x),
    }  # plain eager: a contiguous NCHW batch, as most scripts pass it
    names = list(encoders)
    for n in names:
        encoders[n].forward(inputs.get(n, x))  # warm-up: allocations, kernel selection
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            done, t0 = 0, time.perf_counter()
            while True:
                encoders[n].forward(inputs.get(n, x))
                done += batch
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
            per_round[n].append(done / elapsed)
    return {
        n: {"images_per_second": round(statistics.median(v), 2), "rounds": [round(s, 2) for s in v]}
        for n, v in per_round.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--seconds", type=float, default=4.0, help="Time per engine, batch size and round.")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Intra-op threads of every engine (default: one per core, as finegrain runs).",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
    from finegrain.machine import cores

    threads = a.threads or cores()
    busy = warn_if_busy()
    result = {
        "benchmark": "inference_engines",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": vars(a) | {"out": str(a.out)},
        "machine": machine_info(),
        "busy_warning": busy,
        "cases": [],
    }
    import onnxruntime

    result["machine"]["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in a.models:
            log(f"{backbone}: export and int8 quantization")
            encoders, facts = build_encoders(backbone, a.size, Path(tmp))
            log(
                f"{backbone}: exported in {facts['export_seconds']} s ({facts['fp32_mb']} MB), int8 in "
                f"{facts['quantize_seconds']} s ({facts['int8_mb']} MB); "
                f"torch runs in precision {facts['torch_precision']}"
            )
            for batch in a.batches:
                speeds = measure(encoders, a.size, batch, a.seconds, a.rounds, threads)
                ref, plain = speeds["torch"]["images_per_second"], speeds["torch-nchw"]["images_per_second"]
                for s in speeds.values():
                    s["vs_torch"] = round(s["images_per_second"] / ref, 2)
                    s["vs_torch_nchw"] = round(s["images_per_second"] / plain, 2)
                case = {
                    "model": backbone,
                    "image_size": [a.size, a.size],
                    "batch_size": batch,
                    "threads": threads,
                    "load_average": list(os.getloadavg()),
                    **facts,
                    "engines": speeds,
                }
                result["cases"].append(case)
                log(
                    f"{backbone} batch {batch}: "
                    + ", ".join(
                        f"{n} {s['images_per_second']:.1f} images/s ({s['vs_torch']:.2f}x)" for n, s in speeds.items()
                    )
                )
                result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                a.out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(a.out, result)
    result["load_average_after"] = os.getloadavg()
    atomic_write_json(a.out, result)
    log(f"wrote {a.out}")
    print(
        json.dumps(
            [
                {k: c[k] for k in ("model", "batch_size")}
                | {n: s["images_per_second"] for n, s in c["engines"].items()}
                for c in result["cases"]
            ]
        )
    )


if __name__ == "__main__":
    main()
