"""Registries: one place per kind of named thing (backbones, heads, losses, tasks, index kinds).

An unknown name is an error that lists the valid ones and suggests the closest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from finegrain.errors import ConfigError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → entries of one kind, filled by :meth:`register` where each entry is defined."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file ``entry`` under ``name`` (a name registered twice is a programming error)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(str(unknown_name(self.kind, name, self.names()))) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
