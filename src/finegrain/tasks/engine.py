"""Training through Lightning's Trainer: checkpoints, resume, logs, history.csv.

``fit(cfg)`` is all a command needs: it creates (or resumes) the run directory,
builds the data module and the task, and runs ``Trainer.fit``.

``history.csv`` (one row per epoch) is written by our :class:`History` callback, and Lightning's
own logger is TensorBoard's alone (``logs/``, with the ``hparams.yaml`` reports read class names
from). Lightning's CSVLogger is not used: it writes a row per logging step with train and
validation metrics on separate rows, has no column for an epoch's seconds, appends to and rewrites
its file in place (a kill can leave it half-written; ours is replaced atomically), and on
``--resume`` warns that its directory is not empty and deletes the rows of the epochs before the
resume, where ours keeps them and replaces only the epochs trained again (one row per epoch).
"""

from __future__ import annotations

import csv
import io
import logging
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from finegrain.config import ExperimentConfig, ModelConfig
from finegrain.data.module import FinegrainDataModule
from finegrain.errors import FinegrainError
from finegrain.inference.load import read_checkpoint
from finegrain.machine import resolve_precision, set_threads, tune_allocator
from finegrain.progress import wanted as progress_wanted
from finegrain.runs import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, create_run
from finegrain.tasks import phase_precision
from finegrain.tasks.base import TASKS

log = logging.getLogger(__name__)


def _no_litlogger_ad(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence what Lightning says that is no news to our users. Called when training starts, not
    at import, so importing finegrain changes no global warning or logging state. Idempotent."""
    # Frozen backbones and frozen BatchNorm stay in eval mode on purpose (models/freezing.py).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # A deprecation inside Lightning itself, not in anything a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # A small dataset has fewer batches an epoch than the logging interval; history.csv is per epoch anyway.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # No validation images (val_fraction 0, or too few images) is a choice, not a mistake.
    warnings.filterwarnings("ignore", message=r".*Total length of `\w+` across ranks is zero.*")
    # Lightning's advertisement for its cloud logger is not for our users.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_litlogger_ad not in rank_zero.filters:
        rank_zero.addFilter(_no_litlogger_ad)
    # The `lightning` package adds a console handler of its own; where the CLI has set up logging, its
    # messages would be printed twice.
    if logging.getLogger().handlers:
        for handler in list(logging.getLogger("lightning").handlers):
            logging.getLogger("lightning").removeHandler(handler)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill never leaves half a file.
    Read back with ``weights_only=True`` only: resuming a run cannot execute code from it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:

        return read_checkpoint(Path(path))


class RunState(Callback):
    """``state.json``: ``training`` from the first finished step (with the epochs done so far);
    :func:`fit` writes ``finished`` when ``Trainer.fit`` returns normally."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._recorded = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._recorded and trainer.is_global_zero:
            self.run.write_state("training", trainer.current_epoch, trainer.max_epochs)
            self._recorded = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.run.write_state("training", trainer.current_epoch + 1, trainer.max_epochs)


class RngState(Callback):
    """Saves and restores the Python, NumPy and torch RNGs so a resumed run draws what an unbroken one would."""

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only, so Lightning's ``torch.load(weights_only=True)`` accepts them.
        state = np.random.get_state(legacy=True)
        assert isinstance(state, tuple)  # legacy=True: (kind, keys, pos, has_gauss, gauss)
        kind, keys, pos, has_gauss, gauss = state
        return {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])


class History(Callback):
    """One row per epoch in ``history.csv``: every logged epoch metric, the learning rates and time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._t0 = time.perf_counter()
        self._lrs: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        # the rates at the start of the epoch (at its end an epoch-wise scheduler has already stepped;
        # a per-step schedule such as one-cycle moves within the epoch)
        self._lrs = {
            f"lr/{g.get('name', i)}": g["lr"] for opt in trainer.optimizers for i, g in enumerate(opt.param_groups)
        }

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for k, v in sorted(trainer.callback_metrics.items()):
            if k.endswith("_step") or k.startswith("lr-"):  # lr-*: LearningRateMonitor's copy, for the loggers
                continue
            row[k.removesuffix("_epoch")] = round(float(v), 6)
        row.update(self._lrs)
        row["seconds"] = round(time.perf_counter() - self._t0, 2)
        rows = [r for r in read_history(self.path) if int(r["epoch"]) < row["epoch"]] + [row]
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, out.getvalue())


class BudgetStop(Callback):
    """``--budget``: stop after the epoch that leaves too little time before ``deadline`` (a
    ``time.monotonic`` instant: the budget's end minus the evaluation's predicted time) for another
    epoch as long. The run is checkpointed and evaluated (its metrics marked partial: so many of so
    many epochs), and ``--resume`` continues it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._t0 = time.monotonic()
        self.stopped_after: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.monotonic()
        done = trainer.current_epoch + 1
        if done < trainer.max_epochs and now + (now - self._t0) > self.deadline:
            trainer.should_stop = True
            self.stopped_after = done
            log.warning(
                "budget: stopping after epoch %d of %d, as another epoch (%.0f s) would overrun the time "
                "left for the evaluation; `finegrain train --resume` continues the run",
                done,
                trainer.max_epochs,
                now - self._t0,
            )


class ThreadPlan(Callback):
    """Torch threads and loader workers together fill the cores, never more: set when the
    training loader (and so the number of its worker processes) is known."""

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        set_threads(getattr(loader, "num_workers", 0) or 0)


class PlainProgress(Callback):
    """Progress as log lines, for output that is not a terminal (nohup, CI, SLURM logs).

    About every tenth of an epoch: batches done, images per second and the training
    loss; at the end of an epoch its losses and validation metrics.
    """

    def __init__(self, every_fraction: float = 0.1) -> None:
        self.every_fraction = every_fraction
        self._t0 = 0.0
        self._images = 0
        self._next = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._images, self._next = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[0]) if isinstance(batch, (list, tuple)) else 0
        total = trainer.num_training_batches
        if not trainer.is_global_zero or not isinstance(total, int) or batch_idx + 1 < self._next:
            return
        self._next = batch_idx + 1 + max(1, int(total * self.every_fraction))
        rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
        loss = trainer.callback_metrics.get("train/loss_step")
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        log.info(
            "epoch %d/%d: batch %d/%d, %.1f images/s%s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            batch_idx + 1,
            total,
            rate,
            loss_text,
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after validation, in Lightning 2
        if not trainer.is_global_zero:
            return
        vals = {
            k.removesuffix("_epoch"): float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("val/") or k == "train/loss_epoch"
        }
        log.info(
            "epoch %d/%d done in %.0f s: %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            time.perf_counter() - self._t0,
            ", ".join(f"{k} {v:.4f}" for k, v in vals.items()),
        )


def read_history(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def make_task(cfg: ExperimentConfig, class_names: list[str], train_labels: list[int]):
    """The registered LightningModule of the config's task."""
    import finegrain.tasks.classification  # noqa: F401 - registers its task
    import finegrain.tasks.metric_learning  # noqa: F401 - registers its task

    if not cfg.trains:
        raise FinegrainError(f"task '{cfg.task}' is not trained; run `finegrain evaluate` on it instead")
    return TASKS.get(cfg.task)(cfg.model_dump(mode="json"), class_names, train_labels=train_labels)


def check_resumable(ckpt: Path, cfg: ExperimentConfig) -> None:
    """Refuse an unsafe or unreadable checkpoint, or one written for another model architecture,
    naming what differs."""

    state = read_checkpoint(ckpt)  # weights_only: a planted checkpoint cannot run code
    hp = state.get("hyper_parameters")
    config = hp.get("config") if isinstance(hp, dict) else None
    old = config.get("model") if isinstance(config, dict) else None
    new = cfg.model.model_dump(mode="json")
    if old is None:
        raise FinegrainError(f"{ckpt} is not a finegrain checkpoint (no model config in it)")
    old = ModelConfig().model_dump(mode="json") | old  # a key added since the checkpoint: its default
    # the weights' source, the freeze policy and stochastic depth change training, not the architecture
    diff = [k for k in new if old.get(k) != new[k] and k not in ("weights", "freeze", "drop_path")]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} in checkpoint vs {new[k]!r} now" for k in diff)
        raise FinegrainError(f"checkpoint {ckpt} was written by another model architecture ({detail})")


def trainer_for(
    cfg: ExperimentConfig,
    run: RunDir,
    monitor: str,
    mode: str,
    has_val: bool,
    precision: str | None = None,
    deadline: float | None = None,
) -> L.Trainer:
    """The Lightning trainer of a run, in ``precision`` (default: ``train.precision`` resolved); with a
    ``deadline`` (``--budget``), :class:`BudgetStop`."""
    t = cfg.train
    if not has_val:
        monitor, mode = "train/loss_epoch", "min"
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run.checkpoints,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ),
        # last.ckpt after every epoch: Lightning's save_last writes it only in epochs that improved
        # the monitored metric, so a kill after an epoch without progress lost that epoch
        ModelCheckpoint(
            dirpath=run.checkpoints,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ),
        LearningRateMonitor(logging_interval="epoch"),
        History(run.history),
        RngState(),
        ThreadPlan(),
        RunState(run),
    ]
    if t.ema_decay:
        # optional: Lightning (the train extra), imported only when this runs
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if deadline is not None:
        callbacks.append(BudgetStop(deadline))
    if t.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=t.early_stopping_patience))
    # FINEGRAIN_PROGRESS=0 silences progress; a terminal gets a live bar, anything else log lines.
    wanted = progress_wanted()
    progress = wanted and sys.stdout.isatty()
    if progress:
        # optional: Lightning (the train extra), imported only when this runs
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    elif wanted:
        callbacks.append(PlainProgress())
    strategy = t.strategy
    devices = t.devices
    if strategy == "auto" and (t.num_nodes > 1 or (isinstance(devices, int) and devices > 1)):
        strategy = "ddp"
    return L.Trainer(
        default_root_dir=run.path,
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        # one of machine.PRECISIONS (less auto), all of which Lightning accepts
        precision=cast(_PRECISION_INPUT, precision or resolve_precision(t.precision)),
        gradient_clip_val=t.grad_clip,
        callbacks=callbacks,
        logger=TensorBoardLogger(run.path, name="logs", version=""),  # history.csv: History (module docstring)
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        reload_dataloaders_every_n_epochs=1 if cfg.data.progressive_sizes else 0,  # a new size per stage
        use_distributed_sampler=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )


def fit(
    cfg: ExperimentConfig,
    runs_root: Path = Path("runs"),
    resume: bool = False,
    override_stored: bool = False,
    deadline: float | None = None,
) -> tuple[RunDir, bool]:
    """Train ``cfg`` into ``runs_root/<name>``; returns the run and whether this is the global-zero process.

    Resuming with a config other than the stored one is refused unless ``override_stored``.
    A start that fails before the first training step (a bad backbone name, a missing
    dataset) removes the run directory it made, so the corrected command just works.
    When ``Trainer.fit`` returns normally (last epoch, early stopping, or a ``deadline`` of
    ``--budget``: :class:`BudgetStop`) ``state.json`` says ``finished``.
    """

    quiet_lightning()
    tune_allocator()  # no mmap/munmap of every step's tensors (machine.ALLOCATOR_SETTINGS)
    run = create_run(cfg, runs_root, resume=resume, override_stored=override_stored)
    try:
        if resume:
            cfg = run.load_config() if run.config_file.is_file() else cfg
        ckpt = run.last_ckpt if resume and run.last_ckpt.is_file() else None
        if resume and ckpt is None:
            log.info("no checkpoint in %s yet: starting from the beginning", run.checkpoints)
        if ckpt is not None:
            check_resumable(ckpt, cfg)
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        torch.set_float32_matmul_precision("high")
        dm = FinegrainDataModule(cfg)
        train_labels = sorted({r.label for r in dm.train_records})
        task = make_task(cfg, dm.class_names, train_labels)
        phases = phase_precision.choose(cfg, task.model)
        task.cache_precision = phases.cache if phases.cache != phases.steps else None
        if phases.images_per_second:
            atomic_write_json(run.precision_file, phases.as_dict())
        trainer = trainer_for(
            cfg,
            run,
            task.monitor,
            task.monitor_mode,
            has_val=bool(dm.val_records),
            precision=phases.steps,
            deadline=deadline,
        )
        trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except BaseException:
        if not run.has_started() and not run.metrics.is_file():
            log.info("training never started; removing %s", run.path)
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    callbacks = getattr(trainer, "callbacks", [])  # Lightning sets it at run time; its stubs do not declare it
    budget_stopped = any(isinstance(c, BudgetStop) and c.stopped_after for c in callbacks)
    if trainer.is_global_zero and not budget_stopped:  # a budget's stop leaves it "training": --resume continues
        done = int(trainer.current_epoch)
        run.write_state("finished", done, cfg.train.epochs, stopped_early=done < cfg.train.epochs)
    return run, trainer.is_global_zero
