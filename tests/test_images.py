"""Decoding every kind of input into 8-bit RGB, and the crop geometry of the views."""

import io
import os

import cv2
import numpy as np
import pytest

from mlsp.images import decode as images
from mlsp.errors import ImageDecodeError


def test_views_geometry_and_names():
    h, w = 64, 80
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)  # pixel = its own coordinates
    views = images.make_views(img, augment=True)
    ch, cw = int(0.875 * h), int(0.875 * w)  # 56, 70
    assert views.shape == (8, ch, cw, 3)
    assert images.view_names(True) == ["tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip"]
    tops = {"tl": (0, 0), "tr": (0, w - cw), "bl": (h - ch, 0), "br": (h - ch, w - cw)}
    for k, name in enumerate(["tl", "tr", "bl", "br"]):
        y0, x0 = tops[name]
        crop, flipped = views[2 * k], views[2 * k + 1]
        assert (crop[0, 0, 0], crop[0, 0, 1]) == (y0, x0)
        assert (crop[-1, -1, 0], crop[-1, -1, 1]) == (y0 + ch - 1, x0 + cw - 1)
        np.testing.assert_array_equal(flipped, crop[:, ::-1])
    full = images.make_views(img, augment=False)
    assert full.shape == (1, h, w, 3) and images.view_names(False) == ["full"]


def test_crop_size_is_floor():
    assert images.crop_size(256, 256) == (224, 224)
    assert images.crop_size(101, 77) == (88, 67)  # 88.375, 67.375


def _encode(img, ext, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (80, 60), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp", ".jpg"])
def test_formats_decode_to_rgb(tmp_path, rgb, ext):
    path = tmp_path / f"x{ext}"
    path.write_bytes(_encode(rgb[..., ::-1], ext, [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []))
    out = images.decode_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (60, 80, 3)
    tol = 12 if ext == ".jpg" else 0
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() <= tol


def test_grayscale_16bit_and_alpha(tmp_path, rgb):
    gray = rgb[..., 0]
    (tmp_path / "g.png").write_bytes(_encode(gray, ".png"))
    out = images.decode_image(str(tmp_path / "g.png"))
    assert out.shape == (60, 80, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()

    deep = gray.astype(np.uint16) * 257  # 16-bit with the same picture
    (tmp_path / "d.png").write_bytes(_encode(deep, ".png"))
    np.testing.assert_array_equal(images.decode_image(str(tmp_path / "d.png"))[..., 1], gray)

    bgra = np.dstack([rgb[..., ::-1], np.zeros((60, 80), np.uint8)])
    bgra[:, :40, 3] = 255  # left half opaque, right half transparent
    (tmp_path / "a.png").write_bytes(_encode(bgra, ".png"))
    out = images.decode_image(str(tmp_path / "a.png"))
    np.testing.assert_array_equal(out[:, :40], rgb[:, :40])
    assert (out[:, 40:] == 255).all(), "transparent pixels are composited over white"


def test_exif_orientation_applied(tmp_path, rgb):
    from PIL import Image

    pil = Image.fromarray(rgb)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "o.jpg").write_bytes(buf.getvalue())
    out = images.decode_image(str(tmp_path / "o.jpg"))
    assert out.shape == (80, 60, 3)
    expected = np.rot90(rgb, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 12


def test_max_side_resizes_large_images(tmp_path):
    big = np.full((300, 1200, 3), 128, np.uint8)
    (tmp_path / "big.png").write_bytes(_encode(big, ".png"))
    assert images.decode_image(str(tmp_path / "big.png"), max_side=600).shape == (150, 600, 3)
    assert images.decode_image(str(tmp_path / "big.png"), max_side=0).shape == (300, 1200, 3)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "cannot decode"),
        ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "cannot decode"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as info:
        images.decode_image(str(path))
    assert info.value.path == str(path)


def test_truncated_jpeg(tmp_path, rgb):
    data = _encode(rgb, ".jpg")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError, match="truncated"):
        images.decode_image(str(tmp_path / "t.jpg"))


def test_missing_file(tmp_path):
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(ImageDecodeError, match="unreadable"):
        images.decode_image(str(tmp_path / "dangling.jpg"))


def test_too_small_is_skipped_not_upscaled():
    img = np.zeros((80, 120, 3), np.uint8)
    with pytest.raises(ImageDecodeError, match="too small"):
        images.check_size("x.png", img, augment=True, min_side=75, net="iv3")  # crops 70x105
    images.check_size("x.png", img, augment=False, min_side=75, net="iv3")  # whole image is fine


def test_listing_and_ids(tmp_path):
    for rel in ["a/1.jpg", "a/2.PNG", "b/1.jpg", "notes.txt", ".hidden.jpg", "c/x.jpg", "c/x.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    paths, others = images.list_images(str(tmp_path))
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    assert rel == ["a/1.jpg", "a/2.PNG", "b/1.jpg", "c/x.jpg", "c/x.png"]
    assert [os.path.basename(p) for p, _ in others] == ["notes.txt"]
    assert images.image_ids(paths, str(tmp_path)) == ["a/1", "a/2", "b/1", "c/x.jpg", "c/x.png"]


def _cut_with_end_marker(data: bytes, fraction: float) -> bytes:
    """A JPEG cut inside its last scan, with an end-of-image marker put back after the cut."""
    scan = data.rfind(b"\xff\xda")
    return data[: scan + int((len(data) - scan) * fraction)] + b"\xff\xd9"


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_short_with_an_end_marker_is_listed_not_stored(tmp_path, progressive):
    """OpenCV decodes a cut JPEG whose end marker was put back into a picture partly filled
    with flat grey, without a word; it is refused with libjpeg's reason."""
    from PIL import Image

    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=90, progressive=progressive)
    cut = _cut_with_end_marker(buffer.getvalue(), 0.5)
    if not progressive:  # the planted defect: what OpenCV alone makes of it
        filled = cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR)
        assert filled is not None and (filled == 128).all(axis=(1, 2)).sum() >= 40
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    with pytest.raises(ImageDecodeError, match=r"truncated or damaged JPEG: .*premature end"):
        images.decode_image(str(path), 1024)
    # a whole JPEG with a harmless defect (bytes between two markers) still decodes as before
    whole = buffer.getvalue()
    scan = whole.rfind(b"\xff\xda")
    (tmp_path / "extra.jpg").write_bytes(whole[:scan] + b"\x00\x00" + whole[scan:])
    (tmp_path / "whole.jpg").write_bytes(whole)
    np.testing.assert_array_equal(images.decode_image(str(tmp_path / "extra.jpg")),
                                  images.decode_image(str(tmp_path / "whole.jpg")))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (8-bit RGB), with a few bytes of data."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_huge_picture_in_a_small_file_is_refused_from_its_header(tmp_path):
    """A PNG of 30000x30000 (a few bytes here; 2.6 MB of real data took 8.6 GB and 84 s): listed
    with the reason at once, before any decoding."""
    import time

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(30000, 30000))
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"too large to decode safely: 30000x30000 px is 900 MP decoded, "
                                               r"above the limit of 134 MP; downscale it first"):
        images.decode_image(str(path), 1024)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("ext", [".png", ".tif", ".webp", ".bmp", ".jpg"])
def test_every_format_has_a_pixel_limit(tmp_path, rgb, ext, monkeypatch):
    """Each format is measured from its header against MAX_PIXELS; a JPEG by the size it is
    decoded at (libjpeg reduces it first), the others by their full size."""
    big = cv2.resize(rgb, (400, 300), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / f"x{ext}"
    path.write_bytes(_encode(big[..., ::-1], ext))
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 400 - 1)
    with pytest.raises(ImageDecodeError, match="too large to decode safely: 400x300 px is 0.12 MP decoded"):
        images.decode_image(str(path), 0)
    if ext == ".jpg":  # decoded at 1/2 for max_side 150: 200x150 pixels, under the limit
        assert images.decode_image(str(path), 150).shape == (112, 150, 3)
    else:
        with pytest.raises(ImageDecodeError, match="too large"):
            images.decode_image(str(path), 150)
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 400)
    assert images.decode_image(str(path), 0).shape == (300, 400, 3)


def test_opencv_messages_stay_off_the_console(tmp_path, capfd):
    """A TIFF OpenCV cannot read (32-bit float gray) is one ImageDecodeError; OpenCV's own
    "[ERROR] ... imdecode_" line does not reach the console."""
    from PIL import Image

    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((50, 60), np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        images.decode_image(str(path))
    assert capfd.readouterr().err == ""
