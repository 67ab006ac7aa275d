"""`mlsp models --check`: an install checked against a catalogue model's published prediction
(heads/score/check.py; the `check` table of heads/score/catalogue.py's entries).

The tests' model is a catalogue entry the test adds: an iv3 narrow backbone of random weights
saved to a file, a small Single-3FC head in the authors' Keras 2 layout, a photo, all served from
127.0.0.1 (tests/http_files.py). Its "published" value is computed apart from mlsp: the photo
decoded by Pillow, Keras' own InceptionV3 with every `mixed` block tapped, global average
pooling, the features rounded to float16 (as mlsp's scoring and the authors' training store
do), the head in numpy (tests/keras2_files.py). Without that rounding the float32 features agree
with mlsp's to 4e-7 (relative), and the rounding alone moves this test head's score by 0.005: a
head calibrated on three random-backbone photos amplifies small feature differences, which is
why its tolerance is the features' agreement, not the released model's 0.01.
"""

import hashlib
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_image
from http_files import FileServer, closed_port_url
from keras2_files import authors_layers, calibrated, forward, write_keras2

import cli
from heads.score import catalogue as pt
from heads.score import check as pc
from mlsp.errors import ConfigError, WeightsUnavailableError

IV3_CHANNELS = 10048
WIDTH = 16  # the head's 3FC: 16, 8, 2, 1
TOLERANCE = 2e-3


def invoke(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)


def error_line(output):
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    return errors[0]


def test_the_wide_entry_carries_the_authors_published_prediction():
    spec = pt.PRETRAINED.get("ava-mlsp-irv2-wide")
    check = pt.published_check(spec)
    assert check.reference == 6.397093 and 0 < check.tolerance <= 0.01
    assert (check.photo, check.photo_size) == ("954013.jpg", 302_644)
    assert check.photo_sha256 == "568eaf2ac5ae517dad278eec1d219ab7238a39e23a4b4adfe2dbd11f74a5ac6d"
    commit = "dfb5c19b1e7139b1919ca1c1c766ca154aaad6be"
    assert check.photo_urls[0] == f"https://raw.githubusercontent.com/subpic/ava-mlsp/{commit}/images/954013.jpg"
    assert all(commit in url and url.endswith("/images/954013.jpg") for url in check.photo_urls)
    assert "predict_mlsp_wide.ipynb" in check.source and "6.397093" in check.source
    assert [s.name for s in pc.checkable()][:1] == ["ava-mlsp-irv2-wide"]
    with pytest.raises(ConfigError, match="ava-mlsp-irv2-narrow: no published prediction"):
        pc.checkable(["ava-mlsp-irv2-narrow"])
    listed = invoke("models").output.splitlines()
    assert listed[-1].startswith("A published prediction to check this install against (`mlsp models --check`): "
                                 "ava-mlsp-irv2-wide")
    row, = json.loads(invoke("models", "ava-mlsp-irv2-wide", "--json").output)
    assert row["check"]["reference"] == 6.397093 and row["check"]["photo"] == "954013.jpg"
    res = invoke("models", "--check", "--fetch", "ava-mlsp-irv2-wide")
    assert res.exit_code == 2 and "give --fetch or --check" in res.output


@pytest.mark.parametrize("change, said", [
    ({"reference": "high"}, "check.reference must be a number"),
    ({"tolerance": 0}, "check.tolerance must be above 0"),
    ({"photo_sha256": "abc"}, "check.photo_sha256 must be 64 lowercase hex digits"),
    ({"photo": "../x.jpg"}, "check.photo '../x.jpg' must be a plain file name"),
    ({"photo_urls": ["ftp://x/p.jpg"]}, "check.photo_urls must be a list of http(s) URLs"),
    ({"colour": "red"}, "check must be a table of exactly photo, photo_size"),
])
def test_a_bad_check_is_one_line_naming_the_file_the_entry_and_the_field(tmp_path, change, said):
    entry = {"name": "team-bad-check", "net": "iv3", "pooling": "narrow", "head": "single3fc",
             "head_options": {"width": WIDTH}, "views": "full", "file_name": "head.h5", "size": 10,
             "sha256": "0" * 64, "urls": [], "source": "tests", "paper": {}, "backbone_weights": "random:0",
             "check": {"photo": "p.jpg", "photo_size": 10, "photo_sha256": "1" * 64, "photo_urls": [],
                       "reference": 5.0, "tolerance": 0.01, "source": "tests"}}
    entry["check"].update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"models": [entry]}))
    res = invoke("models", "--catalogue", path)
    assert res.exit_code == 1
    message = res.output.strip()
    assert "\n" not in message and f"{path}: model 1 ('team-bad-check')" in message and said in message


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A photo, a random iv3 saved to a file, a head file, and the prediction computed apart from
    mlsp (Pillow, Keras' InceptionV3, global average pooling, float16 features, the head in numpy)."""
    import keras
    from PIL import Image

    root = tmp_path_factory.mktemp("published")
    photos = [write_image(root / f"photo{k}.jpg", 96 + 8 * k, 128 - 8 * k, seed=21 + k) for k in range(3)]
    keras.utils.set_random_seed(21)
    net = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(None, None, 3))
    backbone = root / "iv3_random.weights.h5"
    net.save_weights(str(backbone))
    taps = keras.Model(net.input, [net.get_layer(f"mixed{i}").output for i in range(11)])
    from mlsp.images.decode import decode_image

    features = []
    for photo in photos:
        rgb = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32)
        np.testing.assert_array_equal(rgb, decode_image(str(photo)), err_msg="Pillow and mlsp decode alike")
        features.append(np.concatenate([keras.ops.convert_to_numpy(a).mean(axis=(1, 2))
                                        for a in taps(rgb[None] / 127.5 - 1.0)], axis=-1))
    assert features[0].shape == (1, IV3_CHANNELS)
    layers = calibrated(authors_layers("single3fc", IV3_CHANNELS, WIDTH, seed=22), features)
    scores = [float(forward("single3fc", f.astype(np.float16), layers)[0]) for f in features]
    assert np.ptp(scores) > 100 * TOLERANCE, "the head tells photos apart far beyond the tolerance"
    head = write_keras2(root / "model_best_weights.h5", layers)
    return {"photo": photos[0].read_bytes(), "head": head.read_bytes(), "backbone": str(backbone),
            "reference": scores[0]}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A photo and a head file (no backbone is built: for the checks that refuse before scoring)."""
    root = tmp_path_factory.mktemp("small")
    photo = write_image(root / "photo.jpg", 64, 80, seed=31)
    head = write_keras2(root / "model_best_weights.h5", authors_layers("single3fc", IV3_CHANNELS, WIDTH, seed=32))
    return {"photo": photo.read_bytes(), "head": head.read_bytes(), "backbone": "random:0", "reference": 5.0}


def entry(name, published, head_url, photo_urls, **check):
    data = published["head"]
    return {"name": name, "net": "iv3", "pooling": "narrow", "head": "single3fc", "head_options": {"width": WIDTH},
            "views": "full", "file_name": "model_best_weights.h5", "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "urls": [head_url], "source": "a test mirror",
            "paper": {}, "backbone_weights": published["backbone"],
            "check": {"photo": "photo.jpg", "photo_size": len(published["photo"]),
                      "photo_sha256": hashlib.sha256(published["photo"]).hexdigest(), "photo_urls": list(photo_urls),
                      "reference": published["reference"], "tolerance": TOLERANCE,
                      "source": "computed by the test apart from mlsp", **check}}


@pytest.mark.slow
def test_the_check_passes_on_the_published_value_and_fails_with_the_figure_on_another(
        published, tmp_path, model_home):
    """The photo is fetched once (a broken first try resumed), scored as `mlsp score --model`
    scores it, and the score printed beside the published value: the value computed the
    authors' way passes; one shifted by 0.05 fails in one line giving the difference."""
    with FileServer() as server:
        head_url = server.add("/m/model_best_weights.h5", published["head"])
        photo_url = server.add("/m/photo.jpg", published["photo"], cut_after=len(published["photo"]) // 2)
        shifted = round(published["reference"] + 0.05, 6)
        catalogue = tmp_path / "check.json"
        catalogue.write_text(json.dumps({"models": [
            entry("test-check-match", published, head_url, [closed_port_url(), photo_url]),
            entry("test-check-shift", published, head_url, [photo_url], reference=shifted)]}))
        res = invoke("models", "--check", "test-check-match", "--catalogue", catalogue)
        assert res.exit_code == 0, res.output
        assert server.ranges_asked("/m/photo.jpg") == [None, f"bytes={len(published['photo']) // 2}-"]
        line, = [x for x in res.output.splitlines() if x.startswith("test-check-match: photo.jpg scores ")]
        assert f"published {published['reference']:.6f}" in line and "within 0.002" in line
        score = float(line.split(" scores ")[1].split(",")[0])
        difference = float(line.split("difference ")[1].split(",")[0])
        assert difference == pytest.approx(score - published["reference"], abs=2e-6)
        assert abs(difference) <= TOLERANCE
        photo = model_home / "mlsp" / "models" / "test-check-match" / "check" / "photo.jpg"
        assert photo.read_bytes() == published["photo"]
        # scored exactly as `mlsp score --model NAME PHOTO`
        res = invoke("score", "--model", "test-check-match", photo, env={pt.CATALOGUE_ENV: str(catalogue)})
        assert res.exit_code == 0, res.output
        assert f"{score:.4f}" in res.output
        # the shifted value, checked after the first again: one line with the figures, exit 1
        requests = len(server.requests)
        res = invoke("models", "--check", "test-check-match", "test-check-shift", "--json", "--catalogue", catalogue)
        assert res.exit_code == 1
        message = error_line(res.output)
        assert message.startswith("Error: test-check-shift: ") and "test-check-match" not in message
        assert f"published {shifted:.6f}" in message and f"scores {score:.6f}" in message
        assert f"difference {score - shifted:+.6f}" in message and "more than the tolerance 0.002" in message
        rows = json.loads(res.output[res.output.index("[\n"):res.output.index("Error:")])
        assert [(r["name"], r["passed"]) for r in rows] == [("test-check-match", True), ("test-check-shift", False)]
        assert rows[0]["score"] == rows[1]["score"] == pytest.approx(score, abs=1e-6)
        assert rows[1]["difference"] == pytest.approx(score - shifted)
        shift_files = {"/m/photo.jpg", "/m/model_best_weights.h5"}
        assert {p for p, _ in server.requests[requests:]} == shift_files and len(server.requests) == requests + 2, \
            "the first model's photo and head come from the cache"


def test_a_photo_of_another_sha256_is_refused_and_nothing_is_scored(small, tmp_path, model_home, monkeypatch):
    published = small

    def no_model(*args, **kwargs):
        raise AssertionError("nothing is scored when a file is refused")

    monkeypatch.setattr("heads.score.released.PretrainedModel", no_model)
    with FileServer() as server:
        head_url = server.add("/h.h5", published["head"])
        photo_url = server.add("/p.jpg", published["photo"])
        wrong = hashlib.sha256(published["photo"] + b"!").hexdigest()
        catalogue = tmp_path / "wrong.json"
        catalogue.write_text(json.dumps({"models": [entry("test-check-wrong", published, head_url, [photo_url],
                                                          photo_sha256=wrong)]}))
        res = invoke("models", "--check", "test-check-wrong", "--catalogue", catalogue)
    assert res.exit_code == 1
    message = error_line(res.output)
    actual = hashlib.sha256(published["photo"]).hexdigest()
    assert "cannot check test-check-wrong: the photo could not be fetched" in message
    assert f"gave sha256 {actual}, expected sha256 {wrong}" in message
    photo = model_home / "mlsp" / "models" / "test-check-wrong" / "check" / "photo.jpg"
    assert not photo.exists() and os.listdir(photo.parent) == []
    assert "the head model_best_weights.h5" in message and "[here]" in message


def test_offline_one_line_names_the_three_files_and_where_to_put_them(small, tmp_path, model_home, monkeypatch):
    """Offline (every URL refused; Keras' download of the ImageNet weights fails): one line naming
    the weights, the head and the photo, each with where it goes."""
    def offline(spec):
        try:
            raise OSError("name or service not known")
        except OSError as exc:
            raise WeightsUnavailableError(f"ImageNet weights for {spec.name} could not be loaded") from exc

    monkeypatch.setattr(pc, "fetch_imagenet_weights", offline)
    head_url, photo_url = closed_port_url("/h.h5"), closed_port_url("/p.jpg")
    catalogue = tmp_path / "offline.json"
    catalogue.write_text(json.dumps({"models": [entry("test-check-offline", small, head_url, [photo_url])
                                                | {"backbone_weights": "imagenet"}]}))
    res = invoke("models", "--check", "test-check-offline", "--catalogue", catalogue)
    assert res.exit_code == 1
    message = error_line(res.output)
    models = model_home / "mlsp" / "models" / "test-check-offline"
    assert "the photo, head and backbone weights could not be fetched" in message
    assert "needs 3 files" in message
    assert f"the photo photo.jpg ({len(small['photo']):,} bytes" in message
    assert f"at {models / 'check' / 'photo.jpg'} [missing: {photo_url}: connection refused]" in message
    assert f"at {models / 'model_best_weights.h5'} [missing: {head_url}: connection refused]" in message
    weights = model_home / "models" / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f"at {weights} [missing: name or service not known]" in message


def test_the_docs_catalogue_example_with_a_check_is_a_valid_catalogue(tmp_path):
    """docs/pretrained.md's TOML example (a mirror of the wide model with the authors' check) reads
    as a catalogue whose check is the built-in one's but for its URLs."""
    import re

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "pretrained.md")
    block, = re.findall(r"```toml\n(# team-models.*?)```", open(docs, encoding="utf-8").read(), flags=re.S)
    path = tmp_path / "team-models.toml"
    path.write_text(block)
    spec, = pt.load_catalogue(path)
    built_in = pt.published_check(pt.PRETRAINED.get("ava-mlsp-irv2-wide"))
    check = pt.published_check(spec)
    assert check.photo_urls != built_in.photo_urls
    assert {**vars(check), "photo_urls": (), "source": ""} == {**vars(built_in), "photo_urls": (), "source": ""}
