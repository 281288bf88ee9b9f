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
```
Every file is written atomically (temporary file, then rename), so an
interrupted command never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.config import ExperimentConfig, build_config, config_to_yaml, read_yaml
from finegrain.errors import FinegrainError

DEFAULT_RUNS_ROOT = Path("runs")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def is_finished(self) -> bool:
        return self.done_marker.is_file() and self.metrics.is_file()

    def load_config(self) -> ExperimentConfig:
        if not self.config_file.is_file():
            raise FinegrainError(f"{self.path} is not a run directory: no config.yaml in it")
        return build_config(read_yaml(self.config_file))

    def read_metrics(self) -> dict:
        if not self.metrics.is_file():
            raise FinegrainError(f"{self.path}: no metrics.json yet (run `finegrain evaluate {self.path}`)")
        return json.loads(self.metrics.read_text())

    def update_metrics(self, section: str, values: dict) -> dict:
        """Merge ``values`` under ``section`` into metrics.json (atomically)."""
        current = json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}
        current[section] = values
        atomic_write_json(self.metrics, current)
        return current


def open_run(path: str | Path) -> RunDir:
    """An existing run directory (a path, or a name under ./runs)."""
    p = Path(path)
    if not p.is_dir() and (DEFAULT_RUNS_ROOT / p).is_dir():
        p = DEFAULT_RUNS_ROOT / p
    if not (p / "config.yaml").is_file():
        raise FinegrainError(f"{p} is not a run directory (expected {p / 'config.yaml'})")
    return RunDir(p)


def create_run(cfg: ExperimentConfig, runs_root: Path = DEFAULT_RUNS_ROOT, resume: bool = False) -> RunDir:
    """Create ``runs_root/<cfg.name>`` and write the resolved config into it.

    An existing run with a different config is refused unless resuming it, so a
    finished run is never silently overwritten.
    """
    run = RunDir(runs_root / cfg.name)
    text = config_to_yaml(cfg)
    if run.config_file.is_file():
        old = run.config_file.read_text()
        if resume:
            return run
        if run.is_finished() or old != text or run.last_ckpt.is_file():
            raise FinegrainError(
                f"run directory {run.path} already exists"
                + (" and is finished" if run.is_finished() else
                   " with a different config" if old != text else " with checkpoints")
                + "; use --resume to continue it, --name to start another, or delete it"
            )
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config_file, text)
    return run
