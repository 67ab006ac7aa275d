"""The native engine: the extractor's backbone, taps and pooling run by PyTorch modules of its own.

Keras' torch backend runs a convolution as a permutation of every activation to channels-first
and back, casts and permutes the kernel on every call, and adds bias and activation as separate
kernels, at about 0.3 ms of host time per layer (irv2 has ~800): on a GPU that is most of the
time. This module reads the Keras model mlsp builds (:class:`mlsp.extraction.job.FeatureExtractor`'s,
after batch-norm folding: the same weights) into a :class:`Plan`, a list of steps over numbered
tensors, with the weights as numpy; :class:`NativeNet` runs the plan with plain
``torch.nn.functional`` calls: channels-last memory, weights cast once to the compute
precision, bias in the convolution and the activation in place, nothing after the last tap, the
taps exactly the registry's, and the pooling (narrow or wide, :mod:`mlsp.backbone.pooling`'s) on the
device, so only pooled features come back.

The plan is generic over the layer types the Inception nets hold (:data:`SUPPORTED`); a model
with any other keeps the Keras path (:func:`plan_or_reason` says why, one log line).

Mixed sizes in one call (:meth:`NativeNet.run_mixed`): views are padded bottom/right to a
bucket (multiples of :data:`BUCKET_STEP` px) and computed exactly as each alone, where the net
is *bucket-exact* (:func:`bucket_exact`: every strided operation is 'valid', every 'same' one
has stride 1): the region outside each view is zeroed before every 'same' operation with a
kernel larger than one, the 'same' average pool is avgpool(x*m)/avgpool(m), and every tap is
pooled over each view's own valid extent. Whether an entry of the backbone registry is
bucket-exact is data (:attr:`mlsp.backbone.nets.BackboneSpec.bucket_exact`), checked by a test.

PyTorch is imported only here and only when a :class:`NativeNet` is made: the plan itself needs
no backend, but a process runs the native engine only with Keras on PyTorch
(:func:`check_backend`), since TensorFlow and PyTorch in one process crash (:mod:`mlsp.runtime.backend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import numpy as np

from ..errors import ConfigError
from .graph import inbound_nodes, node_inputs, node_outputs

log = logging.getLogger(__name__)

ENGINES = ("auto", "keras", "native")  # the CLI's --engine choices
DEFAULT_ENGINE = "auto"
BUCKET_STEP = 32  # px: views are padded up to the next multiple of this on each side
SUPPORTED = ("InputLayer", "Conv2D", "FoldedBatchNorm", "BatchNormalization", "Activation", "Concatenate",
             "CustomScaleLayer", "MaxPooling2D", "AveragePooling2D")
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "silu", "swish")
COMPUTE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclasses.dataclass
class Step:
    """One operation of the plan: ``kind`` on the tensors ``inputs`` gives tensor ``output``.
    ``kernel``/``stride``/``padding`` describe its spatial map (None for pointwise steps)."""

    kind: str  # conv | affine | act | concat | scale_add | maxpool | avgpool | identity
    name: str
    inputs: tuple
    output: int
    kernel: tuple | None = None
    stride: tuple = (1, 1)
    padding: str = "valid"
    activation: str = "linear"
    weights: tuple = ()  # numpy arrays: conv (kernel HWIO, bias or None); affine (scale, shift)
    scale: float = 1.0

    @property
    def spatial(self) -> bool:
        return self.kernel is not None

    @property
    def masks_input(self) -> bool:
        """Reads neighbours that may lie outside a padded view: a 'same' op with a kernel > 1."""
        return self.spatial and self.padding == "same" and max(self.kernel) > 1


@dataclasses.dataclass
class Plan:
    """The steps from the input (tensor 0) to the last tap, in order; ``taps``: the tensors
    pooled, in the registry's order."""

    steps: list
    taps: tuple
    channels: tuple

    def out_size(self, step: Step, size: tuple) -> tuple:
        """The spatial size of ``step``'s output for an input of ``size`` (h, w), as Keras computes it."""
        if not step.spatial:
            return size
        if step.padding == "same":
            return tuple(-(-n // s) for n, s in zip(size, step.stride))
        return tuple((n - k) // s + 1 for n, k, s in zip(size, step.kernel, step.stride))


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, received {engine!r}")
    return engine


def check_backend(engine: str):
    """The native engine needs Keras on PyTorch in this process; a :class:`ConfigError` otherwise."""
    from ..runtime import backend

    current = backend.name()
    if current != "torch":
        raise ConfigError(f"--engine {engine} runs on PyTorch, and Keras runs on {current} in this process "
                          "(TensorFlow and PyTorch never share one): add --backend torch, e.g. "
                          "`mlsp --backend torch extract ... --engine native`")


def resolve_engine(engine: str) -> tuple[str, str]:
    """(``keras`` or ``native``, why) for a requested engine, before the backbone is read (a
    backbone holding a layer type the native engine does not know keeps the Keras path then):
    ``auto`` is native where Keras runs on PyTorch with a CUDA device, keras otherwise
    (TensorFlow stays the CPU default)."""
    from ..runtime import backend

    check_engine(engine)
    if engine == "keras":
        return "keras", "as asked"
    if engine == "native":
        check_backend(engine)
        return "native", "as asked"
    if backend.name() != "torch":
        return "keras", f"Keras runs on {backend.name()}"
    if backend.devices()[0] == "cpu":
        return "keras", "no CUDA device"
    return "native", "a CUDA device"


_CHOSEN = {"engine": DEFAULT_ENGINE}


@contextlib.contextmanager
def engine_chosen(engine: str | None):
    """Inside the block, every extractor made without an engine of its own runs on ``engine``
    (``mlsp extract --engine``, ``mlsp score --engine``, down to the extractors the scoring code
    makes); None keeps the current one. The previous choice is back after the block."""
    previous = _CHOSEN["engine"]
    if engine is not None:
        _CHOSEN["engine"] = check_engine(engine)
    try:
        yield
    finally:
        _CHOSEN["engine"] = previous


def with_engine(function):
    """``function(..., engine=None)`` run inside :func:`engine_chosen` of its ``engine``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with engine_chosen(kwargs.get("engine")):
            return function(*args, **kwargs)

    return wrapper


def chosen_engine() -> str:
    return _CHOSEN["engine"]


# --------------------------------------------------------------------------------------------
# From the Keras graph to a plan
# --------------------------------------------------------------------------------------------


def plan_or_reason(model, tap_tensors) -> tuple[Plan | None, str]:
    """(the plan of ``model`` up to ``tap_tensors``, "") or (None, why not). Only the layers the
    taps depend on are read: what follows the last tap (a pooling layer, the net's head) never runs."""
    slots: dict = {}  # id(symbolic tensor) -> slot number

    def slot(tensor):
        return slots.setdefault(id(tensor), len(slots))

    slot(model.inputs[0])
    calls = []  # (layer, input slots, output slot or None)
    for layer in model.operations:  # layers and plain ops (``x + y``), in graph order
        nodes = inbound_nodes(layer)
        if type(layer).__name__ == "InputLayer":
            continue
        single = len(nodes) == 1 and len(node_outputs(nodes[0])) == 1
        out = slot(node_outputs(nodes[0])[0]) if single else None
        calls.append((layer, tuple(slot(t) for n in nodes for t in node_inputs(n)), out))
    taps = tuple(slots.get(id(t), -1) for t in tap_tensors)
    if -1 in taps:
        return None, "a tap is not the output of a layer"
    wanted, needed = set(taps), []
    for layer, inputs, out in reversed(calls):
        if out is None and not wanted.isdisjoint(inputs):
            return None, f"layer {layer.name} is called more than once"
        if out in wanted:
            needed.append((layer, inputs, out))
            wanted.update(inputs)
    if wanted - {out for _, _, out in needed} - {0}:
        return None, "a tensor the taps need is not made by a layer of the model"
    steps = []
    for layer, inputs, out in reversed(needed):
        kind = type(layer).__name__
        if kind not in SUPPORTED:
            return None, f"layer {layer.name} is a {kind}, which the native engine does not run"
        step, why = _step(layer, kind, inputs, out)
        if step is None:
            return None, why
        steps.append(step)
    return Plan(steps, taps, tuple(int(t.shape[-1]) for t in tap_tensors)), ""


def _step(layer, kind: str, inputs: tuple, output: int) -> tuple[Step | None, str]:
    """The step of one Keras layer, or (None, why it is not supported)."""
    import keras

    as_np = keras.ops.convert_to_numpy
    config = layer.get_config()
    base = dict(name=layer.name, inputs=inputs, output=output)
    if kind == "Conv2D":
        if config.get("groups", 1) != 1 or tuple(config["dilation_rate"]) != (1, 1):
            return None, f"{layer.name}: grouped or dilated convolution"
        if config["data_format"] != "channels_last" or config["activation"] not in ACTIVATIONS:
            return None, f"{layer.name}: {config['data_format']}, activation {config['activation']}"
        bias = as_np(layer.bias).astype(np.float32) if layer.use_bias else None
        return Step("conv", kernel=tuple(config["kernel_size"]), stride=tuple(config["strides"]),
                    padding=config["padding"], activation=config["activation"],
                    weights=(as_np(layer.kernel).astype(np.float32), bias), **base), ""
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        if config["data_format"] != "channels_last":
            return None, f"{layer.name}: {config['data_format']}"
        return Step("maxpool" if kind == "MaxPooling2D" else "avgpool", kernel=tuple(config["pool_size"]),
                    stride=tuple(config["strides"]), padding=config["padding"], **base), ""
    if kind == "Activation":
        if config["activation"] not in ACTIVATIONS:
            return None, f"{layer.name}: activation {config['activation']}"
        return Step("act", activation=config["activation"], **base), ""
    if kind == "Concatenate":
        if config["axis"] not in (-1, 3):
            return None, f"{layer.name}: concatenation along axis {config['axis']}"
        return Step("concat", **base), ""
    if kind == "CustomScaleLayer":  # Keras' InceptionResNetV2: inputs[0] + inputs[1] * scale
        return Step("scale_add", scale=float(config["scale"]), **base), ""
    if kind == "BatchNormalization":
        if layer.axis not in (-1, 3):
            return None, f"{layer.name}: batch norm over axis {layer.axis}"
        scale = (as_np(layer.gamma) if layer.scale else 1.0) / np.sqrt(as_np(layer.moving_variance) + layer.epsilon)
        shift = (as_np(layer.beta) if layer.center else 0.0) - as_np(layer.moving_mean) * scale
        return Step("affine", weights=(np.asarray(scale, np.float32), np.asarray(shift, np.float32)), **base), ""
    return Step("identity", **base), ""  # FoldedBatchNorm


def bucket_exact(plan: Plan | None) -> bool:
    """Whether views padded bottom/right compute exactly as alone: every strided step 'valid'
    (its valid outputs never read the padding), every 'same' step of stride 1 (masked)."""
    if plan is None:
        return False
    for step in plan.steps:
        if not step.spatial:
            continue
        if step.padding == "same" and step.stride != (1, 1):
            return False
        if step.padding not in ("same", "valid"):
            return False
    return True


def bucket_of(height: int, width: int, step: int = BUCKET_STEP) -> tuple[int, int]:
    """The padded size a view of ``height`` x ``width`` is computed at."""
    return (-(-height // step) * step, -(-width // step) * step)


def area_matrix(length: int, size: int, padded: int) -> np.ndarray:
    """(size, padded) float32: row i averages the cells of [0, length) that output cell i covers
    (:func:`mlsp.backbone.pooling.area_weights`), zero beyond ``length``."""
    scale = length / size
    lo = np.arange(size, dtype=np.float64)[:, None] * scale
    j = np.arange(padded, dtype=np.float64)[None, :]
    overlap = np.maximum(np.minimum(lo + scale, j + 1.0) - np.maximum(lo, j), 0.0)
    overlap[:, length:] = 0.0
    return (overlap / scale).astype(np.float32)


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after) of one axis: the extra one goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------------------------
# Running a plan with PyTorch
# --------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


class NativeNet:
    """A :class:`Plan` on PyTorch: ``net(views)`` maps a (V, h, w, 3) uint8 batch of one size to
    the pooled float32 features, :meth:`run_mixed` a list of views of any sizes (bucketed)."""

    def __init__(self, plan: Plan, *, preprocessing, grid: int, precision: str = "float32", device=None,
                 autotune: bool = False):
        from ..runtime import backend

        torch = _torch()
        backend.exact_float32()
        # cuDNN's autotuning pays only for a bounded set of input shapes: the size buckets
        torch.backends.cudnn.benchmark = bool(autotune)
        self.plan, self.grid = plan, int(grid)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, COMPUTE_DTYPES[precision])
        as_tensor = (lambda a: torch.as_tensor(np.asarray(a, np.float32), device=self.device))
        self.scale = as_tensor(np.broadcast_to(preprocessing.scale, (3,))).view(1, 3, 1, 1)
        self.offset = as_tensor(np.broadcast_to(preprocessing.offset, (3,))).view(1, 3, 1, 1)
        self.params = {}
        for step in plan.steps:
            if step.kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw), channels-last, cast once
                kernel = as_tensor(step.weights[0]).permute(3, 2, 0, 1).contiguous()
                kernel = kernel.to(self.dtype).contiguous(memory_format=torch.channels_last)
                bias = None if step.weights[1] is None else as_tensor(step.weights[1]).to(self.dtype)
                self.params[step.output] = (kernel, bias)
            elif step.kind == "affine":
                self.params[step.output] = tuple(as_tensor(w).to(self.dtype).view(1, -1, 1, 1) for w in step.weights)
        last_use = {}
        for k, step in enumerate(plan.steps):
            for i in step.inputs:
                last_use[i] = k
        self._free_after = {}
        for i, k in last_use.items():
            if i not in plan.taps:
                self._free_after.setdefault(k, []).append(i)
        self.on_cuda = self.device.type == "cuda"
        self._staging = None  # the pinned upload buffer (CUDA)
        self._in_place = _exclusive_activations(plan)

    # ---- inputs and outputs

    def _host_batch(self, shape: tuple) -> np.ndarray:
        """A uint8 numpy array of ``shape`` to fill with views: on CUDA, a view of one pinned buffer
        kept for the next calls (a new pinned allocation per call costs more than the copy;
        the previous call's upload is over, :meth:`_download` waited for the stream)."""
        torch = _torch()
        if not self.on_cuda:
            return np.empty(shape, np.uint8)
        need = int(np.prod(shape))
        if self._staging is None or self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=torch.uint8, pin_memory=True)
        return self._staging[:need].numpy().reshape(shape)

    def _upload(self, batch: np.ndarray):
        """(B, H, W, 3) uint8 numpy (from :meth:`_host_batch`, or any) -> preprocessed (B, 3, H, W)
        channels-last on the device, one asynchronous copy."""
        torch = _torch()
        host = torch.from_numpy(batch)
        x = host.to(self.device, non_blocking=self.on_cuda).permute(0, 3, 1, 2).to(torch.float32)
        x = (x * self.scale + self.offset).contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    def _download(self, pooled) -> np.ndarray:
        torch = _torch()
        if not self.on_cuda:
            return pooled.numpy()
        host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()  # its own pinned memory: the features only, small

    def __call__(self, views: np.ndarray) -> np.ndarray:
        """Features of a (V, h, w, 3) uint8 batch of one size: (V, C) or (V, g, g, C) float32."""
        torch = _torch()
        batch = self._host_batch(views.shape)
        batch[...] = views
        with torch.inference_mode():
            x = self._upload(batch)
            sizes = [tuple(views.shape[1:3])] * len(views)
            return self._download(self._forward(x, sizes, masked=False))

    def run_mixed(self, views: list) -> np.ndarray:
        """Features of views of any sizes (a list of (h, w, 3) or (n, h, w, 3) uint8 arrays, or
        both): padded bottom/right to their common bucket, each pooled over its own extent. Exact
        only for a bucket-exact plan (the caller's to know)."""
        torch = _torch()
        arrays = [v[None] if v.ndim == 3 else v for v in views]
        sizes = [tuple(a.shape[1:3]) for a in arrays for _ in range(len(a))]
        height = max(bucket_of(*s)[0] for s in sizes)
        width = max(bucket_of(*s)[1] for s in sizes)
        batch = self._host_batch((len(sizes), height, width, 3))
        row = 0
        for a in arrays:  # each view at the top left of its bucket, zeros around it (read only by outputs outside it)
            batch[row:row + len(a), :a.shape[1], :a.shape[2]] = a
            batch[row:row + len(a), a.shape[1]:] = 0
            batch[row:row + len(a), :a.shape[1], a.shape[2]:] = 0
            row += len(a)
        with torch.inference_mode():
            return self._download(self._forward(self._upload(batch), sizes, masked=True))

    # ---- the forward

    def _forward(self, x, sizes: list, masked: bool):
        """Run the plan; ``sizes``: each view's valid (h, w) in the input. Returns the pooled taps."""
        torch = _torch()
        values, extents, pooled = {0: x}, {0: tuple(sizes)}, {}
        masks: dict = {}
        for k, step in enumerate(self.plan.steps):
            ins = [values[i] for i in step.inputs]
            ext = extents[step.inputs[0]]
            if masked and step.masks_input:
                mask, outside = self._mask(masks, ext, ins[0].shape[2:])
                fill = float("-inf") if step.kind == "maxpool" else 0.0
                ins = [t.masked_fill(outside, fill) for t in ins]
            else:
                mask = None
            values[step.output] = self._run(step, ins, mask)
            extents[step.output] = tuple(self.plan.out_size(step, s) for s in ext)
            if step.output in self.plan.taps:
                pooled[step.output] = self._pool(values[step.output], extents[step.output], masks)
            for i in self._free_after.get(k, ()):
                values.pop(i, None)
        return torch.cat([pooled[t] for t in self.plan.taps], dim=-1)

    def _mask(self, cache: dict, extents: tuple, shape) -> tuple:
        """(inside, outside): (B, 1, H, W) bool, True inside (outside) each view's valid extent,
        cached per extents and shape."""
        torch = _torch()
        key = (extents, tuple(shape))
        if key not in cache:
            rows = torch.arange(shape[0], device=self.device)
            cols = torch.arange(shape[1], device=self.device)
            h = torch.tensor([e[0] for e in extents], device=self.device)
            w = torch.tensor([e[1] for e in extents], device=self.device)
            inside = ((rows[None, :, None] < h[:, None, None]) & (cols[None, None, :] < w[:, None, None]))[:, None]
            cache[key] = (inside, ~inside)
        return cache[key]

    def _pool(self, x, extents: tuple, cache: dict):
        """Narrow (B, C) or wide (B, g, g, C) float32 pooling of a tap over each view's extent."""
        torch = _torch()
        b, c, height, width = x.shape
        key = ("pool", extents, height, width)
        if key not in cache:
            rows = np.stack([area_matrix(e[0], self.grid, height) for e in extents])  # (B, g, H)
            cols = np.stack([area_matrix(e[1], self.grid, width) for e in extents])  # (B, g, W)
            cache[key] = (torch.from_numpy(rows).to(self.device), torch.from_numpy(cols).to(self.device))
        rows, cols = cache[key]
        nhwc = x.permute(0, 2, 3, 1).to(torch.float32)  # channels-last memory: a view, no copy
        y = torch.matmul(rows, nhwc.reshape(b, height, width * c)).reshape(b, self.grid, width, c)
        z = torch.matmul(cols[:, None], y)  # (B, g, g, C)
        return z.reshape(b, c) if self.grid == 1 else z

    def _run(self, step: Step, ins: list, mask):
        F = _torch().nn.functional
        if step.kind == "conv":
            kernel, bias = self.params[step.output]
            x = ins[0]
            if step.padding == "same" and max(step.kernel) > 1:
                x = F.pad(x, self._pads(step, x.shape[2:]))
            return _activate(F.conv2d(x, kernel, bias, stride=step.stride), step.activation)
        if step.kind == "act":
            return _activate(ins[0], step.activation, in_place=step.output in self._in_place)
        if step.kind == "concat":
            return _torch().cat(ins, dim=1)
        if step.kind == "scale_add":
            return ins[0] + ins[1] * step.scale
        if step.kind == "affine":
            scale, shift = self.params[step.output]
            return ins[0] * scale + shift
        if step.kind == "maxpool":
            x = ins[0]
            if step.padding == "same":
                x = F.pad(x, self._pads(step, x.shape[2:]), value=float("-inf"))
            return F.max_pool2d(x, step.kernel, step.stride)
        if step.kind == "avgpool":
            return self._avgpool(step, ins[0], mask)
        return ins[0]  # identity (a folded batch norm)

    def _pads(self, step: Step, shape) -> tuple:
        (top, bottom), (left, right) = (same_pads(n, k, s) for n, k, s in zip(shape, step.kernel, step.stride))
        return (left, right, top, bottom)

    def _avgpool(self, step: Step, x, mask):
        """Keras' average pool: 'same' padding is not counted (TensorFlow's), and in a bucket
        neither is the region outside each view: avgpool(x*m) / avgpool(m)."""
        torch = _torch()
        F = torch.nn.functional
        if step.padding != "same":
            return F.avg_pool2d(x, step.kernel, step.stride)
        pads = self._pads(step, x.shape[2:])
        if mask is None and all(k % 2 for k in step.kernel) and step.stride == (1, 1):
            return F.avg_pool2d(x, step.kernel, 1, padding=(step.kernel[0] // 2, step.kernel[1] // 2),
                                count_include_pad=False)
        m = (mask if mask is not None else torch.ones((1, 1, *x.shape[2:]), dtype=torch.bool, device=x.device))
        counts = F.avg_pool2d(F.pad(m.to(x.dtype), pads), step.kernel, step.stride)
        sums = F.avg_pool2d(F.pad(x, pads), step.kernel, step.stride)
        return sums / counts.clamp_min(1.0 / (step.kernel[0] * step.kernel[1] * 2))


def _exclusive_activations(plan: Plan) -> set:
    """The activation steps that may overwrite their input: it is read by nothing else (through
    the identities, which share their input's tensor) and is no tap."""
    root, readers = {}, {}
    for step in plan.steps:
        if step.kind == "identity":
            root[step.output] = root.get(step.inputs[0], step.inputs[0])
            continue
        for i in step.inputs:
            readers[root.get(i, i)] = readers.get(root.get(i, i), 0) + 1
    taps = {root.get(t, t) for t in plan.taps}
    exclusive = set()
    for step in plan.steps:
        if step.kind == "act":
            source = root.get(step.inputs[0], step.inputs[0])
            if readers[source] == 1 and source not in taps and source != 0:
                exclusive.add(step.output)
    return exclusive


def _activate(x, activation: str, in_place: bool = True):
    """``activation`` of ``x``, in place where allowed (a convolution's fresh output always is)."""
    torch = _torch()
    if activation == "linear":
        return x
    functions = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                 "silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu}
    if not in_place:
        return functions[activation](x)
    return {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_}.get(
        activation, lambda t: torch.nn.functional.silu(t, inplace=True))(x)
