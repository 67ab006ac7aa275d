"""Keras 2 weight files of the authors' heads, written with h5py in the exact layout Keras 2.2.4's
``save_weights`` gives (root ``layer_names``, ``backend``, ``keras_version``; a group per layer with
``weight_names`` and its tensors under ``<layer>/<name>:0``), with the layer names of kutils'
``fc_layers(name='head', batch_norm=2)`` and ``inception_block``; and the authors' computation in
numpy, written from their definitions, to check an imported head against.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

BN_EPSILON = 1e-3  # Keras 2's BatchNormalization default, which kutils keeps
FC_TENSORS = ("kernel", "bias")
BN_TENSORS = ("gamma", "beta", "moving_mean", "moving_variance")


def _bn(rng, n, scale=True):
    out = {"gamma": rng.uniform(0.5, 1.5, n)} if scale else {}
    out.update(beta=rng.normal(0, 0.1, n), moving_mean=rng.normal(0, 0.2, n), moving_variance=rng.uniform(0.3, 2.0, n))
    return out


def fc_layers(rng, channels: int, width: int, mos: float = 5.4) -> list:
    """kutils ``fc_layers(name='head', fc_sizes=[X, X/2, X/8, 1], batch_norm=2)``: the layers in
    model order as ``(name, {tensor: array})``, weightless ones (dropouts) included."""
    layers, fan_in = [], channels
    for i, units in enumerate((width, width // 2, width // 8)):
        layers.append((f"head_fc{i}", {"kernel": rng.normal(0, np.sqrt(2 / fan_in), (fan_in, units)),
                                       "bias": rng.normal(0, 0.05, units)}))
        layers.append((f"head_bn{i}", _bn(rng, units)))
        layers.append((f"head_do{i}", {}))
        fan_in = units
    layers.append(("head_out", {"kernel": rng.normal(0, np.sqrt(1 / fan_in), (fan_in, 1)), "bias": np.array([mos])}))
    return layers


def inception_block(rng, channels: int, kernels: int) -> list:
    """kutils ``inception_block(size=kernels)`` (conv without bias, BN without scale, ReLU)."""
    half = kernels // 2

    def unit(name, rows, cols, c_in, c_out):
        kernel = rng.normal(0, np.sqrt(2 / (rows * cols * c_in)), (rows, cols, c_in, c_out))
        return [(f"{name}_conv", {"kernel": kernel}), (f"{name}_bn", _bn(rng, c_out, scale=False)), (name, {})]

    return [*unit("branch_1x1", 1, 1, channels, kernels), *unit("3x3_1x1", 1, 1, channels, kernels),
            *unit("3x3_1x3", 1, 3, kernels, half), *unit("3x3_3x1", 3, 1, kernels, half), ("branch_3x3", {}),
            ("avg_pool_2d", {}), *unit("branch_pool", 1, 1, channels, kernels), ("mixed_final", {}),
            ("final_GAP", {})]


def authors_layers(head: str, channels: int, width: int, kernels: int | None = None, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    layers = [("input_1", {})]
    if head == "pool3fc":
        layers += inception_block(rng, channels, kernels)
        channels = 3 * kernels
    return layers + fc_layers(rng, channels, width)


def calibrated(layers, features):
    """The batch norms' moving statistics set to those of these features, layer by layer, as
    training leaves them: the head then tells these images apart (a random backbone's features
    of similar pictures differ little)."""
    weights = dict(layers)
    x = np.concatenate(features)
    for i in range(3):
        fc, bn = weights[f"head_fc{i}"], weights[f"head_bn{i}"]
        h = np.maximum(x @ fc["kernel"] + fc["bias"], 0.0)
        bn["moving_mean"], bn["moving_variance"] = h.mean(0), h.var(0) + 1e-2
        x = (h - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) * bn["gamma"] + bn["beta"]
    return layers


def write_keras2(path, layers: list, *, dtype=np.float32):
    """Write ``layers`` ((name, {tensor: array}) in model order) as Keras 2.2.4's save_weights does."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for name, tensors in layers:
            group = f.create_group(name)
            order = [t for t in (*FC_TENSORS, *BN_TENSORS) if t in tensors] + \
                    [t for t in tensors if t not in FC_TENSORS + BN_TENSORS]
            group.attrs["weight_names"] = np.array([f"{name}/{t}:0".encode() for t in order])
            for t in order:
                group.create_dataset(f"{name}/{t}:0", data=np.asarray(tensors[t], dtype=dtype))
    return path


def n_params(layers: list) -> int:
    return sum(int(np.size(a)) for _, tensors in layers for a in tensors.values())


# -- the authors' computation, in numpy (float64) ------------------------------------------------

def _batch_norm(x, w):
    y = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + BN_EPSILON)
    return y * w.get("gamma", 1.0) + w["beta"]


def forward_fc(x, weights: dict):
    """Dense(relu) -> BN -> (dropout: identity) three times, then the linear Dense(1)."""
    for i in range(3):
        fc = weights[f"head_fc{i}"]
        x = _batch_norm(np.maximum(x @ fc["kernel"] + fc["bias"], 0.0), weights[f"head_bn{i}"])
    return x @ weights["head_out"]["kernel"] + weights["head_out"]["bias"]


def _conv_same(x, kernel):
    """Stride-1 'same' convolution of (N, H, W, C) with an odd (kh, kw, C, F) kernel."""
    kh, kw = kernel.shape[:2]
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[1:3]
    out = 0.0
    for dy in range(kh):
        for dx in range(kw):
            out = out + padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx]
    return out


def _avg_pool_same(x):
    """3x3 average, stride 1, 'same': the mean of the pixels inside the image (TensorFlow's)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ones = np.pad(np.ones(x.shape[1:3]), 1)
    h, w = x.shape[1:3]
    total = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    count = sum(ones[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return total / count[None, :, :, None]


def forward_pool3fc(x, weights: dict):
    """inception_block -> global average pool -> fc_layers, on (N, 5, 5, C) wide features."""
    def unit(name, inputs):
        return np.maximum(_batch_norm(_conv_same(inputs, weights[f"{name}_conv"]["kernel"]), weights[f"{name}_bn"]), 0)

    b1 = unit("branch_1x1", x)
    b3 = unit("3x3_1x1", x)
    b3 = np.concatenate([unit("3x3_1x3", b3), unit("3x3_3x1", b3)], axis=-1)
    bp = unit("branch_pool", _avg_pool_same(x))
    mixed = np.concatenate([b1, b3, bp], axis=-1)
    return forward_fc(mixed.mean(axis=(1, 2)), weights)


def forward(head: str, x, layers: list):
    weights = {name: {k: np.asarray(v, np.float32).astype(np.float64) for k, v in t.items()}
               for name, t in layers if t}
    x = np.asarray(x, np.float64)
    return (forward_pool3fc(x, weights) if head == "pool3fc" else forward_fc(x, weights))[:, 0]
