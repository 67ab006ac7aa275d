"""One generic registry: name -> spec, for backbones, heads, targets and pretrained models.

Each kind of thing mlsp can be asked for by name keeps its entries in one :class:`Registry`;
an entry is data (a frozen dataclass with a ``name``), added with :meth:`Registry.register`,
beside the code it names where there is code (a decorator: ``@register_head``, ``@report_source``).
Code a spec names refers to functions, never to "module:function" strings; what must not import
Keras when listed imports it inside its body.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


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
