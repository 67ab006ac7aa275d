"""The arithmetic cost of a forward pass: FLOPs counted on the Keras model at any input size
(``mlsp backbones``, the benchmarks' FLOP rates)."""

from __future__ import annotations

from .graph import inbound_nodes, node_inputs, node_outputs


class FlopCounter:
    """FLOPs of one forward pass of a functional Keras model at any input size, counted from the
    model: 2 * H_out * W_out * K_h * K_w * C_in / groups * C_out for every Conv2D, 2 * H_out *
    W_out * K_h * K_w * C * multiplier for every DepthwiseConv2D, 2 * in * out per position for
    every Dense; nested models (ConvNeXt's stem and downsampling blocks) are counted through.
    Batch and layer norms, activations, additions and pooling are not counted (they are
    memory-bound, a few % of the arithmetic). Shapes are propagated through the layer graph with
    each operation's ``compute_output_shape`` (operations without one keep their first input's
    shape), which takes milliseconds, so every distinct image size can be counted."""

    def __init__(self, model):
        self.model = model
        self._cache: dict = {}

    def __call__(self, height: int, width: int) -> int:
        key = (int(height), int(width))
        if key not in self._cache:
            shape = (1, key[0], key[1], int(self.model.inputs[0].shape[-1]))
            self._cache[key] = int(count_flops(self.model, shape))
        return self._cache[key]


def count_flops(model, input_shape: tuple) -> int:
    """FLOPs of ``model`` (functional or Sequential) on an input of ``input_shape``; see :class:`FlopCounter`."""
    import keras

    if isinstance(model, keras.Sequential):
        total, shape = 0, tuple(input_shape)
        for layer in model.layers:
            out = tuple(layer.compute_output_shape(shape))
            total += _layer_flops(layer, shape, out)
            shape = out
        return total
    shapes = {id(model.inputs[0]): tuple(input_shape)}
    total = 0
    for operation in model.operations:
        for node in inbound_nodes(operation):
            inputs = node_inputs(node)
            if not inputs or any(id(t) not in shapes for t in inputs):
                continue
            in_shapes = [shapes[id(t)] for t in inputs]
            arg = in_shapes[0] if len(in_shapes) == 1 else in_shapes
            try:
                out = operation.compute_output_shape(arg)
            except Exception:  # ops without a shape rule (irv2's CustomScaleLayer, x + y): shape-preserving
                out = in_shapes[0]
            outputs = node_outputs(node)
            out_list = [out] if len(outputs) == 1 else list(out)
            for tensor, shape in zip(outputs, out_list):
                shapes[id(tensor)] = tuple(shape)
            total += _layer_flops(operation, in_shapes[0], tuple(out_list[0]))
    return total


def _layer_flops(layer, in_shape: tuple, out_shape: tuple) -> int:
    import keras

    if isinstance(layer, keras.Model):
        return count_flops(layer, in_shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * out_shape[1] * out_shape[2] * kh * kw * out_shape[-1]
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1)
        return 2 * out_shape[1] * out_shape[2] * kh * kw * (in_shape[-1] // groups) * layer.filters
    if isinstance(layer, keras.layers.Dense):
        positions = 1
        for d in out_shape[1:-1]:
            positions *= d
        return 2 * positions * in_shape[-1] * layer.units
    return 0
