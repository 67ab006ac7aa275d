"""SmoothGrad saliency (heads.report.saliency, mlsp explain): the map's mass falls where the score comes
from, TensorFlow and PyTorch give the same map, float32 and bfloat16 maps agree, and the CLI
writes an overlay and a raw map per photo at the photo's size, listing files it cannot use."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import saliency_worker
from helpers import write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_saliency_falls_in_the_region_the_score_depends_on():
    saliency = saliency_worker.saliency()
    top, bottom, left, right = saliency_worker.REGION
    assert saliency.shape == (saliency_worker.SIZE, saliency_worker.SIZE)
    assert saliency.max() == pytest.approx(1.0)
    inside = saliency[top:bottom, left:right].sum()
    assert inside / saliency.sum() > 0.999
    # and it is not merely the region's frame: most of the region's pixels carry saliency
    assert (saliency[top:bottom, left:right] > 0.01).mean() > 0.5


def test_noise_and_samples_change_the_map_as_smoothgrad_says():
    """Without noise every sample is the plain gradient; with noise the map is smoother (the
    SmoothGrad paper's point): its pixel-to-pixel variation inside the region drops."""
    from heads.report.saliency import score_function, smoothgrad

    fn = score_function(saliency_worker.region_model())
    img = saliency_worker.image()
    plain = smoothgrad(fn, img, 1, 0.0)
    again = smoothgrad(fn, img, 3, 0.0, seed=5)
    np.testing.assert_allclose(plain, again, atol=1e-5)
    smooth = smoothgrad(fn, img, 30, 0.15)
    top, bottom, left, right = saliency_worker.REGION

    def roughness(m):
        r = m[top:bottom, left:right]
        return np.abs(np.diff(r, axis=1)).mean() / r.mean()

    assert roughness(smooth) < roughness(plain)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed (the torch extra)")
def test_tensorflow_and_torch_give_the_same_map(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    out = tmp_path / "torch.npy"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "saliency_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    torch_map, tf_map = np.load(out), saliency_worker.saliency()
    # float32 on both; the maps are normalised to a maximum of 1: they agree to 1e-4 of it
    np.testing.assert_allclose(torch_map, tf_map, atol=1e-4)
    assert np.corrcoef(torch_map.ravel(), tf_map.ravel())[0, 1] > 0.9999


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, extractors):
    """A single1fc run on 8 small images of a random iv3 (narrow; 2 of them the test split),
    trained for one short epoch."""
    from mlsp import api
    from mlsp.extraction.job import ExtractConfig, extract

    root = tmp_path_factory.mktemp("explain")
    for k in range(8):
        write_image(root / "imgs" / f"im{k}.png", 96 + 8 * (k % 3), 112, seed=k)
    labels = root / "labels.csv"
    labels.write_text("id,mos\n" + "".join(f"im{k},{3 + 0.5 * k}\n" for k in range(8)))
    tests = root / "test.txt"
    tests.write_text("im6\nim7\n")
    store = str(root / "store.h5")
    extract(str(root / "imgs"), ExtractConfig(net="iv3", weights="random:0"), store, labels=str(labels),
            test_list=str(tests), val_fraction=0.34, extractor=extractors(net="iv3"))
    return api.train(store, head="single1fc", out=str(root / "run"), epochs=1, steps_per_epoch=2, lr=1e-3).run_dir


@pytest.mark.slow
def test_explain_cli_writes_maps_at_each_photos_size(tmp_path, tiny_run):
    import cli

    photo = write_image(tmp_path / "in" / "photo.jpg", 100, 132, seed=11)
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    small = write_image(tmp_path / "in" / "small.png", 30, 40, seed=12)  # below iv3's 75 px: listed, not a traceback
    out = tmp_path / "maps"
    result = CliRunner().invoke(cli.main, ["explain", str(photo), str(broken), str(small), "--run", tiny_run,
                                           "--out", str(out), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "1 saliency maps, 2 files skipped" in result.output and "broken.jpg" in result.output
    assert "small.png: too small: 30x40 px, crops of 26x35 below the 75 px per side that iv3 needs" in result.output
    assert "Traceback" not in result.output
    raw = np.load(out / "photo.mlsp-saliency.npy")
    assert raw.shape == (100, 132) and raw.dtype == np.float32 and raw.max() == pytest.approx(1.0)
    from PIL import Image

    with Image.open(out / "photo.mlsp-saliency.png") as overlay:
        assert overlay.size == (132, 100) and overlay.mode == "RGB"


@pytest.mark.slow
def test_float32_and_bfloat16_maps_correlate(tmp_path, tiny_run):
    from heads.report.saliency import RunModel, score_function, smoothgrad

    img = np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.float32)
    maps = {}
    for precision in ("float32", "bfloat16"):
        scorer = RunModel(tiny_run, precision=precision)
        maps[precision] = smoothgrad(score_function(scorer.model), img, 3, 0.15, batch=3)
    assert np.isfinite(maps["bfloat16"]).all()
    assert np.corrcoef(maps["float32"].ravel(), maps["bfloat16"].ravel())[0, 1] > 0.8


def views_model(distribution: bool = False):
    """A small scoring model built as `mlsp export` builds one: the 8 views (ViewCrops), a
    per-view convolution and head, the mean over the views (and a distribution head's MOS)."""
    import keras

    from heads.layers import HistogramMoments
    from mlsp.backbone.layers import ViewCrops, ViewMean

    keras.utils.set_random_seed(4)
    x = keras.Input((None, None, 3))
    views = ViewCrops(augment=True, name="views")(x)
    scaled = keras.layers.Rescaling(1 / 255.0)(views)
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="tanh")(scaled))
    if not distribution:
        return keras.Model(x, ViewMean(8)(keras.layers.Dense(1)(features)))
    hist = ViewMean(8)(keras.layers.Dense(10, activation="softmax")(features))
    mos, std = HistogramMoments()(hist)
    return keras.Model(x, {"mos": mos, "opinion_std": std, "distribution": hist})


class Scorer:
    def __init__(self, model, min_side=32, net="a 32-px net"):
        self.model, self.max_side, self.min_side, self.net = model, 0, min_side, net


@pytest.mark.parametrize("distribution", [False, True])
def test_maps_in_chunks_of_views_are_the_whole_models_map(distribution):
    """Memory is bounded by splitting a photo's views over calls: the map is the same."""
    from heads.report.saliency import ViewChunks, score_function, smoothgrad

    model = views_model(distribution)
    img = np.random.default_rng(1).integers(0, 256, (48, 64, 3)).astype(np.float32)
    view_pixels = 42 * 56  # 0.875 of each side
    chunks = ViewChunks(model, pixels=3 * view_pixels)
    parts, per_call = chunks.plan(img)
    assert len(parts) == 3 and per_call == 1  # views 0:3, 3:6, 6:8
    whole = smoothgrad(score_function(model), img, 4, 0.1, batch=2, seed=3)
    split = smoothgrad(parts, img, 4, 0.1, batch=per_call, seed=3)
    np.testing.assert_allclose(split, whole, atol=1e-4)
    roomy = ViewChunks(model, pixels=8 * view_pixels * 3)
    parts, per_call = roomy.plan(img)
    assert len(parts) == 1 and per_call == 3


def test_explain_bounds_each_call_and_shows_progress_per_photo(tmp_path, monkeypatch):
    """No forward-and-back call holds more than PIXELS_PER_CALL view pixels, however many samples;
    each photo has its own bar over its calls (tqdm's expected time)."""
    from heads.report import saliency
    from mlsp.runtime import backend

    monkeypatch.setattr(saliency, "PIXELS_PER_CALL", 2 * 42 * 56)  # two views of a 48x64 photo
    calls = []
    real = backend.input_gradient
    monkeypatch.setattr(backend, "input_gradient", lambda fn, x: calls.append(x.shape) or real(fn, x))
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    for k in range(2):
        write_image(tmp_path / "in" / f"p{k}.png", 48, 64, seed=k)
    done, errors = saliency.explain(str(tmp_path / "in"), Scorer(views_model()), str(tmp_path / "out"), samples=3,
                                    progress=lambda total, desc, unit: Bar(total, desc, unit))
    assert len(done) == 2 and not errors
    assert len(calls) == 2 * 3 * 4 and all(shape == (1, 48, 64, 3) for shape in calls)
    assert [(b.desc, b.total, b.n) for b in bars] == [("explain 1/2 p0", 12, 12), ("explain 2/2 p1", 12, 12)]


def test_explain_into_the_photos_folder_never_replaces_or_adds_a_photo(tmp_path):
    """`mlsp explain DIR --out DIR` once wrote its overlay over photo.png, and other.png beside
    other.jpg, which the next run took for a photo."""
    from heads.report.saliency import explain
    from mlsp.images.decode import list_images

    photos = tmp_path / "photos"
    png = write_image(photos / "photo.png", 48, 64, seed=1)
    write_image(photos / "other.jpg", 56, 48, seed=2)
    before = open(png, "rb").read()
    scorer = Scorer(views_model())
    done, errors = explain(str(photos), scorer, str(photos), samples=2)
    assert len(done) == 2 and not errors
    assert open(png, "rb").read() == before
    images, others = list_images(str(photos))
    assert [os.path.basename(p) for p in images] == ["other.jpg", "photo.png"]
    assert sorted(os.path.basename(p) for p, _ in others) == [
        "other.mlsp-saliency.npy", "other.mlsp-saliency.png", "photo.mlsp-saliency.npy", "photo.mlsp-saliency.png"]
    assert all("written by mlsp explain" in reason for _, reason in others)
    again, skipped = explain(str(photos), scorer, str(photos), samples=2)
    assert sorted(e.id for e in again) == ["other", "photo"] and len(skipped) == 4
    assert open(png, "rb").read() == before


def test_photos_too_small_for_the_backbone_are_listed_and_the_batch_goes_on(tmp_path):
    from heads.report.saliency import explain

    write_image(tmp_path / "in" / "a_ok.png", 48, 64, seed=1)
    write_image(tmp_path / "in" / "b_dot.png", 1, 1, seed=2)
    write_image(tmp_path / "in" / "c_small.png", 30, 40, seed=3)
    done, errors = explain(str(tmp_path / "in"), Scorer(views_model()), str(tmp_path / "out"), samples=1)
    assert [e.id for e in done] == ["a_ok"]
    reasons = {e["id"]: e["reason"] for e in errors}
    assert reasons == {"b_dot": "too small: 1x1 px, crops of 0x0 below the 32 px per side that a 32-px net needs",
                       "c_small": "too small: 30x40 px, crops of 26x35 below the 32 px per side that a 32-px net needs"}
