"""The in-memory description of a dataset, shared by every format reader.

A format reader (``stanford_cars``, ``tiny_imagenet``, ``folder``) turns a folder
on disk into an :class:`ImageCollection`: class names plus, per official split,
a list of :class:`ImageRecord`. Protocols (``splits.py``) turn a collection into
the train / val / test lists a task trains and evaluates on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

UNLABELLED = -1
"""The label of an image without a class (a gallery folder without class sub-folders)."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: its file, its class and optionally a bounding box.

    ``label`` is a 0-based index into :attr:`ImageCollection.class_names`, or
    :data:`UNLABELLED`.
    ``bbox`` is ``(x1, y1, x2, y2)`` in pixels of the file on disk, inclusive,
    0-based (Stanford Cars' 1-based devkit boxes are converted on reading).
    """

    path: Path
    label: int
    bbox: tuple[int, int, int, int] | None = None


@dataclass
class ImageCollection:
    """A dataset as found on disk.

    ``splits`` maps official split names (``train``, ``test``) to records.
    ``missing`` maps a split that the format defines but that is absent on disk
    to a sentence that says what was looked for and where.
    ``notes`` are facts worth telling the user (e.g. "validation used as test").
    """

    format: str
    root: Path
    class_names: list[str]
    splits: dict[str, list[ImageRecord]]
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def all_records(self) -> list[ImageRecord]:
        """Every record of every split, in split order."""
        return [r for recs in self.splits.values() for r in recs]
