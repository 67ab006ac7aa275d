"""From a photo folder to decoded images: phone formats (HEIC/HEIF, AVIF), large JPEGs decoded at
reduced size, and what the folder walk opens (regular files only, each real folder and file once).
Every file here is made by the test; nothing runs a backbone except the one extraction test."""

import io
import os
import subprocess
import sys
import threading

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers import write_image
from mlsp.images import decode as images
from mlsp.errors import ConfigError, ImageDecodeError
from mlsp.extraction.job import collect_inputs

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (a dependency) writes the HEIC test files")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="named pipes and symlinks as made here are POSIX")


def picture(height=64, width=80, seed=0):
    """A smooth, asymmetric RGB picture: every flip and rotation of it is far from the others."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)


def save_pil(img, fmt, orientation=1, **kwargs):
    """Encode an array with Pillow (HEIF through pillow-heif), EXIF orientation as given."""
    pillow_heif.register_heif_opener()
    im = Image.fromarray(img)
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


def upright(img, orientation):
    """What a viewer shows for ``img`` stored with this EXIF orientation (Pillow's reading)."""
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    return np.asarray(ImageOps.exif_transpose(im))


def mean_error(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("fmt, ext", [("HEIF", ".heic"), ("AVIF", ".avif")])
@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_phone_photo_orientation_applied_exactly_once(tmp_path, fmt, ext, orientation):
    img = picture()
    raw = save_pil(img, fmt, orientation, quality=95)
    # the container carries the transform (rotation 'irot' and/or mirror 'imir') ...
    assert b"irot" in raw[:2000] or b"imir" in raw[:2000]
    if fmt == "HEIF":  # ... and a HEIC carries the EXIF orientation as well, as phones write it
        tag = orientation.to_bytes(2, "big")  # the orientation entry, big- or little-endian TIFF
        big, little = b"\x01\x12\x00\x03\x00\x00\x00\x01" + tag, b"\x12\x01\x03\x00\x01\x00\x00\x00" + tag[::-1]
        assert big in raw or little in raw
    path = tmp_path / f"photo{ext}"
    path.write_bytes(raw)
    out = images.decode_image(str(path))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    expected = upright(img, orientation)
    assert mean_error(out, expected) < 4
    twice = upright(expected, orientation)
    for wrong in (img, twice):  # not applied, applied twice
        if wrong.shape == out.shape:
            assert mean_error(out, wrong) > 20


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_alpha_images_oriented_like_opaque_ones(tmp_path, fmt, orientation):
    """OpenCV reads alpha only without orientation: PNG and WebP with both are oriented here."""
    img = picture()
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, 60:, 3] = 0
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(save_pil(rgba, fmt, orientation, **({"lossless": True} if fmt == "WEBP" else {})))
    flat = img.copy()
    flat[:, 60:] = 255
    np.testing.assert_array_equal(images.decode_image(str(path)), upright(flat, orientation))


def test_ten_bit_heic_and_avif_to_8_bit(tmp_path):
    ramp = np.linspace(0, 1, 64 * 80, dtype=np.float64).reshape(64, 80)
    rgb = np.stack([ramp, ramp[:, ::-1], ramp[::-1]], -1)
    deep = (rgb * 65535).round().astype(np.uint16)
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(80, 64), data=deep.tobytes())
    heif.save(str(tmp_path / "deep.heic"), quality=95)
    assert pillow_heif.open_heif(str(tmp_path / "deep.heic"), convert_hdr_to_8bit=False).info["bit_depth"] == 10
    ten = (rgb * 1023).round().astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "deep.avif"), ten[..., ::-1],
                       [cv2.IMWRITE_AVIF_DEPTH, 10, cv2.IMWRITE_AVIF_QUALITY, 100])
    expected = (rgb * 255).round()
    for name in ("deep.heic", "deep.avif"):
        out = images.decode_image(str(tmp_path / name))
        assert out.dtype == np.uint8 and out.shape == (64, 80, 3), name
        assert np.abs(out - expected).mean() < 3, name


@pytest.mark.parametrize("fmt, ext", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_phone_formats_alpha_over_white_and_grayscale(tmp_path, fmt, ext):
    img = picture()
    rgba = np.dstack([img, np.zeros(img.shape[:2], np.uint8)])
    rgba[:, :40, 3] = 255  # left half opaque, right half transparent
    (tmp_path / f"a{ext}").write_bytes(save_pil(rgba, fmt, quality=95))
    out = images.decode_image(str(tmp_path / f"a{ext}"))
    assert out.shape == (64, 80, 3)
    assert mean_error(out[:, :36], img[:, :36]) < 4
    assert out[:, 44:].min() >= 245, "transparent pixels are composited over white"

    gray = img[..., 1]
    (tmp_path / f"g{ext}").write_bytes(save_pil(gray, fmt, quality=95))
    out = images.decode_image(str(tmp_path / f"g{ext}"))
    assert out.shape == (64, 80, 3) and (out[..., 0] == out[..., 2]).all()
    assert mean_error(out[..., 0], gray) < 4


def test_recognised_by_content_not_name(tmp_path):
    img = picture()
    (tmp_path / "really_heic.jpg").write_bytes(save_pil(img, "HEIF", quality=95))
    assert mean_error(images.decode_image(str(tmp_path / "really_heic.jpg")), img) < 4


def test_missing_decoder_names_the_package(tmp_path, monkeypatch):
    img = picture()
    (tmp_path / "p.heic").write_bytes(save_pil(img, "HEIF"))
    (tmp_path / "p.avif").write_bytes(save_pil(img, "AVIF"))
    from PIL import features

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif fails
    with pytest.raises(ImageDecodeError, match="pip install pillow-heif"):
        images.decode_image(str(tmp_path / "p.heic"))
    monkeypatch.setattr(features, "check", lambda name: False if name == "avif" else True)
    with pytest.raises(ImageDecodeError, match="pip install -U pillow"):
        images.decode_image(str(tmp_path / "p.avif"))


def old_decode(path, max_side):
    """How a JPEG was decoded before reduced-size decoding (the reference for small images)."""
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return img


def test_jpeg_needing_no_reduction_decodes_exactly_as_before(tmp_path):
    for h, w, max_side in [(600, 800, 1024), (900, 1500, 1024), (1100, 700, 600), (300, 200, 0)]:
        path = write_image(tmp_path / f"{h}x{w}.jpg", h, w)
        assert max(h, w) < 2 * max_side or not max_side  # libjpeg could not reduce these
        np.testing.assert_array_equal(images.decode_image(str(path), max_side), old_decode(str(path), max_side))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_reduced_decode_same_size_close_values(tmp_path, orientation):
    img = picture(1700, 2150, seed=3)
    path = tmp_path / "big.jpg"
    path.write_bytes(save_pil(img, "JPEG", orientation, quality=95))
    out = images.decode_image(str(path), 512)  # decoded at 1/4 (538 x 425), then to 512
    full = old_decode(str(path), 512)
    assert out.shape == full.shape == ((405, 512, 3) if orientation == 1 else (512, 405, 3))
    assert mean_error(out, full) < 1.5
    assert images.decode_image(str(path), 0).shape[:2] == ((1700, 2150) if orientation == 1 else (2150, 1700))


PEAK_SCRIPT = """
import sys
from mlsp.images import decode as images
from PIL import JpegImagePlugin  # imported by the decode anyway: not part of its growth


def high_water():  # this process's peak resident memory (getrusage's would include the parent's)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


before = high_water()
img = images.decode_image(sys.argv[1], int(sys.argv[2]))
print(img.shape[0], img.shape[1], high_water() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
def test_48_megapixel_jpeg_decodes_in_bounded_memory(tmp_path):
    """An 8000x6000 photo (144 MB as RGB) with --max-side 1024: decoded at 1/4 by libjpeg, the
    peak memory of the decode stays a fraction of one full-size frame. The full decode is
    measured too, so the measure can tell the difference."""
    h, w = 6000, 8000
    path = tmp_path / "48mp.jpg"
    big = cv2.resize(picture(60, 80, seed=5), (w, h), interpolation=cv2.INTER_LINEAR)
    path.write_bytes(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    del big
    frame = h * w * 3
    env = dict(os.environ, PYTHONPATH=ROOT)

    def peak(max_side):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(max_side)], env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        oh, ow, grown = map(int, out.stdout.split())
        return (oh, ow), grown

    size, grown = peak(1024)
    assert size == (768, 1024)
    assert grown < frame / 4, f"decoding with --max-side 1024 grew the peak by {grown / 2**20:.0f} MiB"
    size, grown_full = peak(0)
    assert size == (h, w) and grown_full > frame


@POSIX_ONLY
def test_named_pipe_is_listed_never_opened(tmp_path):
    write_image(tmp_path / "1004.jpg", 100, 100)
    os.mkfifo(tmp_path / "1005.jpg")
    paths, others = images.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["1004.jpg"]
    assert others == [(str(tmp_path / "1005.jpg"), "not a regular file (a named pipe)")]
    # given by name, it is refused too, at once
    usable, skipped = images.check_files([str(tmp_path / "1005.jpg"), str(tmp_path / "1004.jpg")])
    assert usable == [str(tmp_path / "1004.jpg")] and "named pipe" in skipped[0][1]
    result = []
    worker = threading.Thread(target=lambda: result.append(_reason(tmp_path / "1005.jpg")), daemon=True)
    worker.start()
    worker.join(10)
    assert result == ["not a regular file (a named pipe)"], "decoding a named pipe must not wait for a writer"


def _reason(path):
    try:
        images.decode_image(str(path))
    except ImageDecodeError as exc:
        return exc.reason
    return None


@POSIX_ONLY
def test_each_real_folder_and_file_once(tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    for rel in ["a/1.jpg", "b/2.jpg", "z/3.jpg"]:
        write_image(root / rel, 100, 100)
    write_image(outside / "4.jpg", 100, 100)
    write_image(tmp_path / "5.jpg", 100, 100)
    os.symlink(".", root / "loop")  # ln -s . loop
    os.symlink("../a", root / "b" / "up")  # a second way into a
    os.symlink(root / "z", root / "a_link")  # sorts before z: the real path must still win
    os.symlink(outside, root / "ext")  # a folder elsewhere: searched, once
    os.symlink(outside, root / "ext2")
    os.symlink(tmp_path / "5.jpg", root / "five.jpg")  # a file elsewhere: used, once
    os.symlink(root / "a" / "1.jpg", root / "b" / "one.jpg")  # a second name for a/1.jpg
    os.link(root / "b" / "2.jpg", root / "b" / "hard.jpg")
    os.symlink("self.jpg", root / "self.jpg")  # links that lead nowhere but round
    os.symlink("lb", root / "la")
    os.symlink("la", root / "lb")
    paths, others = images.list_images(str(root))
    assert [os.path.relpath(p, root) for p in paths] == ["a/1.jpg", "b/2.jpg", "ext/4.jpg", "five.jpg", "z/3.jpg"]
    reasons = {os.path.relpath(p, root): r for p, r in others}
    for name in ("self.jpg", "la", "lb"):
        assert reasons.pop(name).startswith("unreadable: "), name
    assert reasons == {
        "loop": "a link to a folder already searched (.); not searched again",
        "b/up": "a link to a folder already searched (a); not searched again",
        "a_link": "a link to a folder already searched (z); not searched again",
        "ext2": "a link to a folder already searched (ext); not searched again",
        "b/one.jpg": "the same file as a/1.jpg (a link to it); used once",
        "b/hard.jpg": "the same file as b/2.jpg (a link to it); used once",
    }


def test_every_common_extension_any_case(tmp_path):
    img = picture()
    files = {"a.jpg": ".jpg", "b.JPEG": ".jpg", "c.PNG": ".png", "d.webp": ".webp", "e.BMP": ".bmp",
             "f.tif": ".tif", "g.TIFF": ".tiff"}
    for name, ext in files.items():
        (tmp_path / name).write_bytes(cv2.imencode(ext, img[..., ::-1])[1].tobytes())
    (tmp_path / "h.HEIC").write_bytes(save_pil(img, "HEIF", quality=95))
    (tmp_path / "i.heif").write_bytes(save_pil(img, "HEIF", quality=95))
    (tmp_path / "j.AVIF").write_bytes(save_pil(img, "AVIF", quality=95))
    (tmp_path / "notes.txt").write_text("a sidecar")
    (tmp_path / "raw.dng").write_bytes(b"not supported")
    paths, others = images.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [*files, "h.HEIC", "i.heif", "j.AVIF"]
    assert [(os.path.basename(p), r.split(";")[0]) for p, r in others] == [
        ("notes.txt", "not an image file type (.txt)"), ("raw.dng", "not an image file type (.dng)")]
    for p in paths:
        assert mean_error(images.decode_image(p), img) < 6, p


def test_missing_or_empty_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        collect_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files found"):
        collect_inputs(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"readme.txt: not an image file type"):
        collect_inputs(str(tmp_path / "docs"))
    with pytest.raises(ConfigError, match="none of the 2 files given can be read.*a.jpg: no such file"):
        collect_inputs([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")])
    with pytest.raises(ConfigError, match="docs: not a regular file"):
        collect_inputs([str(tmp_path / "docs")])


def test_cli_missing_and_empty_folder_exit_with_one_line(tmp_path):
    from click.testing import CliRunner

    import cli

    (tmp_path / "empty").mkdir()
    for folder in ("nowhere", "empty"):
        out = tmp_path / f"{folder}.h5"
        res = CliRunner().invoke(cli.main, ["extract", "--images", str(tmp_path / folder), "--weights", "random",
                                            "--out", str(out)])
        assert res.exit_code not in (0, None) and not isinstance(res.exception, (AssertionError, TypeError))
        errors = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and folder in errors[0] and "Traceback" not in res.output, res.output
        assert not out.exists()


def test_phone_photos_extract_upright_and_missing_decoder_listed(tmp_path, extractors, monkeypatch):
    from mlsp.extraction.job import ExtractConfig, extract
    from mlsp.store.read import FeatureStore

    img = picture(120, 100, seed=7)
    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "rotated.heic").write_bytes(save_pil(img, "HEIF", 6, quality=95))
    (folder / "rotated.avif").write_bytes(save_pil(img, "AVIF", 6, quality=95))
    (folder / "upright.png").write_bytes(cv2.imencode(".png", upright(img, 6)[..., ::-1])[1].tobytes())
    fx = extractors(net="iv3")
    config = ExtractConfig(net="iv3", weights="random:0")
    result = extract(str(folder), config, str(tmp_path / "s.h5"), extractor=fx)
    assert result.new == 3 and not result.errors
    with FeatureStore(str(tmp_path / "s.h5")) as s:
        assert s.ids.tolist() == ["rotated.avif", "rotated.heic", "upright"]
        feats = s.read([0, 1, 2]).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["sizes"][...].tolist() == [[100, 120]] * 3  # (height, width): stored upright
    for k in (0, 1):  # the same photo: features close to those of the upright PNG
        assert np.corrcoef(feats[k].ravel(), feats[2].ravel())[0, 1] > 0.99

    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    (folder / "new.heic").write_bytes((folder / "rotated.heic").read_bytes())
    result = extract(str(folder), config, str(tmp_path / "s.h5"), extractor=fx)
    assert result.new == 0 and [(e["path"], e["reason"]) for e in result.errors] == [
        ("new.heic", "a HEIC/HEIF image, but its decoder is not installed: pip install pillow-heif")]
