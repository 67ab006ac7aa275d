"""Compute precision: its names, its default, what ``auto`` means here, and the Keras dtype policy.

One owner for every command that takes ``--precision`` (extract, train, score, export): the
backbone's or the head's arithmetic runs in ``float32``, ``bfloat16`` or ``float16`` (Keras
mixed precision: float32 weights, low-precision arithmetic); ``auto`` picks bfloat16 where the
hardware computes it natively and float32 elsewhere (:func:`resolve`). Pooled features are
always float32 and the store float16 (:mod:`mlsp.backbone.pooling`, ``features/README.md``).
"""

from __future__ import annotations

import contextlib
import logging

from ..errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "float16")
DEFAULT = "float32"
AUTO = "auto"  # resolved per machine by :func:`resolve`
CHOICES = (*PRECISIONS, AUTO)  # what a user may ask for
AS_ASKED = "as asked"


def check(precision: str, *, allow_auto: bool = True) -> str:
    """``precision`` itself when it names one; a :class:`ConfigError` naming the value otherwise."""
    allowed = CHOICES if allow_auto else PRECISIONS
    if precision not in allowed:
        raise ConfigError(f"precision must be one of {', '.join(allowed)}, received {precision!r}")
    return precision


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve(precision: str) -> tuple[str, str]:
    """(precision, why) for a requested precision; ``auto`` picks bfloat16 where the hardware
    computes it natively (a GPU of compute capability 8.0 or newer, or a CPU with AVX-512 BF16
    or AMX), float32 elsewhere, where bfloat16 would be emulated and slower."""
    if check(precision) != AUTO:
        return precision, AS_ASKED
    from . import backend

    gpu = backend.gpu_bfloat16()
    if gpu is not None:
        return ("bfloat16" if gpu[0] else "float32"), gpu[1]
    native = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if native:
        return "bfloat16", f"the CPU supports bfloat16 in hardware ({', '.join(native)})"
    return "float32", "the CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16), so bfloat16 would be slower"


def resolve_logged(precision: str, what: str = "precision") -> str:
    """:func:`resolve`, logging the choice when ``auto`` made it."""
    resolved, why = resolve(precision)
    if why != AS_ASKED:
        log.info("%s %s: %s", what, resolved, why)
    return resolved


def policy_name(precision: str) -> str:
    """The Keras dtype policy of a (resolved) precision."""
    return "float32" if check(precision, allow_auto=False) == "float32" else f"mixed_{precision}"


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build Keras layers at ``precision`` inside the block; the previous global policy after it."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy_name(precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
