"""mlsp: image aesthetics from Multi-Level Spatially Pooled features (Hosu et al., CVPR 2019).

Stage 1 (this package): images -> features in an HDF5 store (:mod:`mlsp.extract`,
:mod:`mlsp.store`). Stage 2 (the :mod:`heads` package): features -> MOS.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
