"""Running a trained model over images: logits, features and embeddings in batches.

Used by evaluation, ``finegrain embed``, the index and the search service.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from finegrain.config import ExperimentConfig
from finegrain.errors import FinegrainError
from finegrain.runs import RunDir, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A run's trained model, ready for inference."""

    model: torch.nn.Module
    cfg: ExperimentConfig
    class_names: list[str]
    checkpoint: Path
    checksum: str
    """sha256 of the checkpoint file: an index remembers which model built it."""


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


def load_model(run: RunDir, checkpoint: Path | None = None) -> LoadedModel:
    """Rebuild a run's model from its config and load the checkpoint weights."""
    from finegrain.tasks.base import build_from_config

    if checkpoint is None and not run.best_ckpt.is_file() and not run.last_ckpt.is_file():
        cfg = run.load_config()
        if cfg.task == "knn":  # a kNN row trains nothing: its model is another run's, or the pretrained one
            return source_model(cfg, run)
    ckpt = checkpoint or run_checkpoint(run)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise FinegrainError(f"cannot read checkpoint {ckpt}: {e}") from None
    hp = state.get("hyper_parameters") or {}
    if "config" not in hp:
        raise FinegrainError(f"{ckpt} is not a finegrain checkpoint (no config in it)")
    cfg = ExperimentConfig.model_validate(hp["config"])
    class_names = list(hp["class_names"])
    num_classes = None if (cfg.task == "metric_learning" and cfg.model.head == "embedding") else len(class_names)
    model = build_from_config(cfg, num_classes, weights="none")
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FinegrainError(
            f"checkpoint {ckpt} does not match the model of {run.config_file} "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.eval()
    return LoadedModel(model, cfg, class_names, ckpt, file_sha256(ckpt))


def source_model(cfg: ExperimentConfig, run: RunDir) -> LoadedModel:
    """The model of a kNN run: ``eval.source_run``'s trained one, else the backbone with its pretrained weights."""
    from finegrain.data.module import split_for
    from finegrain.tasks.base import build_from_config

    if cfg.eval.source_run:
        sibling = run.path.parent / cfg.eval.source_run
        from finegrain.runs import open_run

        return load_model(open_run(sibling if (sibling / "config.yaml").is_file() else cfg.eval.source_run))
    class_names = split_for(cfg.data).class_names
    model = build_from_config(cfg, None if cfg.model.head == "embedding" else len(class_names)).eval()
    stamp = f"pretrained:{cfg.model.backbone}:{cfg.model.weights}"
    return LoadedModel(model, cfg, class_names, Path(stamp), hashlib.sha256(stamp.encode()).hexdigest())


@dataclass
class Outputs:
    """Model outputs over a loader, in loader order (bad images dropped)."""

    labels: np.ndarray          # [N] int
    indices: np.ndarray         # [N] index into the loader's records
    features: np.ndarray        # [N, feature_dim] float32
    embeddings: np.ndarray      # [N, D] float32 (the embedding head, else the features)
    logits: np.ndarray | None   # [N, C] float32 when the model has a classifier
    seconds: float              # wall time of the forward passes

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("nan")


def autocast_for(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    if precision == "16-mixed" and torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def forward_tta(model: torch.nn.Module, x: torch.Tensor, tta_flip: bool) -> dict[str, torch.Tensor]:
    """The model's outputs; with ``tta_flip`` the mean of the image's and its mirror's."""
    out = model(x)
    if tta_flip:
        flipped = model(torch.flip(x, dims=[3]))
        out = {k: (v + flipped[k]) / 2 for k, v in out.items()}
    return out


def predict(model: torch.nn.Module, loaders: DataLoader | list[DataLoader], precision: str = "32",
            channels_last: bool = False, tta_flip: bool = False, progress: bool = False,
            description: str = "predicting") -> Outputs:
    """Forward every batch; with ``tta_flip`` average the outputs of the image and its mirror.
    Several loaders (the same records at several sizes): outputs averaged over them."""
    if isinstance(loaders, DataLoader):
        loaders = [loaders]
    outs = [_predict(model, loader, precision, channels_last, tta_flip, progress,
                     description + (f" at {loader.dataset.size[0]}x{loader.dataset.size[1]}" if len(loaders) > 1 else ""))
            for loader in loaders]
    first = outs[0]
    if any(not np.array_equal(o.indices, first.indices) for o in outs[1:]):
        raise FinegrainError("the loaders of the evaluation sizes gave different images")
    if len(outs) == 1:
        return first

    def mean(name: str) -> np.ndarray:
        return np.mean([getattr(o, name) for o in outs], axis=0).astype(np.float32)

    return Outputs(labels=first.labels, indices=first.indices, features=mean("features"),
                   embeddings=mean("embeddings"), logits=mean("logits") if first.logits is not None else None,
                   seconds=sum(o.seconds for o in outs))


@torch.inference_mode()
def _predict(model: torch.nn.Module, loader: DataLoader, precision: str, channels_last: bool,
             tta_flip: bool, progress: bool, description: str) -> Outputs:
    from rich.progress import Progress

    device = next(model.parameters()).device
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    has_logits = getattr(model, "classifier", None) is not None
    labels, indices, feats, embs, logits = [], [], [], [], []
    seconds = 0.0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(loader))
        for batch in loader:
            bar.advance(task)
            if batch is None:
                continue
            x, y, idx = batch
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            with autocast_for(precision):
                out = forward_tta(model, x, tta_flip)
            seconds += time.perf_counter() - t0
            labels.append(y.numpy())
            indices.append(idx.numpy())
            feats.append(out["features"].float().cpu().numpy())
            embs.append(out.get("embedding", out["features"]).float().cpu().numpy())
            if has_logits:
                logits.append(out["logits"].float().cpu().numpy())
    if not labels:
        raise FinegrainError("no readable images to run the model on")
    emb = np.concatenate(embs).astype(np.float32)
    return Outputs(
        labels=np.concatenate(labels), indices=np.concatenate(indices),
        features=np.concatenate(feats).astype(np.float32), embeddings=emb,
        logits=np.concatenate(logits).astype(np.float32) if has_logits else None, seconds=seconds,
    )


def save_embeddings(run: RunDir, split: str, out: Outputs, paths: list[str], checksum: str) -> Path:
    """``embeddings/<split>.npz`` (vectors, labels, paths) + a JSON sidecar naming the model."""
    dest = run.embeddings / f"{split}.npz"
    import io

    buf = io.BytesIO()
    np.savez(buf, embeddings=out.embeddings, labels=out.labels, paths=np.array(paths))
    atomic_write_bytes(dest, buf.getvalue())
    atomic_write_json(run.embeddings / f"{split}.json", {
        "split": split, "n": int(len(out.labels)), "dim": int(out.embeddings.shape[1]),
        "model_checksum": checksum, "images_per_second": out.images_per_second,
    })
    return dest


def load_embeddings(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = run.embeddings / f"{split}.npz"
    if not path.is_file():
        raise FinegrainError(f"{run.path} has no {split} embeddings (run `finegrain embed {run.path} --split {split}`)")
    with np.load(path) as z:
        return z["embeddings"], z["labels"], [str(p) for p in z["paths"]]
