"""What a run's report is drawn from: its config, metrics, class names, test embeddings and
the image files they name, each read so that a missing or broken input leaves a gap, not an error."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from finegrain.config import load_yaml
from finegrain.runs import RunDir

log = logging.getLogger(__name__)


def read_metrics(run: RunDir) -> dict | None:
    """The run's metrics.json, or None when it is missing or unreadable."""
    if not run.metrics.is_file():
        return None
    try:
        return json.loads(run.metrics.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable metrics.json: %s", run.path, e)
        return None


def load_config(run: RunDir):
    """The run's config, or None when config.yaml is missing or invalid."""
    try:
        return run.load_config()
    except Exception as e:  # noqa: BLE001 - the report shows what it can
        log.warning("%s: no usable config.yaml: %s", run.path, e)
        return None


def per_class_names(per_class_csv: Path) -> list[str] | None:
    """Class names in class-index order: the row order of per_class.csv."""
    if not per_class_csv.is_file():
        return None
    with per_class_csv.open(newline="") as f:
        names = [r.get("class") or "" for r in csv.DictReader(f)]
    return names or None


def logged_class_names(run_dir: Path) -> list[str] | None:
    """Class names in class-index order as training logged them (``logs/hparams.yaml``)."""
    path = run_dir / "logs" / "hparams.yaml"
    if not path.is_file():
        return None

    try:
        names = (load_yaml(path.read_text()) or {}).get("class_names")
    except yaml.YAMLError:
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def names_from_folders(labels: np.ndarray, paths: list[str]) -> list[str] | None:
    """Class names from an image-folder layout: each label's most common parent folder name,
    used only when it covers at least 90% of that label's images and labels get distinct names."""

    if not len(labels):
        return None
    counts: dict[int, Counter] = {}
    for lab, p in zip(np.asarray(labels).tolist(), paths, strict=True):
        counts.setdefault(int(lab), Counter())[Path(p).parent.name] += 1
    folder = {}
    for lab, c in counts.items():
        name, n = c.most_common(1)[0]
        if n < 0.9 * sum(c.values()):
            return None
        folder[lab] = name
    if len(set(folder.values())) != len(folder) or min(folder) < 0:
        return None
    return [folder.get(i, f"class {i}") for i in range(max(folder) + 1)]


def load_embeddings(npz: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(embeddings, labels, image paths) of a saved .npz, or None when missing or unreadable."""
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:
            return np.asarray(z["embeddings"]), np.asarray(z["labels"]), [str(p) for p in z["paths"]]
    except Exception as e:  # noqa: BLE001
        log.warning("%s: unreadable embeddings: %s", npz, e)
        return None


def path_resolver(run: RunDir):
    """Image paths are stored as the evaluation saw them (absolute, or relative to where it ran)."""
    bases = [Path.cwd(), run.path.parent.parent, run.path.parent, run.path]

    def resolve(p: str) -> Path:
        q = Path(p)
        if q.is_absolute() or q.exists():
            return q
        for b in bases:
            if (b / q).exists():
                return b / q
        return q

    return resolve


def examples_by_class(
    wanted: list[str],
    labels: np.ndarray | None,
    paths: list[str] | None,
    class_names: list[str] | None,
    per_class: int = 2,
    resolve=Path,
) -> dict[str, list[Path]]:
    """Up to ``per_class`` example image paths for each wanted class name: by label (through
    ``class_names``), else by the image's parent folder name."""
    out: dict[str, list[Path]] = {}
    if labels is None or paths is None:
        return out
    index = {n: i for i, n in enumerate(class_names or [])}
    for name in wanted:
        if name in out:
            continue
        if name in index:
            hits = np.flatnonzero(labels == index[name])
            chosen = [paths[i] for i in hits[:per_class]]
        else:
            chosen = [p for p in paths if Path(p).parent.name == name][:per_class]
        out[name] = [resolve(p) for p in chosen]
    return out


@dataclass
class RunInputs:
    """Everything one run's report is drawn from (None where an input is missing)."""

    run: RunDir
    out_dir: Path
    cfg: Any
    metrics: dict | None
    per_class_csv: Path
    names: list[str] | None
    emb: tuple[np.ndarray, np.ndarray, list[str]] | None
    resolve: Callable[[str], Path]
    title: str
    description: str


def read_run_inputs(run_path: Path, class_names: list[str] | None = None) -> RunInputs:
    """Read a run's report inputs; class names come from ``class_names``, else per_class.csv's
    row order, else the names training logged, else the images' folders."""
    run = RunDir(Path(run_path))
    out_dir = run.report
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run)
    metrics = read_metrics(run)
    per_class_csv = run.path / "per_class.csv"
    names = (
        list(class_names)
        if class_names is not None
        else (per_class_names(per_class_csv) or logged_class_names(run.path))
    )
    npz = run.embeddings / "test.npz"
    emb = load_embeddings(npz)
    if names is None and emb is not None:
        names = names_from_folders(emb[1], emb[2])
    resolve = path_resolver(run)
    title = cfg.name if cfg is not None else (metrics or {}).get("run", run.name)
    description = (cfg.description if cfg is not None else "") or ""
    return RunInputs(run, out_dir, cfg, metrics, per_class_csv, names, emb, resolve, title, description)
