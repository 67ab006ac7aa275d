"""Measures two changes to mlsp's forward graph that the profile (bench/profile_forward.py)
points to, without changing mlsp: they are applied here to a copy of the extractor's model.

1. ``pool``: wide pooling as two broadcast matmuls (columns, then rows) instead of
   ``einsum("ih,bhwc,jw->bijc")``, which TensorFlow runs with transposes of every block's map.
2. ``fold``: batch norm folded into the convolution before it (inference only): the kernel is
   scaled by gamma / sqrt(var + eps) and gets the bias beta - mean * gamma / sqrt(var + eps);
   the BatchNormalization layer becomes an Identity. This removes a multiply and an add over
   every activation map (and, under mixed_bfloat16, Keras' casts of each batch norm's input to
   float32 and back), and lets oneDNN fuse conv + bias + ReLU.

    python bench/exp_forward_fixes.py [--configs irv2:wide,iv3:narrow] [--precisions float32,bfloat16]
                                      [--size 420x420] [--reps 3]

For each variant: forward seconds (median of interleaved repetitions) and the max relative
difference of its features from the unchanged graph's. Writes ``<out>/fixes-<time>-<device>.json``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import log  # noqa: E402


def einsum_pool_one(self, x):
    """MultiLevelPooling.pool_one as first written (mlsp up to d7ef7b3): one einsum."""
    from keras import ops

    from mlsp.pooling import area_weights

    x = ops.cast(x, "float32")
    if self.grid == 1:
        return ops.mean(x, axis=(1, 2))
    shape = ops.shape(x)
    rows = area_weights(shape[1], self.grid)
    cols = area_weights(shape[2], self.grid)
    return ops.einsum("ih,bhwc,jw->bijc", rows, x, cols)


def matmul_pool_one(self, x):
    """Drop-in for MultiLevelPooling.pool_one: the same area weights, two matmuls, no transpose."""
    from keras import ops

    from mlsp.pooling import area_weights

    x = ops.cast(x, "float32")
    if self.grid == 1:
        return ops.mean(x, axis=(1, 2))
    shape = ops.shape(x)
    rows = area_weights(shape[1], self.grid)  # (g, H)
    cols = area_weights(shape[2], self.grid)  # (g, W)
    y = ops.matmul(cols[None, None], x)  # (B, H, g, C)
    y = ops.reshape(y, (shape[0], shape[1], self.grid * shape[3]))
    z = ops.matmul(rows[None], y)  # (B, g, g*C)
    return ops.reshape(z, (shape[0], self.grid, self.grid, shape[3]))


def _passthrough_class():
    import keras

    class FoldedBatchNorm(keras.layers.Layer):
        """What is left of a batch norm folded into its convolution: nothing."""

        def call(self, inputs, training=None, mask=None):
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    return FoldedBatchNorm


def fold_batchnorm(model):
    """A copy of ``model`` with every BatchNormalization that directly follows a Conv2D (its
    only consumer) folded into that convolution."""
    import keras

    passthrough = _passthrough_class()
    conv_of_bn, bn_of_conv = {}, {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and len(layer._inbound_nodes) == 1:
            prev = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
            if isinstance(prev, keras.layers.Conv2D) and len(prev._outbound_nodes) == 1:
                conv_of_bn[layer.name] = prev.name
                bn_of_conv[prev.name] = layer.name

    def clone(layer):
        config = layer.get_config()
        if layer.name in bn_of_conv:
            config["use_bias"] = True
            return layer.__class__.from_config(config)
        if layer.name in conv_of_bn:
            return passthrough(name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in conv_of_bn or not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        if layer.name in bn_of_conv:
            bn = model.get_layer(bn_of_conv[layer.name])
            kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
            bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.use_bias else 0.0
            mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
            var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
            gamma = keras.ops.convert_to_numpy(bn.gamma).astype(np.float64) if bn.scale else 1.0
            beta = keras.ops.convert_to_numpy(bn.beta).astype(np.float64) if bn.center else 0.0
            s = gamma / np.sqrt(var + bn.epsilon)
            target.set_weights([(kernel * s).astype(np.float32), ((bias - mean) * s + beta).astype(np.float32)])
        else:
            target.set_weights(layer.get_weights())
    return folded, len(bn_of_conv)


def forward_fn(model, spec):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], reduce_retracing=True)
    def forward(batch):
        return tf.cast(model(spec.preprocess(tf.cast(batch, tf.float32)), training=False), tf.float32)

    return lambda views: forward(views).numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="irv2:wide,iv3:narrow")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--size", default="420x420", help="HxW of each view")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))

    import keras

    from mlsp import pooling
    from mlsp.extract import ExtractConfig, FeatureExtractor

    record = common.new_record("fixes", vars(args))
    record["device"] = common.device_info()
    batch = np.random.default_rng(0).integers(0, 256, (args.views, h, w, 3), dtype=np.uint8)
    original_pool_one = pooling.MultiLevelPooling.pool_one
    for spec_text in args.configs.split(","):
        net, pool = spec_text.split(":")
        float32_ref = None
        for precision in args.precisions.split(","):
            cfg = ExtractConfig(net=net, pooling=pool, weights="random:0", precision=precision)
            # the unchanged graph: mlsp folds batch norms itself from the version that adopted the change
            if "fold_batch_norms" in inspect.signature(FeatureExtractor).parameters:
                fx = FeatureExtractor(cfg, fold_batch_norms=False)
            else:
                fx = FeatureExtractor(cfg)
            gflop = common.FlopCounter(fx.model)(h, w) * args.views / 1e9
            spec = fx.config.spec
            policy = keras.config.dtype_policy()
            keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
            try:
                folded, n_folded = fold_batchnorm(fx.model)
            finally:
                keras.config.set_dtype_policy(policy)
            # the pooling change is a method swap: it applies to every model whose graph is traced after it
            variants = {"as is": (fx.model, False), "pool": (fx.model, True), "fold": (folded, False),
                        "fold+pool": (folded, True)}
            fns = {}
            for name, (model, new_pool) in variants.items():
                pooling.MultiLevelPooling.pool_one = matmul_pool_one if new_pool else einsum_pool_one
                fn = forward_fn(model, spec)
                fn(batch)  # trace now, under the pooling chosen
                fns[name] = fn
            pooling.MultiLevelPooling.pool_one = original_pool_one
            ref = fns["as is"](batch)
            if precision == "float32":
                float32_ref = ref
            times = {k: [] for k in fns}
            with common.Phase() as phase:
                for _ in range(args.reps):
                    for name, fn in fns.items():
                        common.wait_quiet()
                        t = time.perf_counter()
                        fn(batch)
                        times[name].append(time.perf_counter() - t)
            rows = {}
            base = statistics.median(times["as is"])
            for name, fn in fns.items():
                out = fn(batch)
                t = statistics.median(times[name])
                rows[name] = {"s": t, "gflops": gflop / t, "speedup": base / t, "all_s": times[name],
                              "max_rel_vs_as_is": float(np.abs(out - ref).max() / np.abs(ref).max())}
                if float32_ref is not None:
                    rows[name]["max_rel_vs_float32"] = float(np.abs(out - float32_ref).max() / np.abs(float32_ref).max())
                    rows[name]["pearson_vs_float32"] = float(np.corrcoef(out.ravel(), float32_ref.ravel())[0, 1])
            key = f"{net}_{pool}_{precision}"
            record["figures"][key] = {"variants": rows, "bn_folded": n_folded, "gflop": gflop, "phase": phase.record()}
            log(f"{key} ({n_folded} batch norms folded; other processes {phase.record()['other_cores']} cores):")
            for name, r in rows.items():
                log(f"    {name:<10} {r['s']:.3f} s  {r['gflops']:5.0f} GFLOP/s  x{r['speedup']:.2f}  "
                    f"max_rel {r['max_rel_vs_as_is']:.2e}, vs float32 {r.get('max_rel_vs_float32', float('nan')):.2e}")
            del fx, folded, fns
    path = common.write_record(record, args.out)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
