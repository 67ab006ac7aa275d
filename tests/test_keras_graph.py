"""mlsp.backbone.graph against the installed Keras: the graph attributes it reads are there and mean
what mlsp takes them to mean. A Keras release that changes them fails here, by name, before
tapping, folding or FLOP counting go wrong elsewhere."""

import pytest

from mlsp.backbone import graph as keras_graph
from mlsp.errors import KerasGraphChanged


@pytest.fixture(scope="module")
def graph():
    import keras

    x = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")
    bn = keras.layers.BatchNormalization(name="bn")
    relu = keras.layers.ReLU(name="relu")
    y = conv(x)
    z = bn(y)
    w = relu(z)
    return keras.Model(x, [w, y]), conv, bn, relu, y, z, w


def test_producers_consumers_and_node_tensors(graph):
    model, conv, bn, relu, y, z, w = graph
    assert keras_graph.producer(y) is conv and keras_graph.producer(z) is bn and keras_graph.producer(w) is relu
    (bn_node,) = keras_graph.inbound_nodes(bn)
    assert keras_graph.node_inputs(bn_node) == [y] and keras_graph.node_outputs(bn_node) == [z]
    (consumer,) = keras_graph.outbound_nodes(conv)  # the model's output y is not a consumer
    assert keras_graph.node_outputs(consumer) == [z]
    assert keras_graph.outbound_nodes(relu) == []
    assert len(keras_graph.inbound_nodes(conv)) == 1
    assert keras_graph.producer(model.outputs[1]) is conv


def test_a_missing_attribute_is_one_error_naming_it():
    with pytest.raises(KerasGraphChanged, match="object has no _inbound_nodes; .*mlsp/backbone/graph.py"):
        keras_graph.inbound_nodes(object())
