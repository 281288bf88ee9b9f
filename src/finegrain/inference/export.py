"""Exporting a loaded model to ONNX and quantizing it to int8 (needs torch and the ``onnx`` package).

The graph takes what the loaders give, uint8 ``[B, 3, H, W]``, and does everything the model's
``forward`` does (normalisation, backbone, heads); batch, height and width are dynamic, so one
file serves every configured size. Quantization is ONNX Runtime's static quantization, calibrated
on images the loaders decode exactly as for inference.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.errors import ConfigError, FinegrainError
from finegrain.inference.load import LoadedModel
from finegrain.inference.onnx_engine import INPUT_NAME, import_onnxruntime
from finegrain.models.maps import MAP_OUTPUTS, forward_with_maps, pooling_module

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-3  # max |onnx - torch| over the outputs of random images, relative to their scale


class _Graph(torch.nn.Module):
    """The model with a tuple of outputs in a fixed order (ONNX outputs are positional)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model_outputs(self.model, x, maps=MAP_OUTPUTS[0] in self.names)
        return tuple(out[n] for n in self.names)


def model_outputs(model: torch.nn.Module, x: torch.Tensor, maps: bool) -> dict[str, torch.Tensor]:
    """The model's outputs (``embedding`` = the features without an embedder), with its maps if asked."""
    out = forward_with_maps(model, x) if maps else dict(model(x))
    out.setdefault("embedding", out["features"])
    return out


def has_maps(loaded: LoadedModel) -> bool:
    """Whether the model's backbone gives maps (:func:`finegrain.models.maps.pooling_module`)."""
    try:
        backbone = loaded.model.backbone
        pooling_module(backbone if isinstance(backbone, torch.nn.Module) else torch.nn.Identity())
    except ConfigError:
        return False
    return True


def output_names(loaded: LoadedModel, maps: bool = True) -> list[str]:
    """The graph's outputs: ``features``, ``embedding``, ``logits`` (with a classifier), then, where the
    backbone gives them, ``embedding_map`` and ``class_map`` (with a classifier): the last feature map
    through the heads' linear part, which serving requests only to explain an answer."""
    names = ["features", "embedding"] + (["logits"] if loaded.has_classifier else [])
    if maps and has_maps(loaded):
        names += [n for n in MAP_OUTPUTS if n != "class_map" or loaded.has_classifier]
    return names


def export_onnx(loaded: LoadedModel, size: tuple[int, int], opset: int = DEFAULT_OPSET, maps: bool = True) -> bytes:
    """The ONNX file of ``loaded``'s whole inference graph (fp32), traced at ``size``; ``maps``: with
    the map outputs (:func:`output_names`)."""
    names = output_names(loaded, maps)
    graph = _Graph(loaded.model, names).eval()
    x = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    axes = {
        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
        **{n: ({0: "batch", 2: "map_height", 3: "map_width"} if n in MAP_OUTPUTS else {0: "batch"}) for n in names},
    }
    buf = io.BytesIO()
    target: Any = buf  # the TorchScript exporter writes to a file object too; torch types only paths
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                graph,
                (x,),
                target,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as e:  # noqa: BLE001 - an operator ONNX cannot express, an unsupported opset...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FinegrainError(
            f"this model ({loaded.cfg.model.backbone}) does not export to ONNX opset {opset}: {first}"
        ) from None
    finally:
        loaded.model.eval()  # the exporter restores the wrapper's training flag onto the model
    return buf.getvalue()


def check_parity(onnx_path: Path, loaded: LoadedModel, sizes: Iterable[tuple[int, int]], seed: int = 0) -> float:
    """Largest |onnx - torch| over every output of two random images at each size (and one odd size,
    to prove the height and width are dynamic); :class:`FinegrainError` when they disagree."""
    ort = import_onnxruntime()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    sizes = list(sizes)
    sizes = list(dict.fromkeys([*sizes, (sizes[0][0] + 8, sizes[0][1] + 8)]))
    worst = 0.0
    for size in sizes:
        x = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=gen)
        try:
            got = dict(zip(names, sess.run(None, {INPUT_NAME: x.numpy()}), strict=True))
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise FinegrainError(
                f"the ONNX export of {loaded.cfg.model.backbone} does not run at "
                f"{size[0]}x{size[1]} ({first}): its image size is not dynamic"
            ) from None
        with torch.inference_mode():
            ref = model_outputs(loaded.model, x, maps=MAP_OUTPUTS[0] in names)
        for n in names:
            r = ref[n].float().numpy()
            diff = float(np.abs(got[n] - r).max())
            if diff > PARITY_TOLERANCE * max(1.0, float(np.abs(r).max())):
                raise FinegrainError(
                    f"the ONNX export of {loaded.cfg.model.backbone} disagrees with PyTorch at "
                    f"{size[0]}x{size[1]} ({n}: max difference {diff:.3g})"
                )
            worst = max(worst, diff)
    return worst


class BatchReader:
    """An ONNX Runtime ``CalibrationDataReader`` over uint8 batches (numpy ``[B, 3, H, W]``)."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        self.count += int(x.shape[0])
        return {INPUT_NAME: np.ascontiguousarray(x, dtype=np.uint8)}

    def __iter__(self):  # the reader protocol of recent ONNX Runtime versions
        while (item := self.get_next()) is not None:
            yield item


def quantize_int8(fp32_path: Path, out_path: Path, batches: Iterable[np.ndarray]) -> dict:
    """Static int8 quantization of ``fp32_path`` into ``out_path`` (written atomically), calibrated
    on ``batches``; returns how (format, types, calibration images)."""
    import_onnxruntime()
    # optional: ONNX Runtime (the serve extra), imported only when this runs
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = BatchReader(batches)
    settings = {
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8",
        "per_channel": True,
        "reduce_range": True,
        "calibration": "minmax",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as tmp:
        source = Path(tmp) / "pre.onnx"
        try:  # shape inference + graph optimisation first, as ONNX Runtime advises
            # optional: ONNX Runtime (the serve extra), imported only when this runs
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=False)
            settings["pre_process"] = True
        except Exception as e:  # noqa: BLE001 - still quantizable without it
            log.info("quantization pre-processing skipped (%s)", str(e).splitlines()[0][:200] if str(e) else e)
            source = fp32_path
            settings["pre_process"] = False
        target = Path(tmp) / "int8.onnx"
        # reduce_range: 7-bit weights, which CPUs without VNNI (AVX2) multiply without saturating
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        if reader.count == 0:
            raise FinegrainError("no calibration images could be read for int8 quantization")
        os.replace(target, out_path)
    settings["calibration_inputs"] = reader.count  # images x sizes
    return settings
