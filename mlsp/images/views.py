"""Test-time view procedures: which views of an image a pretrained head averages its prediction over.

A store's own views (:data:`mlsp.images.decode.VIEW_NAMES`: 4 corner crops and their mirror images, or
the whole image) are what mlsp trains on. The authors' released models were tested their own
way (subpic/ava-mlsp): the whole image, one view; or, for the model trained on crop/flip views,
18 views (crops of 87.5% of each side centred at 0, 0.5 and 1 of the height and of the width,
each as it is and mirrored). Each procedure is one :class:`ViewProcedure` entry of
:data:`VIEW_PROCEDURES`, used alike by scoring image files and by the exported model
(:class:`mlsp.backbone.layers.PositionCrops`).

Where a crop goes (kutils ``extract_patch``, run by the authors under Python 2): its top-left
corner is ``int(size * position - crop // 2)``, clipped to ``[0, size - crop]``; the crop's side
is ``floor(0.875 * size)``. So position 0 is the first row or column, 1 the last crop that fits,
and 0.5 the centre rounded as that code rounded it (:func:`crop_origin`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from ..errors import ImageDecodeError
from .decode import CROP_FRACTION, FULL_VIEW, crop_size
from ..registry import Registry


@dataclasses.dataclass(frozen=True)
class ViewProcedure:
    """Views of one image: crops of ``fraction`` of each side at ``positions`` ((y, x), each a
    fraction of the image's height and width), each in the orientations ``flips`` (False: as it
    is, True: mirrored left-right), positions outer, flips inner. ``store_views``: the views of
    a store that hold exactly these (``None``: no store does; such a model scores image files)."""

    name: str
    description: str
    fraction: float = 1.0
    positions: tuple = ((0.0, 0.0),)
    flips: tuple = (False,)
    store_views: tuple | None = None

    @property
    def n_views(self) -> int:
        return len(self.positions) * len(self.flips)

    def view_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width) if self.fraction >= 1 else crop_size(height, width, self.fraction)

    def make(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) -> (n_views, h, w, 3), in this procedure's order."""
        h, w = img.shape[:2]
        ch, cw = self.view_size(h, w)
        views = np.empty((self.n_views, ch, cw, img.shape[2]), dtype=img.dtype)
        for k, ((py, px), flip) in enumerate(itertools.product(self.positions, self.flips)):
            y, x = crop_origin(h, ch, py), crop_origin(w, cw, px)
            crop = img[y:y + ch, x:x + cw]
            views[k] = crop[:, ::-1] if flip else crop
        return views

    def check_size(self, path: str, img: np.ndarray, min_side: int, net: str):
        """Images whose views are smaller than the backbone's least side are refused (never upscaled)."""
        h, w = img.shape[:2]
        vh, vw = self.view_size(h, w)
        if min(vh, vw) < min_side:
            what = "the image" if self.fraction >= 1 else f"crops of {vh}x{vw}"
            raise ImageDecodeError(path, f"too small: {h}x{w} px, {what} below the {min_side} px per side "
                                         f"that {net} needs")


def crop_origin(size: int, crop: int, position: float) -> int:
    """The first row (or column) of a crop of ``crop`` px centred at ``position`` (0..1) of ``size``."""
    return min(max(math.floor(size * position - crop // 2), 0), size - crop)


VIEW_PROCEDURES: Registry[ViewProcedure] = Registry("view procedure")

VIEW_PROCEDURES.register(ViewProcedure(
    name="full",
    description="the whole image at its own size, one view",
    store_views=(FULL_VIEW,),
))
VIEW_PROCEDURES.register(ViewProcedure(
    name="crops18",
    description=f"18 views: crops of {CROP_FRACTION:.1%} of each side centred at 0, 0.5 and 1 of the height "
                "and of the width, each as it is and mirrored; their predictions averaged",
    fraction=CROP_FRACTION,
    positions=tuple(itertools.product((0.0, 0.5, 1.0), (0.0, 0.5, 1.0))),
    flips=(False, True),
))


def get_procedure(name: str) -> ViewProcedure:
    return VIEW_PROCEDURES.get(name)
