"""mlsp.sample: the built-in dataset is deterministic, offline, AVA-shaped and has signal."""

import os
import socket

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from mlsp.errors import ConfigError
from mlsp.store.labels import assign_splits, read_labels, read_test_list
from bad_files import make_bad_files
from mlsp.sample import SOURCES, build_sample, skimage_data_dir


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"), n_images=48, seed=0)


def pixels(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def test_sources_are_bundled_files():
    for name, file_name, credit in SOURCES:
        assert os.path.isfile(os.path.join(skimage_data_dir(), file_name)), name
        assert credit


def test_build_is_offline(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sample tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    info = build_sample(tmp_path, n_images=12, seed=5)
    assert len(os.listdir(info.images_dir)) == 12


def test_same_seed_same_bytes_and_pixels(sample, tmp_path):
    again = build_sample(tmp_path, n_images=48, seed=0)
    with open(sample.labels_path, "rb") as a, open(again.labels_path, "rb") as b:
        assert a.read() == b.read()
    with open(sample.test_list_path, "rb") as a, open(again.test_list_path, "rb") as b:
        assert a.read() == b.read()
    assert again.images == sample.images and again.files == sample.files
    for image_id, name in sample.files.items():
        first = pixels(os.path.join(sample.images_dir, name))
        second = pixels(os.path.join(again.images_dir, name))
        assert first.dtype == second.dtype and np.array_equal(first, second), name


def test_other_seed_differs(sample, tmp_path):
    other = build_sample(tmp_path, n_images=48, seed=1)
    assert [im[1:] for im in other.images] != [im[1:] for im in sample.images]


def test_labels_parse_and_fall_with_degradation(sample):
    labels = read_labels(sample.labels_path)
    assert len(labels) == 48 + len(sample.labels_without_images) == 51
    mos, votes = labels.lookup([im.id for im in sample.images])
    assert not np.isnan(mos).any() and np.all((mos >= 1) & (mos <= 10))
    assert np.all((votes.sum(axis=1) >= 100) & (votes.sum(axis=1) <= 250))
    level = np.array([im.level for im in sample.images])
    degraded = level > 0
    assert degraded.sum() >= 30
    assert spearmanr(mos[degraded], level[degraded])[0] < -0.5
    truth = np.array([im.true_quality for im in sample.images])
    assert np.corrcoef(mos, truth)[0, 1] > 0.9
    assert {im.degradation for im in sample.images} == {"none", "blur", "noise", "jpeg", "contrast"}
    assert all(im.level == 0 for im in sample.images if im.degradation == "none")


def test_test_list_and_missing_images(sample):
    test_ids = read_test_list(sample.test_list_path)
    assert test_ids == sample.test_ids
    image_ids = [im.id for im in sample.images]
    assert 0.15 * 48 <= len(set(test_ids) & set(image_ids)) <= 0.25 * 48
    for image_id in sample.labels_without_images:
        assert not any(name.startswith(image_id) for name in os.listdir(sample.images_dir))
    _, _, split, report = assign_splits(image_ids, read_labels(sample.labels_path), test_ids)
    assert report["labels_without_images"] == 3
    assert report["test_ids_without_images"] == 1
    assert report["counts"]["test"] == len(test_ids) - 1
    assert report["counts"]["unlabeled"] == 0


def test_formats_modes_and_sizes(sample):
    names = sorted(os.listdir(sample.images_dir))
    assert names == sorted(sample.files.values())
    extensions = {os.path.splitext(n)[1] for n in names}
    assert extensions == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif"}
    kinds = {kind: image_id for image_id, kind in sample.kinds.items()}
    assert list(sample.kinds.values()).count("jpeg") >= 48 - 9

    def path(kind):
        return os.path.join(sample.images_dir, sample.files[kinds[kind]])

    with Image.open(path("gray_jpeg")) as im:
        assert im.format == "JPEG" and im.mode == "L"
    with Image.open(path("png_rgba")) as im:
        assert im.format == "PNG" and im.mode == "RGBA"
        alpha = np.asarray(im)[..., 3]
        assert alpha.min() < 128 and alpha.max() == 255
    png16 = cv2.imread(path("png16"), cv2.IMREAD_UNCHANGED)
    assert png16.dtype == np.uint16 and png16.shape[2] == 3 and png16.max() > 255
    with Image.open(path("exif_jpeg")) as im:
        assert im.getexif()[0x0112] == 6
        h, w = sample.sizes[kinds["exif_jpeg"]]
        assert im.size == (h, w)  # stored turned; PIL's size is (width, height) of what is stored
    formats = {"webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "png": "PNG", "jpeg_ext": "JPEG"}
    for kind, fmt in formats.items():
        with Image.open(path(kind)) as im:
            assert im.format == fmt and im.mode == "RGB", kind

    for image_id, name in sample.files.items():
        if sample.kinds[image_id] == "exif_jpeg":
            continue
        with Image.open(os.path.join(sample.images_dir, name)) as im:
            assert im.size[::-1] == sample.sizes[image_id]
    sides = np.array(list(sample.sizes.values()))
    assert sides.min() >= 200 and sides.max() <= 700
    assert len({tuple(s) for s in sides}) > 40  # varied sizes


def test_max_side_and_rebuild_leaves_no_strays(tmp_path):
    build_sample(tmp_path, n_images=20, seed=2)
    info = build_sample(tmp_path, n_images=10, seed=2, max_side=256)
    assert len(os.listdir(info.images_dir)) == 10
    assert max(max(s) for s in info.sizes.values()) <= 256


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        build_sample(tmp_path, n_images=0)
    with pytest.raises(ConfigError):
        build_sample(tmp_path, max_side=8)


def test_bad_files(tmp_path):
    expected = make_bad_files(tmp_path)
    assert set(expected) == set(os.listdir(tmp_path))
    assert set(expected.values()) == {"empty", "truncated", "decode", "too small"}
    assert os.path.getsize(tmp_path / "empty.jpg") == 0
    truncated = (tmp_path / "truncated.jpg").read_bytes()
    assert truncated[:2] == b"\xff\xd8" and b"\xff\xd9" not in truncated[-2:]
    with Image.open(tmp_path / "tiny.png") as im:
        assert im.size == (40, 30)
    for name in ("not_an_image.jpg", "corrupt.png"):
        assert cv2.imread(str(tmp_path / name)) is None, name
    assert (tmp_path / "corrupt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
