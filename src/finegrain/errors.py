"""Errors a user can act on.

Anything raised as a :class:`FinegrainError` is printed by the CLI as a one-line
message (no traceback) and ends the program with exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class FinegrainError(Exception):
    """A problem the user can fix: bad input, missing files, unknown names."""


class ConfigError(FinegrainError):
    """An invalid configuration: unknown key, bad value, unreadable YAML."""


class DataError(FinegrainError):
    """A dataset that cannot be found, recognised or read."""


class ImageError(DataError):
    """One image file that cannot be used.

    ``reason`` is a short machine-friendly tag: ``missing``, ``empty``,
    ``not-an-image``, ``truncated``, ``corrupt``, ``too-large``.
    """

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        msg = f"{self.path}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def did_you_mean(name: str, valid: Iterable[str], cutoff: float = 0.6, prefix: str = "") -> str:
    """`` Did you mean '<prefix><closest>'?`` for the valid name closest to ``name``, else ``""``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=cutoff)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> FinegrainError:
    """An error for an unknown registry name that lists the valid ones."""
    return FinegrainError(f"unknown {kind} '{name}'.{did_you_mean(name, valid)} Valid: {', '.join(sorted(valid))}")
