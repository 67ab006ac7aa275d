"""One generic registry: name -> spec, for backbones, heads, targets and pretrained models.

Each kind of thing mlsp can be asked for by name keeps its entries in one :class:`Registry`;
an entry is data (a frozen dataclass with a ``name``), added with :meth:`Registry.register`.
Code that a spec names lazily (so that listing entries does not import Keras) is written as
``"module:function"`` and resolved with :func:`resolve`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def resolve(target: str | Callable) -> Callable:
    """A callable given as itself or as ``"module:function"`` (imported now)."""
    if callable(target):
        return target
    module, sep, function = str(target).partition(":")
    if not sep or not module or not function:
        raise ConfigError(f"expected 'module:function', received {target!r}")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {target!r}: {e}") from e


class Registry(Generic[T]):
    """Named specs of one kind (``kind`` names them in messages: "backbone", "head", ...).

    A name is registered once: registering it again is an error, so no entry is ever replaced
    in silence. Iteration and :meth:`names` keep registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, spec: T) -> T:
        name = getattr(spec, "name")
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered; choose another name")
        self._entries[name] = spec
        return spec

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def specs(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
