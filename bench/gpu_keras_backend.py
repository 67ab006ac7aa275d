"""MLSP feature extraction on a GPU through Keras 3's torch backend (no TensorFlow needed).

Why this exists: mlsp's extractor runs on TensorFlow; a machine whose Python has PyTorch but
no TensorFlow (and no way to install it) can still measure the same Keras model -- the same
keras.applications backbone, the same taps and the same registered MultiLevelPooling layer --
on its GPU. It reports images/s (8 views of one size per image, as `mlsp extract` runs them)
in float32 and under Keras' mixed_bfloat16 policy, the achieved TFLOP/s against the GPU's
measured matmul rate of the same precision, and the bfloat16 features' fidelity.

    KERAS_BACKEND=torch python bench/gpu_keras_backend.py --out result.json
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlsp.backbone import nets as backbones  # noqa: E402
from mlsp.backbone.pooling import MultiLevelPooling  # noqa: E402


def conv_flops(model, height, width):
    """2 * MACs of every Conv2D/Dense, from the layer output shapes at this input size."""
    total = 0
    outs = keras.Model(model.input, [l.output for l in model.layers if isinstance(l, keras.layers.Conv2D)])
    spec = outs.compute_output_spec(keras.KerasTensor((1, height, width, 3)))
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    for layer, out in zip(convs, spec):
        kh, kw = layer.kernel_size
        cin = layer.kernel.shape[2]
        total += 2 * out.shape[1] * out.shape[2] * kh * kw * cin * layer.filters
    return total


def build(net, grid, policy):
    keras.config.set_dtype_policy(policy)
    spec = backbones.get_backbone(net)
    keras.utils.set_random_seed(0)
    base = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(None, None, 3))
    taps = [base.get_layer(t).output for t in spec.taps]
    model = keras.Model(base.input, MultiLevelPooling(grid=grid)(taps))
    keras.config.set_dtype_policy("float32")
    return base, model


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype, n=8192, reps=20):
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def time_model(model, views, reps):
    x = torch.as_tensor(views, device=DEVICE, dtype=torch.float32) / 127.5 - 1.0
    with torch.no_grad():
        for _ in range(2):
            model(x, training=False)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            out = model(x, training=False)
        sync()
    return (time.perf_counter() - t) / reps, keras.ops.convert_to_numpy(out).astype(np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_result.json")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    n_mm, r_mm = (512, 2) if args.smoke else (8192, 20)
    result = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "keras": keras.__version__, "backend": keras.backend.backend(),
        "python": platform.python_version(),
        "matmul_tflops": {"float32": matmul_rate(torch.float32, n=n_mm, reps=r_mm) / 1e12,
                          "bfloat16": matmul_rate(torch.bfloat16, n=n_mm, reps=r_mm) / 1e12},
        "runs": [],
    }
    rng = np.random.default_rng(0)
    # AVA's average image is 629x497: 8 corner crops of 87.5% are 550x434
    h, w = (120, 150) if args.smoke else (434, 550)
    views = rng.integers(0, 256, (8, h, w, 3)).astype(np.float32)
    for net, grid in (("iv3", 1), ("irv2", 5)):
        per = {}
        feats = {}
        for policy in ("float32", "mixed_bfloat16"):
            base, model = build(net, grid, policy)
            seconds, f = time_model(model, views, args.reps)
            flops = conv_flops(base, h, w) * 8
            per[policy] = {"s_per_image": seconds, "images_per_s": 1 / seconds,
                           "tflops": flops / seconds / 1e12, "gflop_per_image": flops / 1e9}
            feats[policy] = f
            print(net, policy, per[policy], flush=True)
        a, b = feats["float32"], feats["mixed_bfloat16"]
        # mixed sizes: 10 distinct sizes, each once (cudnn.benchmark autotunes per shape)
        base, model = build(net, grid, "mixed_bfloat16")
        sizes = [(300 + 37 * k, 800 - 41 * k) for k in range(2 if args.smoke else 10)]
        if args.smoke:
            sizes = [(s // 2, t // 2) for s, t in sizes]
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            for sh, sw in sizes:
                x = torch.rand(8, int(sh * 0.875), int(sw * 0.875), 3, device=DEVICE) * 2 - 1
                model(x, training=False)
            sync()
        mixed = (time.perf_counter() - t) / len(sizes)
        result["runs"].append({
            "net": net, "grid": grid, "view_size": [h, w], "views": 8, **{k: v for k, v in per.items()},
            "bf16_speedup": per["float32"]["s_per_image"] / per["mixed_bfloat16"]["s_per_image"],
            "bf16_max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
            "bf16_corr": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "bf16_first_seen_sizes_s_per_image": mixed,
        })
        for policy in ("float32", "mixed_bfloat16"):
            rate = result["matmul_tflops"]["float32" if policy == "float32" else "bfloat16"]
            result["runs"][-1][policy]["share_of_matmul"] = per[policy]["tflops"] / rate
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
