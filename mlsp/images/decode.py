"""Finding, decoding and cropping images: everything between a file and a batch of views.

Finding: a folder is searched recursively; only regular files are opened (a named pipe or a
device is listed, never read), every real folder is searched once (a symlink loop such as
``ln -s . loop`` adds nothing) and every real file is used once, under its path without links
where it has one. Files that cannot be used are returned with their reason.

Decoding: JPEG, PNG, WebP, BMP and TIFF with OpenCV; HEIC/HEIF (phone photos) with pillow-heif
and AVIF with Pillow, recognised by their content rather than their name. Every image becomes
8-bit RGB: orientation applied once (EXIF, or for HEIF the container's transform, which
libheif applies and after which pillow-heif resets the EXIF tag), grayscale replicated to three
channels, 10-, 12- and 16-bit and float images scaled to 8 bits, alpha composited over white
(photos with transparency are rare; a white background is what a person sees in a viewer). An
image whose longer side exceeds ``max_side`` is resized down to it with INTER_AREA before
cropping; a JPEG at least twice that size is first decoded at 1/2, 1/4 or 1/8 of its size by
libjpeg (never below ``max_side``), which bounds memory and time on 48 MP photos. Every format
has a pixel limit (:data:`MAX_PIXELS`, checked from the header before decoding, after a JPEG's
reduction): a small file of a huge picture is listed, never decoded into gigabytes. A JPEG cut
short whose decoder would fill the rest with grey (with or without an end marker) is listed
too. Images that need no reduction decode exactly as before; AVA's images (at most 800 px) are never resized by
the default. Every problem raises :class:`~mlsp.errors.ImageDecodeError` with a short reason,
which extraction records.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import stat

import cv2
import numpy as np

from ..errors import ConfigError, ImageDecodeError

log = logging.getLogger(__name__)

# the stored views of an image: 4 corner crops and their mirror images, or the whole image
AUGMENTED_VIEWS = ("tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip")
FULL_VIEW = "full"  # the one view without augmentation
FULL_VIEWS = (FULL_VIEW,)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif")
VIEW_NAMES = AUGMENTED_VIEWS  # the store's names of an image's 8 views
CROP_FRACTION = 0.875
# How files become pixels, recorded in every store (attribute `decoding`, part of its configuration):
# version 2 decodes a JPEG of at least twice `max_side` at 1/2, 1/4 or 1/8 size in libjpeg before the
# exact resize, orients PNG/WebP with alpha by their EXIF tag, and reads HEIC/HEIF/AVIF. Stores made
# before (no attribute) are never extended with features decoded this way.
DECODING = "mlsp-decode-2"
_ALPHA_FORMATS = (".png", ".webp", ".tif", ".tiff")
# ISO base media file brands (the 'ftyp' box) of the formats decoded through Pillow
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
# libjpeg decodes at 1/2, 1/4 and 1/8 of the size directly from the DCT coefficients
_JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

# The most pixels an image may have once decoded (after a JPEG's reduced decode): 128 MP, above
# every camera's photo (a 102 MP medium-format TIFF fits). Checked from the file's header before
# decoding, so a small file of a huge picture (a 2.6 MB PNG of 30000x30000) is listed with the
# reason instead of taking gigabytes and minutes; JPEGs are decoded reduced (below) first.
MAX_PIXELS = 1 << 27
# libjpeg's warnings that mean part of the picture is decoder fill (mid-grey), not the photo
_JPEG_FILL_WARNINGS = ("premature end",)

try:  # OpenCV's own messages (its failed-decode and TIFF lines): every problem is reported as ours
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # pragma: no cover - very old OpenCV
    pass


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a plain file"


def _identity(st: os.stat_result, path: str):
    """What makes a file or folder the same one whatever the path (no inode numbers: the path)."""
    return (st.st_dev, st.st_ino) if st.st_ino else path


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be opened as an image file (missing, unreadable, not a regular file),
    or None. Follows symlinks; never opens the file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if not os.path.lexists(path):
            return "no such file"
        return f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_file_kind(st.st_mode)})"
    return None


def list_images(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """All image files under ``root`` (recursively, sorted), and the other files with a reason.

    Hidden files and folders (starting with '.') are skipped silently. Every other file is
    returned as ``(path, reason)`` when it cannot be used: an extension outside
    :data:`EXTENSIONS`, unreadable, not a regular file (a named pipe is never opened), or a
    second path to a file already listed (a link). Symlinked folders are searched after every
    real one, each real folder once: a link to a folder already searched (a loop such as
    ``ln -s . loop``) is returned with its reason.
    """
    if not os.path.isdir(root):
        raise ConfigError(f"--images {root!r}: not a folder" if os.path.exists(root)
                          else f"--images {root!r}: no such folder")
    search = _FolderSearch(root)
    while (found := search.next_folder()) is not None:
        search.search(*found)
    return search.result()


class _FolderSearch:
    """:func:`list_images`' walk: the folders still to search (real ones first, then the
    symlinked ones), every folder searched (by identity), the image files found (by identity,
    with every path to each) and the other files with their reason."""

    def __init__(self, root: str):
        self.root = root
        self.seen_dirs = {_identity(os.stat(root), root): root}
        self.candidates: dict = {}  # identity -> [(through a link, path)]
        self.others: list[tuple[str, str]] = []
        self.folders, self.links = [(root, False)], []  # real folders first, then the symlinked ones

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def next_folder(self) -> tuple[str, bool] | None:
        """The next folder to search and whether a link led to it; None when every one is searched.
        A symlinked folder that cannot be read, or that was searched already, joins the others."""
        while self.folders or self.links:
            if self.folders:
                return self.folders.pop()
            self.links.sort()
            link = self.links.pop(0)
            try:
                ident = _identity(os.stat(link), link)
            except OSError as exc:
                self.others.append((link, f"unreadable folder: {exc.strerror or exc}"))
                continue
            if ident in self.seen_dirs:
                self.others.append((link, f"a link to a folder already searched "
                                          f"({self.rel(self.seen_dirs[ident]) or '.'}); not searched again"))
                continue
            self.seen_dirs[ident] = link
            return link, True
        return None

    def search(self, folder: str, via_link: bool):
        """Sort the entries of ``folder``: folders to search, image files, and the others."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.others.append((folder, f"unreadable folder: {exc.strerror or exc}"))
            return
        for entry in reversed(entries):  # popped from the end: searched in name order
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; False when a link points to nothing
                ident = _identity(entry.stat(), entry.path) if is_dir else None
            except OSError as exc:  # a link loop (a -> b -> a), a folder without permission
                self.others.append((entry.path, f"unreadable: {exc.strerror or exc}"))
                continue
            if is_dir:
                if entry.is_symlink():
                    self.links.append(entry.path)
                elif ident not in self.seen_dirs:
                    self.seen_dirs[ident] = entry.path
                    self.folders.append((entry.path, via_link))
            else:
                self.add_file(entry, via_link)

    def add_file(self, entry: os.DirEntry, via_link: bool):
        """An image file joins the candidates under its identity; any other file the others."""
        ext = os.path.splitext(entry.name)[1].lower()
        if ext not in EXTENSIONS:
            self.others.append((entry.path, f"not an image file type ({ext or 'no extension'}); accepted: "
                                + " ".join(EXTENSIONS)))
            return
        problem = file_problem(entry.path)
        if problem:
            self.others.append((entry.path, problem))
            return
        ident = _identity(os.stat(entry.path), entry.path)
        self.candidates.setdefault(ident, []).append((via_link or entry.is_symlink(), entry.path))

    def result(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(the images, each file once under its path without links where it has one; the others), sorted."""
        images = []
        others = list(self.others)
        for paths in self.candidates.values():
            paths.sort()
            images.append(paths[0][1])
            others.extend((p, f"the same file as {self.rel(paths[0][1])} (a link to it); used once")
                          for _, p in paths[1:])
        return sorted(images), sorted(others)


def check_files(paths) -> tuple[list[str], list[tuple[str, str]]]:
    """Files given one by one: (the usable ones, each once, in order; the others with a reason)."""
    usable, skipped, seen = [], [], {}
    for path in paths:
        problem = file_problem(path)
        if problem is None:
            ident = _identity(os.stat(path), os.path.abspath(path))
            if ident in seen:
                problem = f"the same file as {seen[ident]}; used once"
            else:
                seen[ident] = path
        if problem:
            skipped.append((path, problem))
        else:
            usable.append(path)
    return usable, skipped


def no_images_message(where: str, others: list[tuple[str, str]]) -> str:
    """The one-line error for a folder or a list of files without one usable image."""
    if not others:
        return f"{where}: no image files found (accepted: {' '.join(EXTENSIONS)})"
    path, reason = others[0]
    more = f" (and {len(others) - 1} other files)" if len(others) > 1 else ""
    return f"{where}: no usable image files; {path}: {reason}{more}"


def image_ids(paths: list[str], root: str | None = None, taken: dict | None = None) -> list[str]:
    """Ids for image files, unique by construction: the path relative to ``root`` without
    extension, '/'-separated; the path with its extension wherever that id would be shared.

    For files given one by one, ``root`` is their common folder. An id is shared when two files
    differ only in extension (``a.jpg``, ``a.png``), when one file's path is another's id
    (``a.jpg`` and ``a.jpg.png``: both keep their extensions), or when ``taken`` (id -> the
    relative path stored under it, e.g. a store's rows) holds it for another path. Where even
    the path with its extension is taken by another file, :class:`ConfigError` names both.
    """
    if not paths:
        return []
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(root)).replace(os.sep, "/") for p in paths]
    taken = dict(taken or {})
    ids = [os.path.splitext(r)[0] for r in rel]
    while True:  # each pass moves at least one file to its path, which is unique: it ends
        holders: dict[str, set] = {}
        for i, r in zip(ids, rel):
            holders.setdefault(i, set()).add(r)
        for i, owner in taken.items():
            holders.setdefault(i, set()).add(owner)
        shared = [k for k, (i, r) in enumerate(zip(ids, rel)) if len(holders[i]) > 1 and i != r]
        if not shared:
            break
        for k in shared:
            ids[k] = rel[k]
    for i, r in zip(ids, rel):
        owner = taken.get(i)
        if owner is not None and owner != r:
            raise ConfigError(f"{os.path.join(root, r)}: its id {i!r} is already that of {owner} in the store; "
                              "rename one of the two files")
    return ids


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


def _jpeg_fill(raw: bytes) -> str | None:
    """libjpeg's warning when a JPEG's data ends before its picture does (a file cut short, with
    or without an end marker after the cut), or None. OpenCV and Pillow decode such a file into
    a picture partly filled with flat grey, with a warning nobody sees; here libjpeg-turbo
    (simplejpeg, strict) decodes it at 1/8 of its size, which reads every coefficient and costs
    little. Other recoverable warnings (extraneous bytes before a marker, common in cameras'
    files) leave the picture whole and are accepted; so is a JPEG libjpeg-turbo cannot convert
    (OpenCV decides on those)."""
    import simplejpeg

    try:
        header = simplejpeg.decode_jpeg_header(raw)
        colorspace = "CMYK" if header[2] in ("CMYK", "YCCK") else "GRAY"
        simplejpeg.decode_jpeg(raw, colorspace=colorspace, min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        message = str(exc).strip()
        return message if any(w in message.lower() for w in _JPEG_FILL_WARNINGS) else None
    return None


def _header_size(raw: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, TIFF, WebP or BMP (``fmt``: Pillow's name), or
    None where Pillow cannot read it (the decoder will say what is wrong). Opened through the
    format's own class: the header only, without Pillow's pixel-count guard."""
    from PIL import BmpImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

    plugin = {"PNG": PngImagePlugin.PngImageFile, "TIFF": TiffImagePlugin.TiffImageFile,
              "WEBP": WebPImagePlugin.WebPImageFile, "BMP": BmpImagePlugin.BmpImageFile}[fmt]
    try:
        with plugin(io.BytesIO(raw)) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def _format_of(raw: bytes) -> str | None:
    """'JPEG', 'PNG', 'TIFF', 'WEBP' or 'BMP' by the file's first bytes (whatever its name)."""
    if raw[:2] == b"\xff\xd8":
        return "JPEG"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if raw[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return "BMP" if raw[:2] == b"BM" else None


def check_pixels(path: str, width: int, height: int, factor: int = 1):
    """Refuse a picture of more than :data:`MAX_PIXELS` pixels once decoded (``factor``: the
    reduction its decoder applies per side), before it is decoded."""
    pixels = -(-width // factor) * -(-height // factor)
    if pixels > MAX_PIXELS:
        reduced = f" even at 1/{factor} of its size" if factor > 1 else ""
        raise ImageDecodeError(path, f"too large to decode safely: {width}x{height} px is {pixels / 1e6:.3g} MP "
                                     f"decoded{reduced}, above the limit of {MAX_PIXELS / 1e6:.3g} MP; "
                                     "downscale it first")


def _jpeg_is_complete(raw: bytes) -> bool:
    """A JPEG whose last scan is not followed by an end-of-image marker was cut short.

    (OpenCV 4 decodes such files into a partly grey picture with only a warning.)
    """
    last_scan = raw.rfind(b"\xff\xda")
    return last_scan >= 0 and raw.rfind(b"\xff\xd9") > last_scan


def read_file(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file, and its status taken before they were read (the file's size
    and modification time, as :func:`mlsp.images.identity.of_file` takes them). Opened without blocking
    and checked before reading, so a named pipe (or a device) under an image's name is reported
    instead of waited on forever."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageDecodeError(path, f"unreadable: {exc.strerror or exc}") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ImageDecodeError(path, f"not a regular file ({_file_kind(status.st_mode)})")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(), status
    except OSError as exc:
        raise ImageDecodeError(path, f"unreadable: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _container_format(raw: bytes) -> str | None:
    """'AVIF' or 'HEIF' for an ISO base media file of those brands (whatever its name), else None."""
    if raw[4:8] != b"ftyp":
        return None
    size = int.from_bytes(raw[:4], "big")
    box = raw[8 : min(max(size, 16), 4096)]
    brands = {box[i : i + 4] for i in range(0, len(box) - 3, 4)}  # major, minor version, compatible
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


@functools.lru_cache(maxsize=None)
def _register_heif_opener(pillow_heif) -> None:
    # thumbnails, depth maps and auxiliary images (HDR gain maps...) are never used here
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


def _pillow_decoder(path: str, fmt: str) -> str:
    """The Pillow format name to open ``fmt`` ('HEIF' or 'AVIF') with, registering the plugin
    that provides it; an ImageDecodeError naming the package to install when none does."""
    from PIL import features

    if fmt == "AVIF" and features.check("avif"):  # Pillow >= 11.3 reads AVIF itself
        return "AVIF"
    try:
        import pillow_heif
    except ImportError:
        pillow_heif = None
    if fmt == "HEIF":
        if pillow_heif is None:
            raise ImageDecodeError(path, "a HEIC/HEIF image, but its decoder is not installed: pip install pillow-heif")
        _register_heif_opener(pillow_heif)
        return "HEIF"
    register_avif = getattr(pillow_heif, "register_avif_opener", None)  # pillow-heif < 0.22
    if register_avif is not None and pillow_heif.libheif_info().get("AVIF"):
        register_avif()
        return "AVIF"
    raise ImageDecodeError(path, "an AVIF image, but no AVIF decoder is installed: pip install -U pillow "
                                 "(Pillow 11.3 or newer reads AVIF)")


def _decode_pillow(path: str, raw: bytes, fmt: str) -> np.ndarray:
    """HEIF or AVIF through Pillow -> (H, W, 3) uint8 RGB, upright."""
    from PIL import Image, ImageOps

    plugin = _pillow_decoder(path, fmt)
    try:
        with Image.open(io.BytesIO(raw), formats=[plugin]) as im:
            check_pixels(path, *im.size)
            # Once: Pillow's AVIF reader turns the container's rotation and mirroring into the
            # EXIF orientation it reports; for HEIF, libheif has applied them and pillow-heif
            # has reset the EXIF orientation to 1, so this changes nothing.
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode.startswith("I"):  # 16-bit or 32-bit integer gray (10/12-bit monochrome)
                gray = np.asarray(im).astype(np.int64)
                img = np.repeat(_to_uint8(np.clip(gray, 0, 65535).astype(np.uint16))[..., None], 3, axis=-1)
            elif "A" in im.mode or "transparency" in im.info:
                img = _composite_alpha(np.asarray(im.convert("RGBA")))
            else:
                img = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"too large to decode safely: {exc}") from exc
    except (OSError, ValueError, SyntaxError, RuntimeError, EOFError) as exc:
        raise ImageDecodeError(path, f"cannot decode {fmt}: {str(exc).strip() or type(exc).__name__}") from exc
    return img


# EXIF orientation -> the array operation that shows the picture upright (Pillow's exif_transpose)
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    return _ORIENT[orientation](img) if orientation in _ORIENT else img


def _header_orientation(raw: bytes) -> int:
    """The EXIF orientation in a PNG's or WebP's header (1 where there is none)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            exif = im.info.get("exif")  # a PNG's eXIf chunk before the image data; a WebP's EXIF chunk
        if not exif:
            return 1
        tags = Image.Exif()
        tags.load(exif)
        return int(tags.get(0x0112, 1))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return 1


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's header, or None where Pillow cannot read it."""
    from PIL import JpegImagePlugin

    try:  # the header only; opening the class directly skips Pillow's pixel-count guard
        with JpegImagePlugin.JpegImageFile(io.BytesIO(raw)) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, EOFError):
        return None  # OpenCV will say what is wrong with it


def _jpeg_reduction(width: int, height: int, max_side: int) -> int:
    """The largest libjpeg scale-down (1, 2, 4 or 8) that keeps the longer side >= ``max_side``."""
    longest, factor = max(width, height), 8
    while factor > 1 and -(-longest // factor) < max_side:
        factor //= 2
    return factor


def _fit(img: np.ndarray, max_side: int, full_size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize so that the longer side is ``max_side`` (INTER_AREA); ``full_size`` (h, w): the
    size before a reduced decode, from which the exact target size is computed."""
    h, w = full_size or img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def decode_image(path: str, max_side: int = 0) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 RGB; raise ImageDecodeError with the reason."""
    return decode_bytes(path, read_file(path)[0], max_side)


def decode_bytes(path: str, raw: bytes, max_side: int = 0) -> np.ndarray:
    """:func:`decode_image` of bytes already read from ``path`` (named in errors), so that a
    caller that also hashes the file reads it once."""
    if not raw:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    fmt = _container_format(raw)
    if fmt is not None:
        return np.ascontiguousarray(_fit(_decode_pillow(path, raw, fmt), max_side))
    data = np.frombuffer(raw, dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    kind = _format_of(raw)
    is_jpeg = kind == "JPEG"
    if is_jpeg and not _jpeg_is_complete(raw):
        raise ImageDecodeError(path, "truncated JPEG (no end-of-image marker after the last scan)")
    if is_jpeg and (fill := _jpeg_fill(raw)):
        raise ImageDecodeError(path, f"truncated or damaged JPEG: part of the picture would be decoder fill "
                                     f"(libjpeg: {fill})")
    img, full_size = None, None
    try:
        header = _jpeg_size(raw) if is_jpeg else (_header_size(raw, kind) if kind else None)
        factor = _jpeg_reduction(*header, max_side) if header and is_jpeg and max_side else 1
        if header:
            check_pixels(path, *header, factor)
        if factor > 1:
            bgr = cv2.imdecode(data, _JPEG_REDUCED[factor])
            if bgr is not None:
                img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                width, height = header
                rh, rw = img.shape[:2]
                # EXIF orientation may have swapped the sides: the full size in the same layout
                full_size = (height, width) if (rh, rw) == (-(-height // factor), -(-width // factor)) \
                    else (width, height)
        if img is None and ext in _ALPHA_FORMATS:
            raw_img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            if raw_img is not None and raw_img.ndim == 3 and raw_img.shape[2] in (2, 4):
                img = _composite_alpha(raw_img[..., [2, 1, 0, 3]] if raw_img.shape[2] == 4 else raw_img)
                if raw[:4] == b"\x89PNG" or raw[8:12] == b"WEBP":  # OpenCV orients these only without alpha
                    img = _orient(img, _header_orientation(raw))
        if img is None:
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
            if bgr is not None:
                img = cv2.cvtColor(_to_uint8(bgr), cv2.COLOR_BGR2RGB)
    except cv2.error as exc:
        raise ImageDecodeError(path, f"cannot decode: {str(exc).strip().splitlines()[-1]}") from exc
    if img is None:
        raise ImageDecodeError(path, "cannot decode: not an image, or a corrupt or unsupported file")
    return np.ascontiguousarray(_fit(img, max_side, full_size))


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
