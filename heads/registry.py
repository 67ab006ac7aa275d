"""The head registry: name -> everything mlsp needs to know about one stage-2 head.

Adding a head is its builder in :mod:`heads.models` with ``@register_head(...)`` on it (a
:class:`HeadSpec` in the :class:`mlsp.registry.Registry` ``HEADS``). The builders import Keras
inside their bodies, so listing heads (``mlsp heads``, the CLI's help) does not. A head declares its own options (name, default,
help): ``mlsp train --head-option KEY=VALUE`` and ``api.train(head_options={...})`` pass them
through to the builder as keyword arguments, so a new option touches its head only.

A builder is called as ``builder(x, block_channels, output_bias=..., outputs=..., **options)``
with ``x`` the Keras input tensor: ``(B, C)`` narrow features for a narrow head, ``(B, 5, 5, C)``
wide features for a head with ``needs_wide``. It returns the output tensor ``(B, outputs)``
from a linear last layer whose bias starts at ``output_bias`` (one value, or one per output):
the predicted MOS for ``outputs=1``; for the ``distribution`` target (:mod:`heads.targets`)
10 values that :func:`heads.models.build_head` passes through a softmax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

from mlsp.errors import ConfigError
from mlsp.registry import Registry


PAPER_WIDTH = 2048  # the 3FC's X of Single-3FC and (the authors' code) Pool-3FC, on iv3 and irv2


def feature_width(channels: int | None = None) -> int:
    """The default 3FC width X for features of ``channels`` channels in all.

    The paper uses X = 2048 on both its backbones (iv3: 10,048 channels, irv2: 16,928), about a
    fifth of iv3's features. Narrower features keep that ratio: C / 5 rounded to a power of two,
    at least 64 and never more than the paper's 2048. So iv3 and irv2 keep exactly the paper's
    values, as do effnetv2s/m and convnext_base; mobilenetv3_large (2,168) gets 512 and
    convnext_tiny (6,624) 1024. ``None`` (no features known): the paper's 2048."""
    if channels is None:
        return PAPER_WIDTH
    return int(min(PAPER_WIDTH, max(64, 2 ** round(math.log2(max(1, int(channels)) / 5)))))


def inception_kernels(channels: int | None = None) -> int:
    """Pool-3FC's kernels per column: the paper's 1024 on iv3 and irv2, half the 3FC width."""
    return feature_width(channels) // 2


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """How to build one head, and what it needs from the store."""

    name: str
    builder: Callable  # builder(x, block_channels, output_bias=..., outputs=..., **options)
    needs_wide: bool  # True: takes (5, 5, C) wide features; False: (C,) narrow features
    description: str
    # name -> default: an int, or a function of the features' total channels (``None``: the paper's value)
    options: Mapping[str, int | Callable] = dataclasses.field(default_factory=dict)
    # name -> what the option means (``--head-option``'s help); every option has one
    option_help: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if set(self.option_help) != set(self.options):
            raise ConfigError(f"head {self.name!r}: options {sorted(self.options)} need one help text each, "
                              f"received help for {sorted(self.option_help)}")

    def resolve_builder(self) -> Callable:
        return self.builder

    def default_options(self, channels: int | None = None) -> dict:
        """The head's default options for features of ``channels`` channels in all (``None``: the paper's)."""
        return {k: (v(channels) if callable(v) else v) for k, v in self.options.items()}

    def resolve_options(self, options: Mapping | None = None, channels: int | None = None) -> dict:
        """The head's options with ``options`` applied, the others at their defaults for
        ``channels`` (see :func:`feature_width`); an option the head does not take is an error."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(f"{k} (default {v})" for k, v in self.default_options(channels).items()) or "no options"
            raise ConfigError(f"head {self.name!r} does not take {', '.join(unknown)}; it takes {takes}")
        resolved = self.default_options(channels)
        for key, value in options.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"head option {key} must be a positive integer, received {value!r}")
            resolved[key] = value
        return resolved


HEADS: Registry[HeadSpec] = Registry("head")
get_head = HEADS.get  # the name most callers know


def register_head(name: str, *, needs_wide: bool, description: str, options: Mapping | None = None,
                  option_help: Mapping | None = None):
    """Register the decorated builder as head ``name`` (beside its code in :mod:`heads.models`;
    ``import heads`` imports that module, so every head is registered before anyone asks)."""
    def register(builder: Callable) -> Callable:
        HEADS.register(HeadSpec(name, builder, needs_wide, description, dict(options or {}), dict(option_help or {})))
        return builder

    return register


def parse_options(pairs: Sequence[str]) -> dict:
    """``["width=512", "kernels=256"]`` (``--head-option KEY=VALUE``, repeated) -> ``{"width": 512, ...}``;
    a value is an integer where it reads as one (the head checks the rest)."""
    options = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"a head option is KEY=VALUE, received {pair!r}")
        if key in options:
            raise ConfigError(f"head option {key} given twice ({options[key]!r} and {value!r})")
        try:
            options[key] = int(value)
        except ValueError:
            options[key] = value
    return options


def options_help() -> str:
    """Every registered head's options and what they mean, for ``--head-option``'s help."""
    return "; ".join(f"{spec.name}: " + ", ".join(f"{k} ({spec.option_help[k]})" for k in spec.options)
                     for spec in HEADS.specs() if spec.options)
