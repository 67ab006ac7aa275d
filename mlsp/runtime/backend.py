"""Everything in mlsp that is specific to one Keras backend, in one place.

The models are plain Keras (``keras.applications`` backbones, the registered
:class:`~mlsp.backbone.pooling.MultiLevelPooling` layer, the heads) and run unchanged on TensorFlow or
PyTorch. What differs per backend is only:

- the compiled inference forward of the extractor (:func:`compile_forward`): TensorFlow traces
  one ``tf.function`` with a fully dynamic input shape; PyTorch runs eagerly under
  ``torch.inference_mode`` (no autograd), with Keras' channels-last convolutions and cuDNN
  autotuning off, so a new image size costs no tuning run and one model serves every size;
- device, version and thread queries (:func:`describe`, :func:`devices`,
  :func:`configure_threads`), and whether the accelerator computes bfloat16 natively
  (:func:`gpu_bfloat16`);
- TensorFlow's op determinism for training (:func:`deterministic_ops`);
- resizing to a size known only when the model runs (:func:`resize_area`, the exported model's
  ``max_side``): ``keras.ops.image.resize`` takes only sizes known when the graph is built;
- TensorFlow's oneDNN convolutions on every x86 CPU (:func:`prefer_onednn`).

The backend is chosen the Keras way: ``KERAS_BACKEND`` (or ``~/.keras/keras.json``), read
when Keras is first imported; :func:`select` sets it before that. The PyTorch route never
imports TensorFlow (both in one process crash), so nothing here imports a backend's package
other than the one Keras runs on, and on PyTorch :func:`keep_tensorflow_out` stops Keras itself
from importing TensorFlow where it is installed (``keras.utils.set_random_seed``, saving and data
adapters look for it). JAX compiles once per input shape, a compile for every
distinct image size: extraction refuses it (:func:`check_extraction`).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from typing import Callable

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "torch")  # the backends mlsp extracts with (also the CLI's --backend choices)
_JAX_REFUSAL = ("the JAX backend compiles the backbone once per input shape, i.e. once for every distinct image "
                "size (AVA has over 25,000), and padding to shape buckets would change the features; "
                "extract with KERAS_BACKEND=tensorflow or torch")


def select(name: str | None) -> str:
    """Make ``name`` Keras' backend for this process (sets ``KERAS_BACKEND``); must come before
    Keras is imported. ``None`` keeps what ``KERAS_BACKEND`` / ``keras.json`` say. Returns the
    requested name (or ``""`` for ``None``)."""
    if not name:
        return ""
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, received {name!r}")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != name:
            raise ConfigError(f"Keras is already running on {current}; the backend ({name}) must be chosen before "
                              "Keras is imported (set KERAS_BACKEND in the environment)")
        return name
    os.environ["KERAS_BACKEND"] = name
    if name == "torch":
        keep_tensorflow_out()
    return name


ONEDNN_SWITCH = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> bool:
    """Ask TensorFlow for oneDNN's convolutions unless the user chose (``TF_ENABLE_ONEDNN_OPTS``).

    TensorFlow turns its oneDNN graph rewrite on by itself only on CPUs with AVX-512 VNNI/BF16,
    AVX-VNNI or AMX; on an AVX2-only CPU every convolution then runs as Eigen's im2col with
    thousands of small matrix products per forward (bench/FINDINGS.md, "AVX2"), and its float32
    matmul runs at half oneDNN's rate. The variable is read once, when TensorFlow starts, so this
    must run before anything imports it (the CLI does it, :func:`prepare_process`); it changes nothing where
    TensorFlow already defaults to oneDNN. Features agree to float32 rounding either way (tested).
    Returns whether the variable was set here."""
    if ONEDNN_SWITCH in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ[ONEDNN_SWITCH] = "1"
    return True


class _TensorFlowKeptOut(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import tensorflow`` fail with ImportError, as if it were not installed; finders
    that only ask whether it exists (``importlib.util.find_spec``) get a spec without origin."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "tensorflow":
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is kept out of this process: Keras runs on PyTorch here, and TensorFlow "
                          "next to PyTorch in one process crashes", name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise ImportError(module.__name__)


def keep_tensorflow_out():
    """From now on this process never imports TensorFlow (the PyTorch route). Keras looks for an
    installed TensorFlow in several places even on PyTorch (and ``set_random_seed`` imports it);
    with both in one process PyTorch crashes (exit 139). Warns when it is already too late."""
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow is already imported next to PyTorch; this process may crash")
        return
    if not any(isinstance(finder, _TensorFlowKeptOut) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowKeptOut())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual, and runs its import with the process's stderr (file
    descriptor 2) sent to /dev/null: TensorFlow's C++ start-up lines (absl's "All log messages
    before absl::InitializeLog()" and oneDNN's notice) ignore ``TF_CPP_MIN_LOG_LEVEL``. Python
    errors of the import still reach the caller as exceptions."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: TensorFlow's own submodules import normally
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                with _stderr_fd_to_devnull():
                    run(module)

            spec.loader.exec_module = exec_module
        return spec


@contextlib.contextmanager
def _stderr_fd_to_devnull():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def prepare_process():
    """What the ``mlsp`` command does to its process before anything imports a backend, and a
    program using the library may do too: oneDNN's convolutions on AVX2 CPUs
    (:func:`prefer_onednn`), and on ``KERAS_BACKEND=torch`` TensorFlow kept out of the process
    (:func:`keep_tensorflow_out`). ``import mlsp`` itself does neither."""
    prefer_onednn()
    if os.environ.get("KERAS_BACKEND") == "torch":
        keep_tensorflow_out()


def quiet_tensorflow_start():
    """Keep TensorFlow's start-up lines off the console (the CLI without -v): installed before
    anything imports TensorFlow, it costs nothing where TensorFlow is never imported."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def name() -> str:
    """The backend Keras runs on (imports Keras; on PyTorch, keeps TensorFlow out from then on)."""
    import keras

    current = keras.backend.backend()
    if current == "torch":
        keep_tensorflow_out()
    return current


def set_random_seed(seed: int):
    """``keras.utils.set_random_seed`` (Python, NumPy, Keras and the backend), without it pulling
    TensorFlow into a PyTorch process."""
    import keras

    name()
    keras.utils.set_random_seed(int(seed))


def loss_and_gradients(loss_fn: Callable, variables) -> tuple:
    """``loss_fn()`` (a scalar tensor computed from Keras ``variables``) and its gradients with
    respect to them, on the active backend; inside :func:`compile_step` or eagerly."""
    if name() == "torch":
        import torch

        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [v.value for v in variables])
        return loss.detach(), list(grads)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn()
    return loss, tape.gradient(loss, [v.value for v in variables])


def compile_step(fn: Callable) -> Callable:
    """A small training step compiled once for any batch size: a ``tf.function`` on TensorFlow
    (an eager step of a tiny model costs far more than its arithmetic); as it is on PyTorch."""
    if name() == "torch":
        return fn
    import tensorflow as tf

    return tf.function(fn, reduce_retracing=True)


def check_extraction():
    """Raise :class:`ConfigError` where the backend cannot run the extractor on images of many sizes."""
    current = name()
    if current == "jax":
        raise ConfigError(f"extraction on JAX is not supported: {_JAX_REFUSAL}")
    if current not in BACKENDS:
        raise ConfigError(f"extraction needs KERAS_BACKEND tensorflow or torch, Keras runs on {current}")


# --------------------------------------------------------------------------------------------
# Devices and versions
# --------------------------------------------------------------------------------------------


def _torch_device():
    """The device Keras' torch backend puts its variables on by default: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def devices() -> list[str]:
    """The compute devices the backend sees, accelerators first (e.g. ``cuda:0 NVIDIA H100``)."""
    current = name()
    if current == "torch":
        import torch

        found = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        return found + ["cpu"]
    if current == "tensorflow":
        import tensorflow as tf

        found = []
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            found.append(f"{gpu.name} {details.get('device_name', '')}".strip())
        return found + ["cpu"]
    return ["cpu"]


def describe() -> dict:
    """``{"backend", "backend_version", "device"}``: recorded in stores and run configs as provenance.
    ``device`` is where the model runs (the first GPU, or ``cpu``)."""
    current = name()
    version = ""
    if current == "torch":
        import torch

        version = torch.__version__
    elif current == "tensorflow":
        import tensorflow as tf

        version = tf.__version__
    elif current == "jax":
        import jax

        version = jax.__version__
    return {"backend": current, "backend_version": str(version), "device": devices()[0]}


def gpu_bfloat16() -> tuple[bool, str] | None:
    """For the first GPU: (computes bfloat16 natively, why); ``None`` without a GPU. Native means
    compute capability 8.0 (Ampere) or newer."""
    current = name()
    if current == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        gpu, capability = torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    elif current == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        details = tf.config.experimental.get_device_details(gpus[0])
        gpu, capability = details.get("device_name", gpus[0].name), tuple(details.get("compute_capability") or (0, 0))
    else:
        return None
    if capability >= (8, 0):
        return True, f"GPU {gpu} (compute capability {capability}) computes bfloat16 natively"
    return False, f"GPU {gpu} (compute capability {capability}) has no native bfloat16"


def configure_threads(intra: int | None = None, inter: int | None = None) -> tuple[int, int]:
    """The backend's CPU thread pools: ``intra`` threads inside one op (a convolution), ``inter``
    ops side by side; ``None`` or 0 keeps the default (the number of cores). Returns the values in
    force. Measured on 2 cores with TensorFlow (Inception-v3, 8 views of 434x550): default 0.46 s,
    intra 2 / inter 1 0.47 s, 2 / 2 0.47 s, 1 / 2 0.66 s: what counts is that one convolution
    uses every core. Must be called before the backend runs its first op."""
    if name() == "torch":
        import torch

        try:
            if intra:
                torch.set_num_threads(int(intra))
            if inter:
                torch.set_num_interop_threads(int(inter))
        except RuntimeError as exc:
            raise ConfigError(f"thread settings must come before PyTorch starts: {exc}") from exc
        return torch.get_num_threads(), torch.get_num_interop_threads()
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    except RuntimeError as exc:
        raise ConfigError(f"thread settings must come before TensorFlow starts: {exc}") from exc
    return (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())


# --------------------------------------------------------------------------------------------
# The compiled inference forward
# --------------------------------------------------------------------------------------------


class Forward:
    """``forward(batch)``: a (B, h, w, 3) uint8 numpy batch of any size -> the model's output
    as float32 numpy, preprocessed by ``preprocess`` (a function of float32 tensors)."""

    def __init__(self, fn: Callable, traces: Callable[[], int], compiled=None):
        self._fn = fn
        self._traces = traces
        self.compiled = compiled  # the backend's own compiled function (TensorFlow: the tf.function)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._fn(np.ascontiguousarray(batch, dtype=np.uint8))

    @property
    def tracing_count(self) -> int:
        """Graphs traced so far (TensorFlow: stays 1 whatever the input sizes; PyTorch: 0, eager)."""
        return self._traces()


def compile_forward(model, preprocess: Callable) -> Forward:
    """The inference forward of ``model`` on the current backend, for inputs of every size."""
    check_extraction()
    if name() == "torch":
        return _torch_forward(model, preprocess)
    return _tensorflow_forward(model, preprocess)


def _tensorflow_forward(model, preprocess) -> Forward:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], reduce_retracing=True)
    def forward(batch):
        x = preprocess(tf.cast(batch, tf.float32))
        return tf.cast(model(x, training=False), tf.float32)

    return Forward(lambda batch: forward(batch).numpy(), lambda: int(forward.experimental_get_tracing_count()),
                   forward)


def _torch_forward(model, preprocess) -> Forward:
    import torch

    # cuDNN autotuning runs a benchmark for every new input shape: with thousands of image
    # sizes that is a tuning run per image. Keras' convolutions already run channels-last.
    torch.backends.cudnn.benchmark = False
    device = _torch_device()

    def forward(batch):
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device, non_blocking=True).to(torch.float32)
            y = model(preprocess(x), training=False)
            return y.to(torch.float32).cpu().numpy()

    return Forward(forward, lambda: 0)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic_ops(enabled: bool = True):
    """TensorFlow's op determinism for the duration (restored afterwards); nothing elsewhere
    (PyTorch's CPU kernels used by the heads are deterministic)."""
    if not enabled or name() != "tensorflow":
        yield
        return
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()


def resize_area(images, size):
    """(B, H, W, C) float images -> (B, h, w, C) by area averaging (OpenCV's INTER_AREA when
    shrinking); ``size`` (h, w) may be tensors computed from the input's shape."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        chw = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=[int(s) for s in size], mode="area")
        return chw.permute(0, 2, 3, 1)
    import tensorflow as tf

    return tf.image.resize(images, tf.stack(size), method="area")


# --------------------------------------------------------------------------------------------
# Gradients with respect to the input (saliency)
# --------------------------------------------------------------------------------------------


def input_gradient(fn: Callable, batch: np.ndarray) -> np.ndarray:
    """The gradient of ``sum(fn(x))`` with respect to ``x`` at ``batch`` (a float numpy array), as
    float32 numpy of the batch's shape. ``fn`` maps a float32 tensor of the backend to one value
    per sample (written in ``keras.ops``); the samples are independent (inference mode), so each
    sample's gradient is its own output's. TensorFlow: ``tf.GradientTape``; PyTorch:
    ``torch.autograd.grad`` (autograd on, unlike :func:`compile_forward`)."""
    current = name()
    if current == "torch":
        return _torch_input_gradient(fn, batch)
    if current == "tensorflow":
        return _tensorflow_input_gradient(fn, batch)
    raise ConfigError(f"input gradients need KERAS_BACKEND tensorflow or torch, Keras runs on {current}")


def _tensorflow_input_gradient(fn: Callable, batch: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(batch, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(tf.cast(fn(x), tf.float32))
    return tape.gradient(total, x).numpy()


def _torch_input_gradient(fn: Callable, batch: np.ndarray) -> np.ndarray:
    import torch

    x = torch.tensor(np.asarray(batch, np.float32), device=_torch_device(), requires_grad=True)
    with torch.enable_grad():
        total = fn(x).to(torch.float32).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad.detach().to(torch.float32).cpu().numpy()
