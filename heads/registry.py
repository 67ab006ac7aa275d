"""The head registry: name -> everything mlsp needs to know about one stage-2 head.

Adding a head is one :func:`register` call with a :class:`HeadSpec`. The builder is named as
``"module:function"`` (or given as a callable), so listing heads (``mlsp heads``, the CLI's
help) does not import Keras.

A builder is called as ``builder(x, block_channels, output_bias=..., outputs=..., **options)``
with ``x`` the Keras input tensor: ``(B, C)`` narrow features for a narrow head, ``(B, 5, 5, C)``
wide features for a head with ``needs_wide``. It returns the output tensor ``(B, outputs)``
from a linear last layer whose bias starts at ``output_bias`` (one value, or one per output):
the predicted MOS for ``outputs=1``; for the ``distribution`` target (:mod:`heads.targets`)
10 values that :func:`heads.models.build_head` passes through a softmax.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping

from mlsp.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """How to build one head, and what it needs from the store."""

    name: str
    builder: str | Callable  # "module:function" or the function itself
    needs_wide: bool  # True: takes (5, 5, C) wide features; False: (C,) narrow features
    description: str
    options: Mapping[str, int] = dataclasses.field(default_factory=dict)  # name -> default

    def resolve_builder(self) -> Callable:
        if callable(self.builder):
            return self.builder
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)

    def resolve_options(self, options: Mapping | None = None) -> dict:
        """The head's options with ``options`` applied; an option the head does not take is an error."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(f"{k} (default {v})" for k, v in self.options.items()) or "no options"
            raise ConfigError(f"head {self.name!r} does not take {', '.join(unknown)}; it takes {takes}")
        resolved = dict(self.options)
        for key, value in options.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"head option {key} must be a positive integer, received {value!r}")
            resolved[key] = value
        return resolved


HEADS: dict[str, HeadSpec] = {}


def register(spec: HeadSpec) -> HeadSpec:
    HEADS[spec.name] = spec
    return spec


def get_head(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}; registered heads: {', '.join(HEADS)}") from None


def list_heads() -> list[HeadSpec]:
    return list(HEADS.values())


register(
    HeadSpec(
        name="single1fc",
        builder="heads.models:single_1fc",
        needs_wide=False,
        description="narrow features -> one Dense(1): a linear model",
    )
)
register(
    HeadSpec(
        name="single3fc",
        builder="heads.models:single_3fc",
        needs_wide=False,
        description="narrow features -> 3FC (X, X/2, X/8, 1)",
        options={"width": 2048},
    )
)
register(
    HeadSpec(
        name="multi3fc",
        builder="heads.models:multi_3fc",
        needs_wide=False,
        description="narrow features split into blocks -> one 3FC per block (X = its channels) "
        "-> learned weighted sum",
    )
)
register(
    HeadSpec(
        name="pool3fc",
        builder="heads.models:pool_3fc",
        needs_wide=True,
        description="wide 5x5 features -> reduced Inception module (3 columns of `kernels`) -> "
        "global average pool -> 3FC (X = width; the paper's figure uses 3072)",
        options={"width": 2048, "kernels": 1024},
    )
)
