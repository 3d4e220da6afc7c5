"""The one generic registry: named factories of one kind, duplicates rejected, unknown names explained."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from splitveil.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes, factories, instances) of one kind.

    Args:
        kind: what the registry holds, used in error messages ("codec", "model", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Registers `item` under `name`; without `item`, works as a decorator."""

        def add(obj: T) -> T:
            key = str(name)
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        """Returns the item called `name`, or raises a ConfigError that lists the known names."""
        key = str(getattr(name, "value", name))
        try:
            return self._items[key]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {key!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(getattr(name, "value", name)) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
