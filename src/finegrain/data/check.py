"""``finegrain data check``: read a dataset, decode every image, report problems.

The report lists, per official split, images and classes; absent splits with the
reader's explanation; bad files (``missing``, ``empty``, ``not-an-image``,
``truncated``, ``corrupt``, ``too-large``: the reasons of :class:`ImageError`);
images that needed converting to 8-bit RGB, by kind; and identical files (same
bytes) found in both train and test. ``ok`` is False on bad files or cross-split
duplicates.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.progress import track
from rich.table import Table
from rich.text import Text

from finegrain.data.detect import open_collection
from finegrain.data.images import open_rgb
from finegrain.errors import ImageError
from finegrain.progress import wanted as progress_wanted

EXAMPLES = 3  # example paths shown per conversion kind


@dataclass
class BadFile:
    """One image that cannot be used: ``reason`` is an :class:`ImageError` tag."""

    path: Path
    split: str
    reason: str
    detail: str = ""


@dataclass
class CheckReport:
    """The findings of :func:`check_dataset`."""

    root: Path
    format: str
    class_names: list[str]
    images: dict[str, int]  # split -> number of listed images
    classes: dict[str, int]  # split -> number of classes with at least one image
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)
    conversions: dict[str, list[Path]] = field(default_factory=dict)  # kind -> paths
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (train path, test path)
    hashed: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ok(self) -> bool:
        """False when some file is bad or an image is in both train and test."""
        return not self.bad_files and not self.duplicates


def _inspect(path: Path, hash_bytes: bool) -> tuple[str | None, str | None, str, str | None]:
    """Decode ``path`` fully; return (conversion, bad reason, detail, content hash)."""
    digest = None
    try:
        _, conversion = open_rgb(path)
    except ImageError as e:
        return None, e.reason, e.detail, None
    if hash_bytes:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
    return conversion, None, "", digest


def _progress_enabled(progress: bool) -> bool:
    return progress and progress_wanted()


def check_dataset(
    root: str | Path,
    format: str = "auto",
    hash_duplicates: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> CheckReport:
    """Read the dataset at ``root``, decode every image (``workers`` threads) and
    return a :class:`CheckReport`. Raises :class:`DataError` if it cannot be read at all."""
    col = open_collection(root, format)
    report = CheckReport(
        root=col.root,
        format=col.format,
        class_names=list(col.class_names),
        images={s: len(r) for s, r in col.splits.items()},
        classes={s: len({x.label for x in r}) for s, r in col.splits.items()},
        missing=dict(col.missing),
        notes=list(col.notes),
        hashed=hash_duplicates,
    )
    jobs = [(split, rec.path) for split, recs in col.splits.items() for rec in recs]
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    conversions: dict[str, list[Path]] = defaultdict(list)
    hashes: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: _inspect(job[1], hash_duplicates), jobs, chunksize=64)
        for (split, path), (conv, reason, detail, digest) in _tracked(
            zip(jobs, results, strict=True), len(jobs), progress
        ):
            if reason is not None:
                report.bad_files.append(BadFile(path, split, reason, detail))
                continue
            if conv is not None:
                conversions[conv].append(path)
            if digest is not None:
                hashes[split][digest].append(path)
    report.conversions = dict(sorted(conversions.items()))
    if hash_duplicates:
        _find_duplicates(report, hashes)
    return report


def _tracked(items, total: int, progress: bool):
    """Iterate ``items``, behind a rich progress bar when enabled."""
    if not _progress_enabled(progress):
        yield from items
        return

    # on stderr: stdout carries the report alone (``--json``, ``> log.txt``)
    yield from track(items, total=total, description="Decoding images", transient=True, console=Console(stderr=True))


def _find_duplicates(report: CheckReport, hashes: dict[str, dict[str, list[Path]]]) -> None:
    train, test = hashes.get("train", {}), hashes.get("test", {})
    for digest in sorted(set(train) & set(test)):
        for a in train[digest]:
            for b in test[digest]:
                report.duplicates.append((a, b))
    for split, by_hash in hashes.items():
        groups = [paths for paths in by_hash.values() if len(paths) > 1]
        if groups:
            extra = sum(len(g) - 1 for g in groups)
            report.notes.append(
                f"{split}: {len(groups)} groups of identical files ({extra} redundant copies), e.g. "
                + ", ".join(str(p) for p in groups[0][:2])
            )


def check_to_dict(report: CheckReport) -> dict:
    """``report`` as JSON-able data for scripts: the counts, and every problem file by its full path."""
    return {
        "root": str(report.root),
        "format": report.format,
        "ok": report.ok,
        "num_classes": report.num_classes,
        "class_names": list(report.class_names),
        "images": dict(report.images),
        "classes": dict(report.classes),
        "missing": dict(report.missing),
        "notes": list(report.notes),
        "bad_files": [
            {"path": str(b.path), "split": b.split, "reason": b.reason, "detail": b.detail} for b in report.bad_files
        ],
        "conversions": {kind: [str(p) for p in paths] for kind, paths in report.conversions.items()},
        "duplicates": [{"train": str(a), "test": str(b)} for a, b in report.duplicates],
        "hashed": report.hashed,
    }


def render_check(report: CheckReport):
    """A rich renderable (a Group of tables) summarising ``report`` for the CLI.

    File names are never cut: columns that hold paths fold rather than end in an ellipsis
    (the CLI's console is wide when its output is not a terminal, so there they stay whole)."""

    head = Text.assemble(
        ("Dataset ", "bold"),
        str(report.root),
        "  format: ",
        (report.format, "cyan"),
        f"  classes: {report.num_classes}",
    )
    splits = Table(title="Splits", show_edge=False)
    splits.add_column("split")
    splits.add_column("images", justify="right")
    splits.add_column("classes", justify="right")
    splits.add_column("status", overflow="fold")  # an absent split's reason may name a file
    for s in report.images:
        splits.add_row(s, f"{report.images[s]:,}", f"{report.classes[s]:,}", "present")
    for s, why in report.missing.items():
        splits.add_row(s, "-", "-", Text(f"absent: {why}", style="yellow"))
    parts: list = [head, splits]
    if report.notes:
        parts.append(Text("Notes:\n" + "\n".join(f"  - {n}" for n in report.notes)))
    if report.bad_files:
        t = Table(title=f"Bad files ({len(report.bad_files)})", show_edge=False, title_style="bold red")
        t.add_column("split")
        t.add_column("reason", style="red")
        t.add_column("file", overflow="fold")
        t.add_column("detail", overflow="fold")
        for b in report.bad_files:
            t.add_row(b.split, b.reason, Text(str(b.path)), Text(b.detail))  # Text: [brackets] are not markup
        parts.append(t)
    if report.conversions:
        t = Table(title="Converted to 8-bit RGB on loading", show_edge=False)
        t.add_column("kind")
        t.add_column("images", justify="right")
        t.add_column("examples", overflow="fold")
        for kind, paths in report.conversions.items():
            t.add_row(kind, str(len(paths)), Text(", ".join(str(p) for p in paths[:EXAMPLES])))
        parts.append(t)
    if report.duplicates:
        t = Table(
            title=f"Identical images in train and test ({len(report.duplicates)})",
            show_edge=False,
            title_style="bold red",
        )
        t.add_column("train", overflow="fold")
        t.add_column("test", overflow="fold")
        for train_path, test_path in report.duplicates:
            t.add_row(Text(str(train_path)), Text(str(test_path)))
        parts.append(t)
    elif not report.hashed:
        parts.append(Text("Duplicate check skipped (hashing disabled).", style="dim"))
    verdict = (
        Text("OK", style="bold green")
        if report.ok
        else Text(
            f"PROBLEMS: {len(report.bad_files)} bad files, {len(report.duplicates)} train/test duplicates",
            style="bold red",
        )
    )
    parts.append(verdict)
    return Group(*parts)
