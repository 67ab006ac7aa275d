"""mlsp: image aesthetics from Multi-Level Spatially Pooled features (Hosu et al., CVPR 2019).

Stage 1 (images -> features) and the feature store, in subpackages whose names say the stage
(docs/architecture.md): :mod:`mlsp.runtime` (backends, precision, files, progress, downloads),
:mod:`mlsp.images`, :mod:`mlsp.store`, :mod:`mlsp.backbone` and :mod:`mlsp.extraction`. Stage 2
(the :mod:`heads` package: features -> MOS) is built on it; :mod:`mlsp.api`, the facade the CLI
calls, is the one module here that reaches up into it.

What ``import mlsp`` does to the process, and nothing else:

- a ``logging.NullHandler`` on the ``mlsp`` logger (the library logs; applications configure);
- mlsp's Keras layers are registered the moment Keras is imported (at once if it already is,
  without importing it otherwise; a post-import hook through ``wrapt``), so that every model mlsp
  saves loads with ``keras.saving.load_model(path, safe_mode=True)``. ``MLSP_KERAS_HOOK=0`` turns
  the hook off (then ``import mlsp.backbone.layers, mlsp.backbone.pooling`` registers them).

Process-wide switches are the application's: the ``mlsp`` command asks TensorFlow for oneDNN's
convolutions on AVX2 CPUs and keeps TensorFlow out of a PyTorch process
(:func:`mlsp.runtime.backend.prepare_process`); a program using the library calls that function
itself, before it imports TensorFlow, if it wants the same.
"""

import logging
import os

import wrapt

from .version import __version__  # noqa: F401

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Set to 0 to keep ``import mlsp`` from registering its Keras layers when Keras loads.
KERAS_HOOK_ENV = "MLSP_KERAS_HOOK"


def _register_layers(keras_module):
    from .backbone import layers, pooling  # noqa: F401  (their classes register themselves)


if os.environ.get(KERAS_HOOK_ENV, "1") != "0":
    wrapt.register_post_import_hook(_register_layers, "keras")
