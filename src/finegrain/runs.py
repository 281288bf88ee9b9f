"""The run directory: the one unit of state every command reads or writes.

```
runs/<name>/
  config.yaml        the resolved config (every default written out)
  checkpoints/       best.ckpt and last.ckpt; enough to resume exactly
  history.csv        one row per epoch
  metrics.json       the final evaluation, with its protocol
  embeddings/        vectors with labels and paths
  index/             the similarity index and its metadata
  report/            report.html and figures
  state.json         how far training got: ``training`` (with epochs done / planned) or
                     ``finished`` (the last epoch, or early stopping, ended it)
  DONE               written by ``evaluate`` when it evaluated a finished run
```
Every file is written atomically (temporary file beside it, fsync, rename), so an
interrupted command never leaves a half-written file behind; a write killed midway
leaves at most a ``.<name>.*.tmp`` file, removed when the run is next started or resumed.

A run is *finished* when training ended normally (``state.json``; a kNN row trains
nothing) and ``metrics.json`` evaluates that final model. Anything else is unfinished:
``experiments run`` resumes it, and an evaluation of it is marked ``"partial": true``.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich import filesize

from finegrain.config import ExperimentConfig, build_config, config_to_yaml, load_yaml, migrate_stored, read_yaml
from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

DEFAULT_RUNS_ROOT = Path("runs")

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def human_bytes(n: float) -> str:
    """A byte count for people, in decimal (SI) units as disks and downloads count them (1 kB = 1000
    bytes): ``13.2 MB``, ``800 kB``, ``12 bytes``. Every size finegrain prints goes through it."""
    unit, suffix = filesize.pick_unit_and_suffix(int(n), ["bytes", "kB", "MB", "GB", "TB", "PB"], 1000)
    return "1 byte" if n == 1 else f"{n / unit:.4g} {suffix}"


def no_space_error(path: Path, needed: int | None = None) -> FinegrainError:
    """One line for a write that found the disk full: the file, the space it needs and what is free."""
    try:
        free = f", {human_bytes(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    need = f"it needs {human_bytes(needed)}" if needed is not None else "it needs more room"
    return FinegrainError(
        f"no space left on the device to write {path} ({need}{free}); "
        "free some space and run the command again (nothing already written was lost)"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and a rename.
    A full disk is a one-line :class:`FinegrainError` naming the file and the space it needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in NO_SPACE_ERRNOS:
            raise no_space_error(path, len(data)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files an atomic write killed midway left in ``folder``."""
    removed = []
    for p in folder.glob(".*.tmp") if folder.is_dir() else []:
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d unfinished temporary file(s) in %s", len(removed), folder)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def history(self) -> Path:
        return self.path / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def embeddings(self) -> Path:
        return self.path / "embeddings"

    @property
    def index(self) -> Path:
        return self.path / "index"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def done_marker(self) -> Path:
        return self.path / "DONE"

    @property
    def precision_file(self) -> Path:
        """What ``precision: auto`` chose for each phase and measured (only where it probed)."""
        return self.path / "precision.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def write_state(self, status: str, epochs_done: int, epochs_planned: int, stopped_early: bool = False) -> None:
        """Record how far training got (``training`` or ``finished``), atomically."""
        atomic_write_json(
            self.state_file,
            {
                "status": status,
                "epochs_done": int(epochs_done),
                "epochs_planned": int(epochs_planned),
                "stopped_early": bool(stopped_early),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    def training_precision(self) -> dict[str, Any] | None:
        """``precision.json`` (what ``precision: auto`` chose per phase), or None when absent or unreadable."""
        try:
            phases = json.loads(self.precision_file.read_text())
        except (OSError, ValueError):
            return None
        return phases if isinstance(phases, dict) else None

    def training_state(self) -> dict[str, Any]:
        """``status`` (``not started``, ``training``, ``finished``), ``epochs_done``, ``epochs_planned``,
        ``stopped_early``. Runs older than ``state.json`` are judged by history.csv's epochs."""
        raw = _read_yaml_or_none(self.config_file) or {}
        train = raw.get("train")
        if not isinstance(train, dict):
            train = {}
        planned = int(train.get("epochs", 0) or 0)
        if raw.get("task") == "knn":  # trains nothing
            return {"status": "finished", "epochs_done": 0, "epochs_planned": 0, "stopped_early": False}
        if self.state_file.is_file():
            try:
                state = json.loads(self.state_file.read_text())
                if isinstance(state, dict) and state.get("status") in ("training", "finished"):
                    state = {"epochs_done": 0, "stopped_early": False, **state, "epochs_planned": planned}
                    if (
                        state["status"] == "finished" and not state["stopped_early"] and state["epochs_done"] < planned
                    ):  # resumed with more epochs (--override-stored)
                        state["status"] = "training"
                    return state
            except ValueError:
                pass
        done = _history_epochs(self.history)
        status = (
            "finished"
            if planned and done >= planned
            else "training"
            if done or self.last_ckpt.is_file()
            else "not started"
        )
        return {"status": status, "epochs_done": done, "epochs_planned": planned, "stopped_early": False}

    def training_finished(self) -> bool:
        """Training reached its last epoch or early stopping ended it (a kNN row trains nothing)."""
        return self.training_state()["status"] == "finished"

    def has_started(self) -> bool:
        """Whether training ever took a step here (a checkpoint, an epoch or a recorded state)."""
        return (
            self.last_ckpt.is_file() or self.best_ckpt.is_file() or self.history.is_file() or self.state_file.is_file()
        )

    def is_finished(self) -> bool:
        """Trained to the end and evaluated after that (``DONE`` and a ``metrics.json`` that is not partial)."""
        if not (self.done_marker.is_file() and self.metrics.is_file()):
            return False
        try:
            partial = bool(json.loads(self.metrics.read_text()).get("partial", False))
        except (ValueError, AttributeError):
            return False
        return not partial and self.training_finished()

    def load_config(self) -> ExperimentConfig:
        if not self.config_file.is_file():
            raise FinegrainError(f"{self.path} is not a run directory: no config.yaml in it")
        raw = read_yaml(self.config_file)
        if not raw:
            raise FinegrainError(
                f"{self.config_file}: empty config (a run's config.yaml holds the config it was "
                "trained with; this run's is lost or was never written)"
            )
        return build_config(migrate_stored(raw))

    def read_metrics(self) -> dict:
        if not self.metrics.is_file():
            raise FinegrainError(f"{self.path}: no metrics.json yet (run `finegrain evaluate {self.path}`)")
        return json.loads(self.metrics.read_text())


def open_run(path: str | Path) -> RunDir:
    """An existing run directory (a path, or a name under ./runs)."""
    p = Path(path)
    if not p.is_dir() and (DEFAULT_RUNS_ROOT / p).is_dir():
        p = DEFAULT_RUNS_ROOT / p
    if not (p / "config.yaml").is_file():
        raise FinegrainError(f"{p} is not a run directory (expected {p / 'config.yaml'})")
    return RunDir(p)


def _read_yaml_or_none(path: Path) -> dict | None:
    try:
        data = load_yaml(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _history_epochs(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open() as f:
        return sum(1 for _ in csv.DictReader(f))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(old_yaml: str, new_yaml: str) -> list[str]:
    """The dotted keys whose values differ between two resolved configs (``a: 1 -> 2``)."""
    old, new = _flatten(load_yaml(old_yaml) or {}), _flatten(load_yaml(new_yaml) or {})
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def create_run(
    cfg: ExperimentConfig, runs_root: Path = DEFAULT_RUNS_ROOT, resume: bool = False, override_stored: bool = False
) -> RunDir:
    """Create ``runs_root/<cfg.name>`` and write the resolved config into it.

    An existing run with a different config is refused unless resuming it, so a
    finished run is never silently overwritten. Resuming with a config other than the
    stored one is refused too, naming the keys, unless ``override_stored`` (then the new
    config is stored). A run that never trained a step (its start failed: a bad backbone
    name, a missing dataset) keeps nothing worth protecting and takes the new config.
    Stale temporary files of killed writes are removed.
    """
    run = RunDir(runs_root / cfg.name)
    text = config_to_yaml(cfg)
    if run.config_file.is_file():
        old = run.config_file.read_text()
        if not run.has_started() and not run.metrics.is_file():
            if old != text:
                log.info("%s never trained a step; replacing its config", run.path)
        elif resume:
            if old != text:
                diff = config_differences(old, text)
                if not override_stored:
                    raise FinegrainError(
                        f"cannot resume {run.path} with another config than the one it started with "
                        f"({'; '.join(diff) or 'formatting'}); resume without the changes, or add "
                        "--override-stored to continue with the new config"
                    )
                log.warning("%s: resuming with the new config (%s)", run.path, "; ".join(diff))
                atomic_write_text(run.config_file, text)
            clean_stale_tmp(run.path)
            clean_stale_tmp(run.checkpoints)
            return run
        elif run.is_finished() or old != text or run.last_ckpt.is_file():
            raise FinegrainError(
                f"run directory {run.path} already exists"
                + (
                    " and is finished"
                    if run.is_finished()
                    else " with a different config"
                    if old != text
                    else " with checkpoints"
                )
                + "; use --resume to continue it, --name to start another, or delete it"
            )
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(run.path)
    clean_stale_tmp(run.checkpoints)
    atomic_write_text(run.config_file, text)
    return run
