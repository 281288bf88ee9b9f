"""A run's trained model and the config it was trained with, from one source: the checkpoint.

``config.yaml`` is the human-readable copy; when it says something else than the
checkpoint about how the model sees images, loading stops and names the keys, so that
an index and its queries can never be made at different sizes or settings. Checkpoints
load with ``weights_only=True``: a run directory from a stranger cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finegrain.config import ExperimentConfig, build_config, migrate_stored, read_yaml
from finegrain.errors import FinegrainError
from finegrain.models.build import build_from_config, num_outputs
from finegrain.runs import RunDir, open_run

if TYPE_CHECKING:  # torch is imported where a model is built: the ONNX engine uses the checks here without it
    import torch

# Sections of config.yaml that decide what the model computes for an image; the rest
# (data.root, batch sizes, workers, training settings) may differ between the copy and the checkpoint.
INFERENCE_KEYS = (
    "model",
    "data.image_size",
    "data.eval_image_sizes",
    "data.crop_bbox",
    "data.bbox_margin",
    "eval.tta_flip",
    "task",
)


@dataclass
class LoadedModel:
    """A run's trained model, ready for inference."""

    model: torch.nn.Module
    cfg: ExperimentConfig
    class_names: list[str]
    checkpoint: Path
    checksum: str
    """sha256 of the checkpoint file: an index or export remembers which model built it."""

    @property
    def has_classifier(self) -> bool:
        return getattr(self.model, "classifier", None) is not None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_checkpoint(run: RunDir) -> Path:
    """The best checkpoint, else the last one."""
    for p in (run.best_ckpt, run.last_ckpt):
        if p.is_file():
            return p
    raise FinegrainError(f"{run.path}: no checkpoint in {run.checkpoints} (train it first)")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with ``weights_only=True`` (tensors and plain data only)."""
    return read_checkpoint_hashed(path)[0]


def read_checkpoint_hashed(path: Path) -> tuple[dict[str, Any], str]:
    """:func:`read_checkpoint`, and the sha256 of the very bytes it unpickled (one read of the file)."""
    # optional: torch (the train extra), imported only when this runs
    import torch

    try:
        data = path.read_bytes()
    except OSError as e:
        raise FinegrainError(f"cannot read checkpoint {path}: {e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FinegrainError(
            f"refusing checkpoint {path}: it is unsafe or not a finegrain checkpoint (it holds "
            f"Python objects that loading would execute; {first})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise FinegrainError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict):
        raise FinegrainError(f"{path} is not a finegrain checkpoint (not a mapping)")
    return state, hashlib.sha256(data).hexdigest()


def checkpoint_config(state: dict[str, Any], path: Path) -> tuple[ExperimentConfig, list[str]]:
    """The config and class names a checkpoint was trained with."""
    hp = state.get("hyper_parameters") or {}
    if not isinstance(hp, dict) or "config" not in hp or "class_names" not in hp:
        raise FinegrainError(f"{path} is not a finegrain checkpoint (no config in it)")
    try:
        cfg = ExperimentConfig.model_validate(migrate_stored(hp["config"]))
    except Exception as e:  # noqa: BLE001
        raise FinegrainError(f"{path}: the config stored in it is not valid: {str(e)[:300]}") from None
    return cfg, [str(c) for c in hp["class_names"]]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_config_copy(run: RunDir, cfg: ExperimentConfig) -> None:
    """Refuse a run whose ``config.yaml`` disagrees with its checkpoint on how images are seen."""
    if not run.config_file.is_file():
        return
    copy = build_config(migrate_stored(read_yaml(run.config_file))).model_dump(mode="json")
    stored = cfg.model_dump(mode="json")
    differ = [k for k in INFERENCE_KEYS if _get(copy, k) != _get(stored, k)]
    if differ:
        detail = "; ".join(
            f"{k}: {_get(copy, k)!r} in config.yaml, {_get(stored, k)!r} in the checkpoint" for k in differ
        )
        raise FinegrainError(
            f"{run.config_file} disagrees with the config stored in its checkpoint ({detail}); "
            "the model was trained with the checkpoint's: restore config.yaml, or train anew"
        )


def load_model(run: RunDir | str | Path, checkpoint: Path | None = None) -> LoadedModel:
    """Rebuild a run's model from its checkpoint's config and load the checkpoint's weights."""
    run = run if isinstance(run, RunDir) else open_run(run)
    if checkpoint is None and not run.best_ckpt.is_file() and not run.last_ckpt.is_file():
        cfg = run.load_config()
        if not cfg.trains:  # a kNN row trains nothing: its model is another run's, or the pretrained one
            return source_model(cfg, run)
    ckpt = checkpoint or run_checkpoint(run)
    state, checksum = read_checkpoint_hashed(ckpt)
    cfg, class_names = checkpoint_config(state, ckpt)
    check_config_copy(run, cfg)

    model = build_from_config(cfg, num_outputs(cfg, len(class_names)), weights="none")
    sd = state.get("state_dict")
    if not isinstance(sd, dict):
        raise FinegrainError(f"{ckpt} is not a finegrain checkpoint (no state_dict in it)")
    weights = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FinegrainError(
            f"checkpoint {ckpt} does not match the model of its config "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.eval()
    return LoadedModel(model, cfg, class_names, ckpt, checksum)


def source_model(cfg: ExperimentConfig, run: RunDir) -> LoadedModel:
    """The model of a kNN run (which trains nothing): ``eval.source_run``'s trained one, else the
    backbone with its pretrained weights. The kNN run's own config says how to see images."""
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import split_for

    class_names = split_for(cfg.data).class_names
    if cfg.eval.source_run:
        sibling = run.path.parent / cfg.eval.source_run
        source = load_model(open_run(sibling if (sibling / "config.yaml").is_file() else cfg.eval.source_run))
        return LoadedModel(source.model, cfg, class_names, source.checkpoint, source.checksum)
    model = build_from_config(cfg, num_outputs(cfg, len(class_names))).eval()
    stamp = f"pretrained:{cfg.model.backbone}:{cfg.model.weights}"
    return LoadedModel(model, cfg, class_names, Path(stamp), hashlib.sha256(stamp.encode()).hexdigest())
