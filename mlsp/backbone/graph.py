"""The one place mlsp reads Keras' functional graph beyond its public API.

Keras 3 has no public way to walk a functional model's graph from a layer to the operations
that produce or consume its tensors; tapping an unnamed output (``after:NAME``), folding batch
norms and counting FLOPs need exactly that. These few functions are all of it, so a Keras
release that renames ``_inbound_nodes``, ``_outbound_nodes`` or ``_keras_history`` breaks one
module, and ``tests/test_keras_graph.py`` says so plainly (pyproject.toml pins ``keras<4``).
"""

from __future__ import annotations

from ..errors import KerasGraphChanged


def _read(obj, attribute: str):
    try:
        return getattr(obj, attribute)
    except AttributeError:
        import keras

        raise KerasGraphChanged(
            f"Keras {keras.__version__}: {type(obj).__name__} has no {attribute}; mlsp reads Keras' "
            "functional graph through mlsp/backbone/graph.py, which needs updating for this Keras") from None


def inbound_nodes(operation) -> list:
    """The nodes where ``operation`` (a layer or op) is called: one per call in the graph."""
    return list(_read(operation, "_inbound_nodes"))


def outbound_nodes(operation) -> list:
    """The nodes of the operations that consume ``operation``'s output."""
    return list(_read(operation, "_outbound_nodes"))


def node_inputs(node) -> list:
    """The symbolic tensors a node takes."""
    return list(_read(node, "input_tensors"))


def node_outputs(node) -> list:
    """The symbolic tensors a node gives."""
    return list(_read(node, "output_tensors"))


def producer(tensor):
    """The operation whose output the symbolic ``tensor`` is."""
    return _read(_read(tensor, "_keras_history"), "operation")
