"""Extraction end to end: the store's content, labels and splits, bad inputs, resume after an
interruption, refusal to mix configurations, and features equal to an independent computation."""

import os

import cv2
import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers import ctrl_c_after, write_image
from mlsp.extraction import job as ex_mod
from mlsp.errors import StoreConfigMismatch
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.store.read import FeatureStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ava_line(index, image_id, votes):
    return " ".join(str(v) for v in [index, image_id, *votes, 0, 0, 1]) + "\n"


def store_arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("features", "ids", "paths", "sizes", "mos", "votes", "split", "views")}


def assert_same_store(a, b, float16_steps=0):
    """The same store; ``float16_steps``: features may differ by that many float16 roundings (two
    summation orders of float32 convolutions, e.g. batches of other sizes on an AVX2 CPU)."""
    x, y = store_arrays(a), store_arrays(b)
    for key in x:
        if key == "features" and float16_steps:
            np.testing.assert_allclose(x[key].astype(np.float32), y[key].astype(np.float32),
                                       rtol=float16_steps * 2.0 ** -10, atol=float16_steps * 2.0 ** -24, err_msg=key)
        elif x[key].dtype.kind == "f":
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        else:
            assert x[key].tolist() == y[key].tolist(), key


def test_store_content_labels_and_bad_inputs(tmp_path, image_dir, extractors):
    # AVA ids are numbers: name the images like AVA's
    for path in sorted(image_dir.rglob("img*.png")):
        path.rename(path.with_name(path.name.replace("img", "10")))
    # bad inputs of every kind, next to the good ones
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "text.jpg").write_text("not an image")
    (image_dir / "notes.txt").write_text("a sidecar file")
    ok, jpg = cv2.imencode(".jpg", np.full((120, 120, 3), 90, np.uint8))
    (image_dir / "cut.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    write_image(image_dir / "tiny.png", 60, 200)
    os.symlink(image_dir / "gone.jpg", image_dir / "dangling.jpg")
    labels = tmp_path / "AVA.txt"
    labels.write_text(
        ava_line(1, "100", [0, 0, 0, 0, 10, 0, 0, 0, 0, 0])  # MOS 5
        + ava_line(2, "101", [0, 0, 0, 0, 0, 0, 0, 0, 0, 4])  # MOS 10
        + ava_line(3, "102", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])  # MOS 1.5
        + ava_line(4, "103", [0, 0, 2, 0, 0, 0, 0, 2, 0, 0])  # MOS 5.5
        + ava_line(5, "104", [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
        + ava_line(6, "999", [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    )
    test_list = tmp_path / "test.jpgl"
    test_list.write_text("103\n109\n")
    out = tmp_path / "s.h5"
    result = extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), str(out),
                     labels=str(labels), test_list=str(test_list), val_fraction=0.25,
                     extractor=extractors(net="iv3"))
    assert result.new == 6 and result.images == 6
    reasons = {e["path"]: e["reason"] for e in result.errors}
    assert set(reasons) == {"empty.jpg", "text.jpg", "notes.txt", "cut.jpg", "tiny.png", "dangling.jpg"}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["cut.jpg"]
    assert "too small" in reasons["tiny.png"] and "unreadable" in reasons["dangling.jpg"]
    assert "cannot decode" in reasons["text.jpg"] and "not an image file type" in reasons["notes.txt"]

    with FeatureStore(str(out)) as s:
        assert s.ids.tolist() == ["100", "101", "102", "103", "sub/104", "sub/105"]
        assert s.paths.tolist() == ["100.png", "101.png", "102.png", "103.png", "sub/104.png", "sub/105.png"]
        assert s.views == ["tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip"]
        assert s.features.shape == (6, 8, 10048) and s.features.dtype == np.float16
        assert s.features.chunks == (1, 8, 10048)
        np.testing.assert_allclose(s.mos[:4], [5.0, 10.0, 1.5, 5.5])
        assert s.mos[4] == pytest.approx(6.0)  # sub/104 matched by its base name
        assert np.isnan(s.mos[5]) and np.isnan(s.votes[5]).all()
        assert s.votes[0].tolist() == [0, 0, 0, 0, 10, 0, 0, 0, 0, 0]
        assert s.split[3] == "test" and s.split[5] == "unlabeled"
        assert sorted(s.split[[0, 1, 2, 4]].tolist()) == ["train", "train", "train", "val"]
        assert s.attrs["labels_without_images"] == 1
        assert s.attrs["net"] == "iv3" and s.attrs["pooling"] == "narrow"
        assert s.attrs["weights_source"] == "random:0" and len(s.attrs["weights_sha256"]) == 64
        assert s.attrs["crop_fraction"] == 0.875 and s.attrs["precision"] == "float32"
        assert list(s.attrs["block_channels"]) == [256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048, 2048]
        # each stored image equals the extractor on its own views
        one = extractors(net="iv3").extract_file(str(image_dir / "102.png"))
        np.testing.assert_array_equal(s.read([2])[0], one.astype(np.float16))
    assert not os.path.exists(str(out) + ".partial")


def test_one_trace_for_many_sizes(tmp_path, extractors):
    ex = extractors(net="iv3", pooling="wide")
    for k, (h, w) in enumerate([(90, 90), (100, 130), (141, 97), (120, 120), (95, 180)]):
        write_image(tmp_path / f"{k}.png", h, w, seed=k)
        ex.extract_file(str(tmp_path / f"{k}.png"))
    assert ex.tracing_count == 1


def test_interrupt_keeps_finished_images_and_resume_equals_uninterrupted(tmp_path, image_dir, extractors):
    config = ExtractConfig(net="iv3", weights="random:0")
    ex = extractors(net="iv3")
    full = tmp_path / "full.h5"
    extract(str(image_dir), config, str(full), extractor=ex)

    part = tmp_path / "part.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(str(image_dir), config, str(part), extractor=ex, progress=ctrl_c_after(3), flush_images=100)
    assert not part.exists() and len(os.listdir(str(part) + ".partial")) == 2  # config.json + one shard
    result = extract(str(image_dir), config, str(part), extractor=ex)
    assert result.new == 3 and result.skipped_existing == 3
    assert_same_store(full, part)
    # a rerun finds nothing to do; a new image extends the store in sorted place
    assert extract(str(image_dir), config, str(part), extractor=ex).new == 0
    write_image(image_dir / "img25.png", 100, 100, seed=25)
    result = extract(str(image_dir), config, str(part), extractor=ex)
    assert result.new == 1 and result.images == 7
    with FeatureStore(str(part)) as s:
        assert s.ids.tolist()[:5] == ["img0", "img1", "img2", "img25", "img3"]


def test_a_killed_runs_temporary_does_not_stop_the_merge(tmp_path, image_dir, extractors):
    """Every image was kept before the stop, so the rerun only merges: a half-written shard's
    hidden temporary left by a killed writer is removed with the partial folder."""
    config = ExtractConfig(net="iv3", weights="random:0")

    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(str(image_dir), config, str(out), extractor=extractors(net="iv3"), progress=ctrl_c_after())
    partial = str(out) + ".partial"
    with open(os.path.join(partial, ".shard-9.h5.tmp-4242"), "wb") as f:
        f.write(b"half a shard")
    result = extract(str(image_dir), config, str(out), extractor=extractors(net="iv3"))
    assert (result.new, result.images) == (0, 6)
    assert out.exists() and not os.path.exists(partial)


def test_features_beyond_float16_are_listed_not_stored(tmp_path, image_dir, extractors):
    """An image whose features overflow the store's float16 (a backbone with unsuitable weights)
    is listed with the reason; the store holds only readable features."""
    from mlsp.extraction.job import OVERFLOW_REASON

    fx = extractors(net="iv3")

    class Overflowing:  # the extractor, with one image size's features past 65504 (inf in float16)
        load_views, info, store_attrs = fx.load_views, fx.info, fx.store_attrs

        def process(self, views):
            features = fx.process(views)
            return np.full_like(features, np.inf) if views.shape[1:3] == (105, 87) else features

    out = tmp_path / "s.h5"
    result = extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), str(out), extractor=Overflowing())
    assert result.new == 5 and [(e["id"], e["reason"]) for e in result.errors] == [("img1", OVERFLOW_REASON)]
    with FeatureStore(str(out)) as s:
        s.check_features()
        assert "img1" not in s.ids.tolist()


def test_other_configuration_is_refused(tmp_path, image_dir, extractors):
    out = tmp_path / "s.h5"
    extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), str(out), extractor=extractors(net="iv3"))
    wide = ExtractConfig(net="iv3", pooling="wide", weights="random:0")
    with pytest.raises(StoreConfigMismatch, match="pooling: store has 'narrow', asked for 'wide'"):
        extract(str(image_dir), wide, str(out), extractor=extractors(net="iv3", pooling="wide"))
    other_seed = ExtractConfig(net="iv3", weights="random:1")
    with pytest.raises(StoreConfigMismatch, match="weights_source"):
        extract(str(image_dir), other_seed, str(out), extractor=extractors(net="iv3", weights="random:1"))
    # an unfinished extraction is protected the same way
    os.makedirs(tmp_path / "p.h5.partial")
    (tmp_path / "p.h5.partial" / "config.json").write_text('{"net": "irv2", "pooling": "narrow"}')
    with pytest.raises(StoreConfigMismatch, match="net"):
        extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), str(tmp_path / "p.h5"),
                extractor=extractors(net="iv3"))


def test_version_1_store_is_read_but_never_extended_with_the_new_decoding(tmp_path, image_dir, extractors):
    import h5py

    from mlsp.store.read import FeatureStore

    out = tmp_path / "v1.h5"
    config = ExtractConfig(net="iv3", weights="random:0")
    extract(str(image_dir), config, str(out), extractor=extractors(net="iv3"))
    with h5py.File(out, "a") as f:  # what a store written before the decoding was recorded looks like
        del f.attrs["decoding"]
        f.attrs["format_version"] = 1
    with FeatureStore(str(out)) as s:
        assert len(s.ids) == 6
    with pytest.raises(StoreConfigMismatch, match="decoding: store has None, asked for 'mlsp-decode-2'"):
        extract(str(image_dir), config, str(out), extractor=extractors(net="iv3"))


def test_weights_file_equals_independent_computation(tmp_path):
    """Random backbone saved to a file, loaded with --weights PATH through the CLI: the stored
    wide features equal a computation with Keras, numpy crops and cv2 INTER_AREA."""
    keras.utils.set_random_seed(11)
    net = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(None, None, 3))
    weights = tmp_path / "iv3_random.weights.h5"
    net.save_weights(str(weights))
    root = tmp_path / "imgs"
    write_image(root / "a.png", 150, 170, seed=1)
    write_image(root / "b.png", 130, 101, seed=2)
    out = tmp_path / "w.h5"
    res = CliRunner().invoke(cli.main, ["extract", "--images", str(root), "--net", "iv3", "--wide",
                                        "--weights", str(weights), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    taps = keras.Model(net.input, [net.get_layer(f"mixed{i}").output for i in range(11)])
    with FeatureStore(str(out)) as s:
        assert s.attrs["weights_source"] == weights.name
        for row, name in enumerate(["a.png", "b.png"]):
            rgb = cv2.cvtColor(cv2.imread(str(root / name)), cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            ch, cw = int(np.floor(0.875 * h)), int(np.floor(0.875 * w))
            for v, (y, x, flip) in enumerate([(0, 0, 0), (0, 0, 1), (0, w - cw, 0), (0, w - cw, 1),
                                              (h - ch, 0, 0), (h - ch, 0, 1), (h - ch, w - cw, 0), (h - ch, w - cw, 1)]):
                crop = rgb[y:y + ch, x:x + cw]
                crop = crop[:, ::-1] if flip else crop
                acts = taps(crop[None].astype(np.float32) / 127.5 - 1.0)
                pooled = []
                for a in acts:
                    a = keras.ops.convert_to_numpy(a)[0]
                    pooled.append(np.stack([cv2.resize(np.ascontiguousarray(a[..., c]), (5, 5),
                                                       interpolation=cv2.INTER_AREA)
                                            for c in range(a.shape[-1])], -1))
                expected = np.concatenate(pooled, -1).astype(np.float16)
                got = s.read([row], views=[v])[0]
                np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                                           rtol=2e-3, atol=2e-4, err_msg=f"{name} view {v}")


def test_malformed_labels_fail_before_any_image(tmp_path, image_dir, monkeypatch):
    bad = tmp_path / "AVA.txt"
    bad.write_text(ava_line(1, "100", [0] * 9 + [3]) + "2 101 1 2 3\n")

    def no_model(*a, **k):
        raise AssertionError("the backbone must not be built when labels are malformed")

    monkeypatch.setattr(ex_mod, "FeatureExtractor", no_model)
    res = CliRunner().invoke(cli.main, ["extract", "--images", str(image_dir), "--net", "iv3", "--weights",
                                        "random", "--labels", str(bad), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0
    assert "AVA.txt" in res.output and "line 2" in res.output


def test_a_random_seed_store_of_another_backend_says_why(tmp_path, image_dir, extractors):
    """A store made with random:SEED on one backend, extended on the other: the same seed gives
    other weights there; the refusal says so (not only that two hashes differ)."""
    out = str(tmp_path / "s.h5")
    extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), out, extractor=extractors(net="iv3"))
    with h5py.File(out, "r+") as f:  # as PyTorch's random:0 backbone records it
        f.attrs["weights_sha256"] = "0" * 64
        f.attrs["backend"] = "torch"
    write_image(image_dir / "new.png", 100, 120, seed=9)
    with pytest.raises(StoreConfigMismatch) as info:
        extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), out, extractor=extractors(net="iv3"))
    message = str(info.value)
    assert "weights_sha256: store has '000" in message
    assert ("random:0 weights are drawn by each Keras backend's own random generator: the same seed gives other "
            "weights on another backend (made on torch, now on tensorflow). Use the backend it was made with "
            "(--backend), or another --out.") in message
    # any other difference keeps the usual advice
    assert ex_mod.random_weights_advice({"weights_sha256": (1, 2), "net": (1, 2)}, "random:0") is None
    assert ex_mod.random_weights_advice({"weights_sha256": (1, 2)}, "imagenet") is None


def test_a_process_builds_each_extractor_model_once_and_a_rewritten_weights_file_anew(tmp_path, monkeypatch):
    """The models built in a process are kept by what determines them (at most BUILT_MODELS_KEPT):
    the same configuration is not built twice, another seed or a weights file rewritten in place is."""
    import collections

    builds = []

    def build(self):
        builds.append(self.config.weights)
        return object(), {"source": self.config.weights}

    monkeypatch.setattr(ex_mod.FeatureExtractor, "_build_new_model", build)
    monkeypatch.setattr(ex_mod, "_built_models", collections.OrderedDict())
    monkeypatch.setattr(ex_mod, "BUILT_MODELS_KEPT", 2)

    def model_of(weights, pooling="narrow"):
        fx = ex_mod.FeatureExtractor.__new__(ex_mod.FeatureExtractor)  # the model alone, not its traced forward
        fx.config, fx.fold_batch_norms, fx._model = ExtractConfig(net="iv3", pooling=pooling, weights=weights), True, None
        return fx.model

    first = model_of("random:0")
    assert model_of("random:0") is first and builds == ["random:0"]
    assert model_of("random:1") is not first and model_of("random:0", "wide") is not first
    assert builds == ["random:0", "random:1", "random:0"]
    assert model_of("random:0") is not first  # pushed out by the two after it
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"weights, first version")
    from_file = model_of(str(path))
    assert model_of(str(path)) is from_file
    path.write_bytes(b"weights, second version")
    assert model_of(str(path)) is not from_file and builds.count(str(path)) == 2
