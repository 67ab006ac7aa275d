"""The generic registry every kind of named spec uses (mlsp.registry)."""

import dataclasses

import pytest

from mlsp.errors import ConfigError
from mlsp.registry import Registry


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    value: int = 0


def test_register_get_and_order():
    reg = Registry("widget")
    reg.register(Spec("b", 1))
    reg.register(Spec("a", 2))
    assert reg.names() == ["b", "a"]
    assert list(reg) == ["b", "a"] and len(reg) == 2 and "a" in reg and "c" not in reg
    assert reg.get("a").value == 2 and reg["b"].value == 1
    assert [s.name for s in reg.specs()] == ["b", "a"]


def test_a_name_is_never_replaced_and_unknown_names_list_the_known():
    reg = Registry("widget")
    reg.register(Spec("a", 1))
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        reg.register(Spec("a", 2))
    assert reg.get("a").value == 1
    with pytest.raises(ConfigError, match="unknown widget 'z'; registered: a"):
        reg.get("z")
