"""Finding, decoding and cropping images: everything between a file and a batch of views.

Decoding is OpenCV's. Every image becomes 8-bit RGB: EXIF orientation applied, grayscale
replicated to three channels, 16-bit and float images scaled to 8 bits, alpha composited over
white (photos with transparency are rare; a white background is what a person sees in a
viewer). An image whose longer side exceeds ``max_side`` is resized down to it with INTER_AREA
before cropping, which bounds memory and time on large phone and camera photos; AVA's images
(at most 800 px) are never resized by the default. Every problem raises
:class:`~mlsp.errors.ImageDecodeError` with a short reason, which extraction records.
"""

from __future__ import annotations

import logging
import math
import os

import cv2
import numpy as np

from .errors import ConfigError, ImageDecodeError

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIEW_NAMES = ("tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip")
FULL_VIEW = "full"
CROP_FRACTION = 0.875
_ALPHA_FORMATS = (".png", ".webp", ".tif", ".tiff")

try:  # OpenCV's own messages (libjpeg warnings and the like) would clutter the console
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:  # pragma: no cover - very old OpenCV
    pass


def list_images(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """All image files under ``root`` (recursively, sorted), and the other files with a reason.

    Hidden files and folders (starting with '.') are skipped silently; every other file with an
    extension outside :data:`EXTENSIONS` is returned as ``(path, reason)`` so a run can list it.
    """
    if not os.path.isdir(root):
        raise ConfigError(f"--images {root!r}: not a folder")
    images, others = [], []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            ext = os.path.splitext(name)[1].lower()
            if ext in EXTENSIONS:
                images.append(path)
            else:
                others.append((path, f"not an image file type ({ext or 'no extension'}); accepted: "
                               + " ".join(EXTENSIONS)))
    images.sort()
    others.sort()
    return images, others


def image_ids(paths: list[str], root: str | None = None) -> list[str]:
    """Ids for image files: the path relative to ``root`` without extension, '/'-separated.

    For files given one by one, ``root`` is their common folder. Two files that differ only in
    extension (``a.jpg``, ``a.png``) keep their extensions in the id, so ids stay unique.
    """
    if not paths:
        return []
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(root)).replace(os.sep, "/") for p in paths]
    ids = [os.path.splitext(r)[0] for r in rel]
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return [r if counts[i] > 1 else i for i, r in zip(ids, rel)]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(img) * scale, 0, 255).round().astype(np.uint8)
    info = np.iinfo(img.dtype)
    return ((img.astype(np.float64) - info.min) / (info.max - info.min) * 255).round().astype(np.uint8)


def _composite_alpha(img: np.ndarray) -> np.ndarray:
    """(H, W, 4) or (H, W, 2) with alpha -> RGB/gray over white, 8-bit."""
    img = _to_uint8(img)
    colour, alpha = img[..., :-1].astype(np.float32), img[..., -1:].astype(np.float32) / 255.0
    out = colour * alpha + 255.0 * (1.0 - alpha)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def _jpeg_is_complete(data: np.ndarray) -> bool:
    """A JPEG whose last scan is not followed by an end-of-image marker was cut short.

    (OpenCV 4 decodes such files into a partly grey picture with only a warning.)
    """
    raw = data.tobytes()
    last_scan = raw.rfind(b"\xff\xda")
    return last_scan >= 0 and raw.rfind(b"\xff\xd9") > last_scan


def decode_image(path: str, max_side: int = 0) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 RGB; raise ImageDecodeError with the reason."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(path, f"unreadable: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    ext = os.path.splitext(path)[1].lower()
    is_jpeg = data.size > 3 and data[0] == 0xFF and data[1] == 0xD8
    if is_jpeg and not _jpeg_is_complete(data):
        raise ImageDecodeError(path, "truncated JPEG (no end-of-image marker after the last scan)")
    img = None
    try:
        if ext in _ALPHA_FORMATS:
            raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            if raw is not None and raw.ndim == 3 and raw.shape[2] in (2, 4):
                img = _composite_alpha(raw[..., [2, 1, 0, 3]] if raw.shape[2] == 4 else raw)
        if img is None:
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
            if bgr is not None:
                img = cv2.cvtColor(_to_uint8(bgr), cv2.COLOR_BGR2RGB)
    except cv2.error as exc:
        raise ImageDecodeError(path, f"cannot decode: {str(exc).strip().splitlines()[-1]}") from exc
    if img is None:
        raise ImageDecodeError(path, "cannot decode: not an image, or a corrupt or unsupported file")
    if max_side and max(img.shape[:2]) > max_side:
        h, w = img.shape[:2]
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def crop_size(height: int, width: int, fraction: float = CROP_FRACTION) -> tuple[int, int]:
    return int(math.floor(fraction * height)), int(math.floor(fraction * width))


def make_views(img: np.ndarray, augment: bool = True, fraction: float = CROP_FRACTION) -> np.ndarray:
    """The stored views of one image, as one (V, h, w, 3) batch in :data:`VIEW_NAMES` order.

    With ``augment``: the four corner crops of floor(fraction*H) x floor(fraction*W), each as is
    and mirrored left-right. Without: the whole image, one view.
    """
    if not augment:
        return img[None]
    h, w = img.shape[:2]
    ch, cw = crop_size(h, w, fraction)
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    views = np.empty((8, ch, cw, 3), dtype=img.dtype)
    for k, (y, x) in enumerate(corners):
        crop = img[y : y + ch, x : x + cw]
        views[2 * k] = crop
        views[2 * k + 1] = crop[:, ::-1]
    return views


def view_names(augment: bool) -> list[str]:
    return list(VIEW_NAMES) if augment else [FULL_VIEW]


def check_size(path: str, img: np.ndarray, augment: bool, min_side: int, net: str):
    """Images too small for the backbone are skipped (not upscaled: upscaling would invent
    detail and put the features on another scale than the rest of the data)."""
    h, w = img.shape[:2]
    vh, vw = crop_size(h, w) if augment else (h, w)
    if min(vh, vw) < min_side:
        what = f"crops of {vh}x{vw}" if augment else "the image"
        raise ImageDecodeError(
            path, f"too small: {h}x{w} px, {what} below the {min_side} px per side that {net} needs"
        )
