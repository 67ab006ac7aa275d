"""Personal taste: a run's head adapted to one person from 10 or 100 of their ratings.

- :mod:`.ratings`: ratings per person (FLICKR-AES's file or ``user,image,score``), matched to a store;
- :mod:`.generic`: what the generic head sees of an image (prediction, last hidden layer, tail);
- :mod:`.features`: the store's features as taste sees them (pooled, standardised, in the
  store's principal components: the basis, shared by a run's personal models, bound by hash);
- :mod:`.methods`: the registry of adaptation methods (the generic prediction on the person's
  scale, ridge residual, residual in the space of shared taste, fine-tuned last layers, and the
  residual and taste on the store's features);
- :mod:`.adapt`: the person's scale, the choice of method by cross-validation, the model's files;
- :mod:`.people`: ``mlsp personalize`` for one person and scoring for several;
- :mod:`.protocol`: the literature's evaluation protocol (k adaptation images, repeats, SRCC gain).

Stored features make this cheap: a person with 100 ratings is adapted in seconds on a CPU.
"""

import importlib

from .adapt import AUTO, PersonalModel, load_personal, method_names
from .methods import METHODS, MethodSpec
from .protocol import evaluate
from .ratings import RATING_SCALE, read_ratings

# what imports Keras (the generic head) is loaded on first use, so `mlsp --help` stays light
_LAZY = {"PersonalScorer": "heads.personal.people", "personalize": "heads.personal.people",
         "read_rated": "heads.personal.people", "GenericHead": "heads.personal.generic"}

__all__ = ["AUTO", "METHODS", "MethodSpec", "PersonalModel", "RATING_SCALE", "evaluate", "load_personal",
           "method_names", "read_ratings", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'heads.personal' has no attribute {name!r}")
