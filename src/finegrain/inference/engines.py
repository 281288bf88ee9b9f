"""Which engine runs a run's model: the one place that decides (``--engine torch|onnx|auto``).

``auto`` runs ONNX Runtime when ``RUN/export/model.onnx`` exists and was exported from the run's
current checkpoint (its recorded sha256 matches), else PyTorch; an export whose checkpoint has
changed since is ignored with a log line under ``auto`` and refused when ``onnx`` is asked for.
``onnx-int8`` (or ``onnx`` with precision ``int8``) runs ``model.int8.onnx``.

Importing this module does not import torch.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finegrain import machine
from finegrain.errors import FinegrainError
from finegrain.inference.load import file_sha256, load_model
from finegrain.inference.onnx_engine import META_FILE, OnnxEncoder, export_dir, read_export_meta
from finegrain.runs import RunDir, open_run

if TYPE_CHECKING:
    from finegrain.inference.encoder import Encoder
    from finegrain.inference.onnx_engine import OnnxEncoder

    AnyEncoder = Encoder | OnnxEncoder

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx", "onnx-int8")


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a blocked or broken torch
        return False


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def evaluation_precision(export_onnx: bool) -> str:
    """The precision a run's own evaluation will run its model in on this machine: ``32`` on ONNX
    Runtime for a run exported at the end of training (``eval.export_onnx``) where ONNX Runtime is
    installed (:func:`open_encoder`'s ``auto``), else PyTorch's :func:`machine.inference_precision`."""

    return "32" if export_onnx and onnxruntime_available() else machine.inference_precision()


def _require_torch(why: str) -> None:
    if not torch_available():
        raise FinegrainError(
            f"{why} needs PyTorch, which is not installed here: pip install 'finegrain[train]', "
            "or run an exported model with --engine onnx (`finegrain export RUN` on a machine "
            "with PyTorch)"
        )


def current_export(run: RunDir) -> tuple[dict | None, str]:
    """(the export's description, why not) : the description when the run has an export made from
    its current checkpoint, else None and the reason in words."""

    meta = read_export_meta(run)
    if meta is None:
        return None, f"no ONNX export in {export_dir(run)} (run `finegrain export {run.path}`)"
    ckpt = next((p for p in (run.best_ckpt, run.last_ckpt) if p.is_file()), None)
    if ckpt is None:
        return None, f"{run.path} has no checkpoint to check its export against"
    checksum = file_sha256(ckpt)
    if checksum != meta["model_checksum"]:
        return None, (
            f"{export_dir(run) / META_FILE} was exported from another checkpoint (sha256 "
            f"{str(meta['model_checksum'])[:12]}…) than the run's {ckpt.name} (sha256 {checksum[:12]}…): "
            f"the model changed since; run `finegrain export {run.path}` again"
        )
    return meta, ""


def open_encoder(run: RunDir | str | Path, engine: str = "auto", precision: str | None = None) -> AnyEncoder:
    """The encoder of a run's model on ``engine`` (``auto``, ``torch``, ``onnx``, ``onnx-int8``).

    ``precision``: the torch engine's (``auto``, ``32``, ``bf16-mixed``...; None: what this machine
    runs fastest); on the onnx engine ``32`` (also None/``auto``) or ``int8``."""
    if engine not in ENGINES:
        raise FinegrainError(f"unknown engine '{engine}'; valid: {', '.join(ENGINES)}")
    run = run if isinstance(run, RunDir) else open_run(run)
    if engine == "onnx-int8":
        if precision not in (None, "auto", "int8"):
            raise FinegrainError(f"--engine onnx-int8 runs in int8, not precision '{precision}'")
        engine, precision = "onnx", "int8"
    if precision == "int8" and engine == "torch":
        raise FinegrainError("precision int8 is the onnx engine's (model.int8.onnx): use --engine onnx-int8")
    onnx_precision = "int8" if precision == "int8" else "32"
    if engine in ("onnx", "auto") and precision not in (None, "auto", "32", "int8"):
        if engine == "onnx":
            raise FinegrainError(f"the onnx engine runs in precision 32 or int8, not '{precision}'")
        engine = "torch"  # an explicit torch precision (bf16-mixed...) is torch's
    if engine == "onnx":
        meta, why = current_export(run)
        if meta is None:
            raise FinegrainError(f"--engine onnx: {why}")
        return _onnx(run, meta, onnx_precision)
    why = ""
    if engine == "auto" and (run.path / "export").is_dir():
        meta, why = current_export(run)
        if meta is not None and onnxruntime_available():
            try:
                return _onnx(run, meta, onnx_precision)
            except FinegrainError as e:  # say, a re-export that failed midway: the checkpoint still runs
                if not torch_available():
                    raise
                why = str(e)
        why = why or "onnxruntime is not installed"
        log.info("not using the ONNX export: %s", why)
    if precision == "int8":
        raise FinegrainError(
            f"precision int8 needs a current int8 export: {why or 'no ONNX export'}; "
            f"run `finegrain export {run.path} --quantize int8`"
        )
    if engine == "auto" and not torch_available():
        raise FinegrainError(
            f"cannot run {run.path} here: PyTorch is not installed and there is no usable ONNX "
            f"export ({why or 'none in ' + str(run.path / 'export')}); export the run with "
            "`finegrain export RUN` where PyTorch is, or pip install 'finegrain[train]'"
        )
    _require_torch("the torch engine")
    # optional: torch (the train extra), imported only when this runs
    from finegrain.inference.encoder import Encoder

    return Encoder(load_model(run), None if precision in (None, "int8") else precision)


def _onnx(run: RunDir, meta: dict, precision: str) -> OnnxEncoder:

    return OnnxEncoder(run, meta, precision)
