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
    out = tmp_path / "maps"
    result = CliRunner().invoke(cli.main, ["explain", str(photo), str(broken), "--run", tiny_run, "--out", str(out),
                                           "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "1 saliency maps, 1 files skipped" in result.output and "broken.jpg" in result.output
    assert "Traceback" not in result.output
    raw = np.load(out / "photo.npy")
    assert raw.shape == (100, 132) and raw.dtype == np.float32 and raw.max() == pytest.approx(1.0)
    from PIL import Image

    with Image.open(out / "photo.png") as overlay:
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
