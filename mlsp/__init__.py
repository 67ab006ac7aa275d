"""mlsp: image aesthetics from Multi-Level Spatially Pooled features (Hosu et al., CVPR 2019).

The ground floor: stage 1 (images -> features, :mod:`mlsp.extract`) and the feature store
(:mod:`mlsp.store`). Stage 2 (the :mod:`heads` package: features -> MOS) is built on it;
:mod:`mlsp.api`, the facade the CLI calls, is the one module here that reaches up into it.

``import mlsp`` registers mlsp's Keras layers the moment Keras is imported (at once if it
already is, without importing it otherwise), so that every model mlsp saves loads with
``keras.saving.load_model(path, safe_mode=True)``.
"""

import logging
import os

import wrapt

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_layers(keras_module):
    from . import layers, pooling  # noqa: F401  (their classes register themselves)


wrapt.register_post_import_hook(_register_layers, "keras")

from .backend import prefer_onednn  # noqa: E402

prefer_onednn()  # before TensorFlow starts: oneDNN's convolutions on AVX2 CPUs too (mlsp.backend)

if os.environ.get("KERAS_BACKEND") == "torch":
    # before Keras loads: Keras on PyTorch must never import TensorFlow (mlsp.backend)
    from .backend import keep_tensorflow_out

    keep_tensorflow_out()
