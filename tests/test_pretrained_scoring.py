"""Released models as mlsp heads (heads/score/released.py): the test-time views
(mlsp/images/views.py), `mlsp score --model` on images and on a store, the kept conversion, export.

A small catalogue entry per view procedure (iv3 narrow, a random backbone, a small single3fc in
the authors' Keras 2 layout): the procedures are the same code for any backbone and head.
"""

import itertools
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cli
from mlsp.errors import StoreConfigMismatch
from helpers import write_image
from keras2_files import authors_layers, calibrated, forward, write_keras2
from mlsp.images.views import VIEW_PROCEDURES, crop_origin, get_procedure

IV3_CHANNELS = 10048
SIZES = [(120, 160), (150, 110), (133, 187), (101, 101)]
WIDTH = 64  # the heads' 3FC: 64, 32, 8, 1


def _coordinates(h, w):
    """An image whose pixel (y, x) holds (y, x, 7): every view says where it came from."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.int32)


def test_crops18_are_the_authors_crops():
    """kutils extract_patch under Python 2: a crop of floor(0.875 * side) whose corner is
    int(side * position - crop // 2) clipped into the image; positions 0, 0.5, 1 on each axis
    (height first), each as it is and mirrored, in that order."""
    assert (crop_origin(101, 88, 0.5), crop_origin(100, 87, 0.5), crop_origin(100, 87, 1.0)) == (6, 7, 13)
    assert crop_origin(100, 87, 0.0) == 0
    procedure = get_procedure("crops18")
    h, w = 101, 150
    views = procedure.make(_coordinates(h, w))
    assert views.shape == (18, 88, 131, 3)
    expected = list(itertools.product([(0, 0), (0, 10), (0, 19), (6, 0), (6, 10), (6, 19), (13, 0), (13, 10), (13, 19)],
                                      [False, True]))
    for view, ((y, x), flip) in zip(views, expected):
        assert tuple(view[0, -1 if flip else 0, :2]) == (y, x)
        assert tuple(view[-1, 0 if flip else -1, :2]) == (y + 87, x + 130)
    full = get_procedure("full")
    assert full.make(_coordinates(h, w)).shape == (1, h, w, 3) and full.store_views == ("full",)


@pytest.mark.parametrize("name", VIEW_PROCEDURES.names())
def test_every_procedure_in_the_graph_equals_its_views(name):
    """The exported model's views layer makes exactly the views scoring files makes."""
    from mlsp.backbone.layers import PositionCrops

    p = get_procedure(name)
    layer = PositionCrops(p.fraction, p.positions, p.flips)
    for h, w in SIZES:
        img = _coordinates(h, w)
        got = np.asarray(layer(img[None].astype(np.float32)))
        np.testing.assert_array_equal(got, p.make(img).astype(np.float32))
        assert layer.n_views == p.n_views == len(got)


def _view_features(extractor, procedure, paths):
    """Each image's views' features, rounded to float16 as mlsp stores them."""
    from mlsp.images.decode import decode_image

    return [extractor(procedure.make(decode_image(str(p), extractor.config.max_side))).astype(np.float16)
            .astype(np.float32) for p in paths]


@pytest.fixture(scope="module")
def released(tmp_path_factory, extractors):
    """Images, and per view procedure a Keras 2 head file with its catalogue entry."""
    from heads.score import catalogue as pretrained
    root = tmp_path_factory.mktemp("released")
    paths = [write_image(root / "images" / f"photo{k}.jpg", h, w, seed=k) for k, (h, w) in enumerate(SIZES)]
    models = {}
    for seed, views in enumerate(("full", "crops18")):
        features = _view_features(extractors(net="iv3", augment=False), get_procedure(views), paths)
        layers = calibrated(authors_layers("single3fc", IV3_CHANNELS, WIDTH, seed=10 + seed), features)
        path = str(write_keras2(root / views / "model_best_weights.h5", layers))
        from mlsp.runtime.files import file_sha256

        sha = file_sha256(path)
        spec = pretrained.PretrainedSpec(
            name=f"test-iv3-narrow-{views}-{sha[:8]}", net="iv3", pooling="narrow", head="single3fc",
            head_options={"width": WIDTH}, views=views, file_name="model_best_weights.h5", size=os.path.getsize(path),
            sha256=sha, urls=(), source="tests", paper={}, backbone_weights="random:0")
        pretrained.PRETRAINED.register(spec)
        models[views] = {"path": path, "layers": layers, "spec": spec}
    return {"root": root, "images": str(root / "images"), **models}


def _error_lines(output):
    """The error the command ended with (besides it, log lines: a random backbone's warning,
    the catalogue's check of the file), which must be one line, the last."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors and lines[-1] == errors[-1], output
    return errors


def _authors_scores(extractor, procedure, paths, layers):
    """The authors' procedure written out: views, features, the Keras 2 head in numpy, the mean
    over the views."""
    return np.array([forward("single3fc", f, layers).mean() for f in _view_features(extractor, procedure, paths)])


@pytest.mark.slow
def test_score_model_on_images_equals_its_store_and_the_authors_computation(released, tmp_path, extractors):
    """`mlsp score --model PATH --images DIR` = `mlsp score --model PATH --store STORE` of the same
    images extracted whole (the `full` model's views) = the authors' computation."""
    from mlsp.extraction.job import ExtractConfig, extract

    model = released["full"]
    runner = CliRunner()
    res = runner.invoke(cli.main, ["score", "--model", model["path"], "--images", released["images"],
                                   "--out", str(tmp_path / "images.csv")])
    assert res.exit_code == 0, res.output
    from_images = pd.read_csv(tmp_path / "images.csv", dtype={"id": str})
    store = str(tmp_path / "iv3_narrow_noaug.h5")
    extract(released["images"], ExtractConfig(net="iv3", augment=False, weights="random:0"), store,
            extractor=extractors(net="iv3", augment=False))
    res = runner.invoke(cli.main, ["score", "--model", model["path"], "--store", store,
                                   "--out", str(tmp_path / "store.csv")])
    assert res.exit_code == 0, res.output
    from_store = pd.read_csv(tmp_path / "store.csv", dtype={"id": str})
    merged = from_images.merge(from_store, on="id", suffixes=("_images", "_store"))
    assert len(merged) == len(SIZES)
    np.testing.assert_allclose(merged["pred_images"], merged["pred_store"], rtol=1e-5)
    assert (merged["pred_std_images"] == 0).all(), "one view"
    authors = _authors_scores(extractors(net="iv3", augment=False), get_procedure("full"), merged["path"],
                              model["layers"])
    np.testing.assert_allclose(merged["pred_images"], authors, rtol=1e-4)
    assert np.ptp(authors) > 0.1, "the images get different scores"


@pytest.mark.slow
def test_crops18_model_scores_its_18_views_and_refuses_a_store(released, tmp_path, extractors):
    from heads.score.export import load_exported
    from mlsp import api
    from mlsp.images.decode import decode_image
    from heads.score.released import open_model

    model = released["crops18"]
    scorer = open_model(model["path"], extractor=extractors(net="iv3", augment=False))
    frame = scorer.score(released["images"])
    assert frame.attrs["errors"] == [] and len(frame) == len(SIZES)
    authors = _authors_scores(scorer.extractor, get_procedure("crops18"), frame["path"], model["layers"])
    np.testing.assert_allclose(frame["pred"], authors, rtol=1e-4)
    assert np.ptp(authors) > 0.1 and (frame["pred_std"] > 0.01).all(), "18 different views"
    one_view = _authors_scores(scorer.extractor, get_procedure("full"), frame["path"], model["layers"])
    assert np.max(np.abs(one_view - authors)) > 0.01, "the 18 views are not the whole image"
    # the exported model: image in, the mean over the same 18 views out
    out = scorer.export(str(tmp_path / "crops18.keras"))
    exported = load_exported(out)
    first = frame["path"].iloc[0]
    got = np.asarray(exported(decode_image(first, 1024)[None].astype(np.float32)))
    np.testing.assert_allclose(got, frame["pred"].iloc[:1], rtol=1e-3)
    # a store holds other views (8 corner crops): refused, saying what to do
    from mlsp.backbone.nets import get_backbone
    from synthetic import write_synthetic_store

    store = str(tmp_path / "iv3_narrow.h5")
    write_synthetic_store(store, n_images=3, n_views=8, block_channels=get_backbone("iv3").channels, net="iv3")
    res = CliRunner().invoke(cli.main, ["score", "--model", model["path"], "--store", store])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert store in res.output and "score the images" in res.output
    assert len(_error_lines(res.output)) == 1
    with pytest.raises(StoreConfigMismatch, match="--no-augment"):
        api.score(model=released["full"]["path"], store=store)


def test_conversion_is_kept_beside_the_file_and_used_only_if_its_hash_is_recorded(released, caplog):
    from heads.score.released import conversions, converted_path, open_model
    from mlsp.runtime.files import file_sha256

    model = released["full"]
    first = open_model(model["path"])
    kept = converted_path(model["path"], model["spec"].sha256)
    assert first.head_path == kept and os.path.isfile(kept) and not os.path.exists(kept + ".json")
    # recorded outside the model's folder, by mlsp, bound to the pinned sha256 of the source
    assert conversions().trusted(f"{model['spec'].sha256}:{kept}") == file_sha256(kept) == first.head_sha256
    assert os.path.dirname(conversions().path) != os.path.dirname(kept)
    stamp = os.stat(kept).st_mtime_ns
    x = np.abs(np.random.default_rng(0).normal(size=(2, IV3_CHANNELS))).astype(np.float32)
    want = forward("single3fc", x, model["layers"])
    assert open_model(model["path"]).head_path == kept and os.stat(kept).st_mtime_ns == stamp
    with open(kept, "ab") as handle:  # a changed file is not the one mlsp wrote
        handle.write(b"\0")
    again = open_model(model["path"])
    assert "not the conversion mlsp recorded" in caplog.text
    np.testing.assert_allclose(again.head.predict(x, verbose=0)[:, 0], want, rtol=1e-5)
    np.testing.assert_allclose(first.head.predict(x, verbose=0)[:, 0], want, rtol=1e-5)


def test_a_planted_conversion_with_a_record_beside_it_is_not_believed(released, tmp_path, caplog):
    """Another head (the authors' file shifted by +100) saved under the conversion's name, with the
    record older versions of mlsp believed beside it, is converted again from the pinned file."""
    import json

    from heads.score.keras2 import import_head
    from heads.score.released import converted_path, open_model
    from mlsp.backbone.nets import get_backbone
    from mlsp.runtime.files import file_sha256

    model = released["full"]
    kept = converted_path(model["path"], model["spec"].sha256)
    open_model(model["path"])
    x = np.abs(np.random.default_rng(1).normal(size=(3, IV3_CHANNELS))).astype(np.float32)
    want = forward("single3fc", x, model["layers"])
    planted_layers = [(layer, {**tensors, "bias": tensors["bias"] + 100.0} if layer == "head_out" else tensors)
                      for layer, tensors in model["layers"]]
    planted, _ = import_head(str(write_keras2(tmp_path / "planted.h5", planted_layers)), "single3fc",
                             get_backbone("iv3").channels, "narrow", options={"width": WIDTH})
    assert abs(planted.predict(x, verbose=0)[:, 0] - want - 100).max() < 1e-3
    planted.save(kept)
    with open(kept + ".json", "w") as handle:
        json.dump({"source": model["path"], "source_sha256": model["spec"].sha256, "model": model["spec"].name,
                   "head": "single3fc", "sha256": file_sha256(kept)}, handle)
    again = open_model(model["path"])
    assert "not the conversion mlsp recorded" in caplog.text
    np.testing.assert_allclose(again.head.predict(x, verbose=0)[:, 0], want, rtol=1e-5)
    assert file_sha256(kept) == again.head_sha256 and again.head_path == kept


def test_a_file_not_in_the_catalogue_is_refused_in_one_line(released, tmp_path):
    path = write_keras2(tmp_path / "mine.h5", authors_layers("single3fc", IV3_CHANNELS, 16, seed=99))
    res = CliRunner().invoke(cli.main, ["score", "--model", str(path), "--images", released["images"]])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert str(path) in res.output and "mlsp import-weights" in res.output
    assert len(_error_lines(res.output)) == 1
    res = CliRunner().invoke(cli.main, ["score", "--images", released["images"]])
    assert res.exit_code == 2 and "--model" in res.output


@pytest.mark.slow
def test_explain_takes_a_released_model(released, tmp_path):
    """`mlsp explain --model PATH` maps a photo through the released model's own views, backbone and
    head; a run and a model together, or neither, is one line."""
    from mlsp.images.decode import decode_image

    photo = sorted(os.listdir(released["images"]))[0]
    path = os.path.join(released["images"], photo)
    out = tmp_path / "saliency"
    res = CliRunner().invoke(cli.main, ["explain", path, "--model", released["crops18"]["path"], "--out", str(out),
                                        "--samples", "2"])
    assert res.exit_code == 0, res.output
    saliency = np.load(out / (os.path.splitext(photo)[0] + ".mlsp-saliency.npy"))
    assert saliency.shape == decode_image(path).shape[:2]
    assert np.isfinite(saliency).all() and saliency.max() == pytest.approx(1.0) and saliency.min() >= 0
    assert (out / (os.path.splitext(photo)[0] + ".mlsp-saliency.png")).exists()
    for args in ([], ["--model", released["full"]["path"], "--run", str(tmp_path)]):
        res = CliRunner().invoke(cli.main, ["explain", path, "--out", str(out), *args])
        assert res.exit_code == 1 and _error_lines(res.output) == [
            "Error: explain needs one model: a trained run (--run RUN_DIR) or a released model (--model NAME|PATH)"]


@pytest.mark.slow
def test_precision_auto_works_with_a_released_model_for_score_export_and_explain(released, tmp_path):
    """`--precision auto` is resolved once, where the backbone's configuration is made
    (ExtractConfig), so it works with --model as it does for extract: score, export, explain."""
    from mlsp.runtime.precision import AUTO, resolve

    chosen, _ = resolve(AUTO)
    model, runner = released["full"]["path"], CliRunner()
    out = tmp_path / "auto.csv"
    assert chosen in ("float32", "bfloat16")
    res = runner.invoke(cli.main, ["score", "--model", model, "--images", released["images"], "--out", str(out),
                                   "--precision", AUTO])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(out, dtype={"id": str})
    assert len(scores) == len(SIZES) and scores["pred"].notna().all()
    res = runner.invoke(cli.main, ["export", "--model", model, "--precision", AUTO, "--out", str(tmp_path / "m.keras")])
    assert res.exit_code == 0 and (tmp_path / "m.keras").is_file(), res.output
    photo = os.path.join(released["images"], sorted(os.listdir(released["images"]))[0])
    res = runner.invoke(cli.main, ["explain", photo, "--model", model, "--precision", AUTO, "--samples", "1",
                                   "--out", str(tmp_path / "saliency")])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_readme_score_your_photos_by_name_from_a_served_catalogue(released, tmp_path, monkeypatch):
    """README's command, `mlsp score --model NAME --images DIR --out scores.csv`, as a user with a
    catalogue file of their own (MLSP_MODELS) and a mirror (here a server on 127.0.0.1) runs it:
    the file is fetched once into the Keras cache, checked, and scores as the same file given by path."""
    import json

    from heads.score import catalogue as pretrained
    from http_files import FileServer

    model = released["full"]
    data = open(model["path"], "rb").read()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    with FileServer() as server:
        url = server.add("/mirror/model_best_weights.h5", data, cut_after=len(data) // 3)  # a broken first try
        name = "served-" + model["spec"].sha256[:8]
        catalogue = tmp_path / "team.json"
        catalogue.write_text(json.dumps({"models": [{
            "name": name, "net": "iv3", "pooling": "narrow", "head": "single3fc",
            "head_options": {"width": WIDTH}, "views": "full", "file_name": "model_best_weights.h5",
            "size": len(data), "sha256": model["spec"].sha256, "urls": ["http://127.0.0.1:9/refused.h5", url],
            "source": "a team mirror", "paper": {}, "backbone_weights": "random:0"}]}))
        monkeypatch.setenv(pretrained.CATALOGUE_ENV, str(catalogue))
        res = CliRunner().invoke(cli.main, ["score", "--model", name, "--images", released["images"],
                                            "--out", str(tmp_path / "scores.csv")])
        assert res.exit_code == 0, res.output
        fetched = [r for p, r in server.requests if p == "/mirror/model_best_weights.h5"]
        assert len(fetched) == 2 and fetched[1] is not None, "the cut download was resumed with a Range request"
    by_name = pd.read_csv(tmp_path / "scores.csv", dtype={"id": str})
    res = CliRunner().invoke(cli.main, ["score", "--model", model["path"], "--images", released["images"],
                                        "--out", str(tmp_path / "by_path.csv")])
    assert res.exit_code == 0, res.output
    by_path = pd.read_csv(tmp_path / "by_path.csv", dtype={"id": str})
    assert len(by_name) == len(SIZES) and by_name["id"].tolist() == by_path["id"].tolist()
    np.testing.assert_allclose(by_name["pred"], by_path["pred"], rtol=1e-6)


@pytest.mark.slow
def test_personalize_adapts_a_released_model(released, tmp_path, extractors):
    """`mlsp personalize --model PATH` adapts a released head to one person from a store of the
    model's own features; the personal model names that model and its sha256; a store of other
    views is refused in one line."""
    import json

    from mlsp.extraction.job import ExtractConfig, extract

    images = tmp_path / "photos"
    for k in range(8):
        write_image(images / f"p{k}.jpg", 96 + 4 * k, 120 - 3 * k, seed=40 + k)
    store = str(tmp_path / "noaug.h5")
    extract(str(images), ExtractConfig(net="iv3", augment=False, weights="random:0"), store,
            extractor=extractors(net="iv3", augment=False))
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user,image,score\n" + "".join(f"ann,p{k}.jpg,{1 + k % 5}\n" for k in range(8)))
    model = released["full"]
    args = ["personalize", "--model", model["path"], "--store", store, "--ratings", str(ratings), "--user", "ann"]
    res = CliRunner().invoke(cli.main, args + ["--out", str(tmp_path / "ann")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ann" / "personal.json").read_text())
    assert meta["generic"]["model"] == model["spec"].name and meta["generic"]["sha256"] == model["spec"].sha256
    assert meta["generic"]["run"] is None and meta["n_ratings"] == 8
    res = CliRunner().invoke(cli.main, ["personalize", "--model", released["crops18"]["path"], "--store", store,
                                        "--ratings", str(ratings), "--user", "ann", "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and "averages" in _error_lines(res.output)[0]
