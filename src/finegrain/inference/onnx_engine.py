"""Running an exported run with ONNX Runtime: :class:`OnnxEncoder`, the :class:`Encoder` of the
``onnx`` engine, and the files ``finegrain export`` writes.

``RUN/export/model.onnx`` is the whole inference graph (uint8 ``[B, 3, H, W]`` in; normalisation,
backbone and heads inside; ``features``, ``embedding`` and, for a classifier, ``logits`` out;
batch, height and width dynamic). ``RUN/export/model.json`` says what it was made from: the
checkpoint's config and class names, the checkpoint's sha256 (``model_checksum``, the same as
:attr:`LoadedModel.checksum`), the sizes, opset and versions, and the sha256 of each ONNX file.
``model.int8.onnx`` is its static int8 quantization, when asked for.

This module never imports torch: a server with only the ``serve`` extra runs it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.config import ExperimentConfig
from finegrain.errors import FinegrainError
from finegrain.inference.explain import EMBEDDING_MAP, MAP_NAMES, NeedsReexport, NoMaps, maps_outputs
from finegrain.inference.load import check_config_copy, checkpoint_config, file_sha256
from finegrain.inference.outputs import EncodingLoop, eval_sizes, mean_of_halves, named_outputs
from finegrain.machine import model_threads
from finegrain.runs import RunDir

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_FILE = "model.json"
INPUT_NAME = "images"
ONNX_PRECISIONS = ("32", "int8")


def export_dir(run: RunDir) -> Path:
    return run.path / EXPORT_DIR


def read_export_meta(run: RunDir) -> dict | None:
    """``RUN/export/model.json``, or None when the run has no export."""
    path = export_dir(run) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FinegrainError(f"{path} is not readable JSON ({e}); run `finegrain export {run.path}` again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "model_checksum" not in meta:
        raise FinegrainError(f"{path} is not a finegrain export description; run `finegrain export {run.path}` again")
    return meta


def onnxruntime_version() -> str | None:

    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None


def import_onnxruntime():
    """``onnxruntime``, or a :class:`FinegrainError` saying how to install it."""
    try:
        # optional: ONNX Runtime (the serve extra), imported only when this runs
        import onnxruntime
    except ImportError:
        raise FinegrainError(
            "the onnx engine needs ONNX Runtime: pip install 'finegrain[serve]' (or onnxruntime)"
        ) from None
    return onnxruntime


def cpu_session(model: str | bytes, threads: int, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session of ``model`` (a file, or its bytes) as finegrain runs one:
    ``threads`` intra-op threads, one inter-op, every graph optimisation; ``spinning`` False when
    other work shares the cores (its idle threads then sleep instead of spinning)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass
class ExportedModel:
    """What :class:`LoadedModel` says about a run's model, for an exported one (without the torch model)."""

    cfg: ExperimentConfig
    class_names: list[str]
    checkpoint: Path
    checksum: str
    classifier: bool = False
    onnx_file: Path | None = None

    @property
    def has_classifier(self) -> bool:
        return self.classifier


class OnnxEncoder(EncodingLoop):
    """The ``onnx`` engine: the same interface as :class:`~finegrain.inference.encoder.Encoder`
    (sizes, flip averaging, ``signature()``, ``forward``, ``encode_rgb``, ``encode_records``,
    ``run_loader``), running ``RUN/export/model.onnx`` (``precision="int8"``: ``model.int8.onnx``)
    with ONNX Runtime's CPU provider."""

    engine = "onnx"

    def __init__(self, run: RunDir, meta: dict, precision: str = "32") -> None:
        if precision not in ONNX_PRECISIONS:
            raise FinegrainError(f"the onnx engine runs in precision 32 or int8, not '{precision}'")
        key = "fp32" if precision == "32" else "int8"
        entry = meta["files"].get(key)
        folder = export_dir(run)
        if not entry:
            raise FinegrainError(
                f"{folder} has no {key} model"
                + (f" (run `finegrain export {run.path} --quantize int8`)" if key == "int8" else "")
            )
        path = folder / entry["file"]
        if not path.is_file():
            raise FinegrainError(f"{path} is missing; run `finegrain export {run.path}` again")
        if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            raise FinegrainError(
                f"{path} is not the file that was exported (its sha256 differs from {folder / META_FILE}'s):"
                f" damaged or replaced; run `finegrain export {run.path}` again"
            )
        self.run = run
        self.meta = meta
        self.path = path
        fake_state = {"hyper_parameters": {"config": meta.get("config"), "class_names": meta.get("class_names")}}
        cfg, class_names = checkpoint_config(fake_state, folder / META_FILE)
        check_config_copy(run, cfg)
        self.cfg = cfg
        self.loaded = ExportedModel(
            cfg,
            class_names,
            Path(meta.get("checkpoint", "-")),
            meta["model_checksum"],
            classifier=bool(meta.get("has_classifier")),
            onnx_file=path,
        )
        self.sizes: list[tuple[int, int]] = eval_sizes(cfg.data)
        self.tta_flip = cfg.eval.tta_flip
        self.precision = precision
        import_onnxruntime()  # a missing ONNX Runtime is named before the session is made
        self._sessions: dict[int, Any] = {}
        self._threads: int | None = None
        self.session(model_threads(0))  # load now: a corrupt file is reported here, not at the first query

    def session(self, threads: int):
        """The ONNX Runtime session using ``threads`` intra-op threads (made once per count)."""
        if threads not in self._sessions:
            try:  # loader workers or other queries share the cores when it has fewer than all: no spinning
                sess = cpu_session(str(self.path), threads, spinning=threads >= model_threads(0))
            except Exception as e:  # noqa: BLE001 - any unloadable file is reported the same way
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise FinegrainError(
                    f"cannot load {self.path} with ONNX Runtime ({first}); run `finegrain export {self.run.path}` again"
                ) from None
            self._sessions[threads] = sess
            self._outputs = [o.name for o in sess.get_outputs()]
        return self._sessions[threads]

    def _run(self, x: np.ndarray, maps: bool = False) -> dict[str, np.ndarray]:
        sess = self.session(self._threads or next(iter(self._sessions)))
        names = [n for n in self._outputs if maps or n not in MAP_NAMES]  # a plain query copies no maps out
        values = sess.run(names, {INPUT_NAME: x})
        return dict(zip(names, values, strict=True))

    def forward(self, x: Any) -> dict[str, np.ndarray]:
        """Outputs of one uint8 batch ``[B, 3, H, W]`` (numpy, or a torch tensor from a loader):
        features, embedding, logits (float32 arrays); flips averaged as :meth:`Encoder.forward` does."""
        x = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.uint8)
        if not self.tta_flip:
            return named_outputs(self._run(x))
        return named_outputs(mean_of_halves(self._run(np.concatenate([x, x[..., ::-1]])), len(x)))  # one pass

    def maps_missing(self) -> str | None:
        """Why this export gives no maps, or None when it gives them."""
        if EMBEDDING_MAP in self._outputs:
            return None
        if self.meta.get("maps") is False:  # recorded by exports made since maps exist
            return (
                f"the model of run {self.run.name} has no maps: its backbone {self.cfg.model.backbone} "
                "computes more after pooling its last feature map"
            )
        return (
            f"the ONNX export of run {self.run.name} was made before explanations existed: "
            f"run `finegrain export RUN` again to explain its answers"
        )

    def forward_maps(self, x: Any) -> dict[str, np.ndarray]:
        """:meth:`forward`'s outputs and the maps of :mod:`finegrain.inference.explain`;
        :class:`NeedsReexport` for a model exported before the graph had them, :class:`NoMaps` for a
        backbone without them."""
        why = self.maps_missing()
        if why is not None:
            raise NoMaps(why) if self.meta.get("maps") is False else NeedsReexport(why)
        x = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.uint8)
        both = np.concatenate([x, x[..., ::-1]]) if self.tta_flip else x
        return maps_outputs(self._run(both, maps=True), len(x), self.tta_flip)

    def prepare(self, loader) -> None:
        """Batches of ``loader`` run with the threads its worker processes leave free."""
        self.use_threads(model_threads(loader.num_workers))

    def use_threads(self, threads: int) -> None:
        self._threads = threads
        self.session(threads)
