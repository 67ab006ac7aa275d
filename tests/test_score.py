"""Scoring: from a store, from image files and through the exported model, on the same run."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cli
from heads import columns
from mlsp import api
from mlsp.errors import StoreConfigMismatch
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.images.decode import decode_image
from bad_files import make_bad_files
from heads.run import Run
from heads.score.scoring import score_images, score_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_store, sample_run):
    """The session's small sample, its iv3 narrow store and a single1fc run on it; ``root`` is
    this module's own folder to write in."""
    return {"root": tmp_path_factory.mktemp("score"), **sample_store, "run": sample_run}


def test_store_and_images_agree(trained, extractors):
    from_store = score_store(trained["run"], trained["store"], str(trained["root"] / "s.csv"))
    assert list(from_store.columns) == ["id", "pred", "pred_std", "mos", "split"]
    assert len(from_store) == 16 and np.isfinite(from_store["pred"]).all()
    assert (from_store["pred_std"] > 0).all(), "8 different views give different predictions"
    from_images, errors = score_images(trained["run"], trained["images"], extractor=extractors(net="iv3"))
    assert errors == []
    merged = from_store.merge(from_images, on="id", suffixes=("_store", "_images"))
    assert len(merged) == 16
    np.testing.assert_allclose(merged["pred_images"], merged["pred_store"], atol=1e-4)
    np.testing.assert_allclose(merged["pred_std_images"], merged["pred_std_store"], atol=1e-4)
    on_disk = pd.read_csv(trained["root"] / "s.csv", dtype={"id": str})
    np.testing.assert_allclose(on_disk["pred"], from_store["pred"], rtol=1e-5)


def test_store_is_scored_in_reads_of_bounded_size(trained, monkeypatch):
    """score_store reads as many images at a time as fit in SLAB_BYTES (a wide store of irv2
    would otherwise hold gigabytes at once); the scores do not depend on it."""
    from heads.score import scoring as score
    from mlsp.store.read import FeatureStore

    expected = score_store(trained["run"], trained["store"])
    with FeatureStore(trained["store"]) as s:
        per_image = s.image_nbytes
        assert per_image == s.features[0].nbytes
    reads = []
    real_read = FeatureStore.read
    monkeypatch.setattr(FeatureStore, "read", lambda self, rows, *a, **k: reads.append(len(rows)) or real_read(
        self, rows, *a, **k))
    monkeypatch.setattr(score, "SLAB_BYTES", 5 * per_image + 1)
    pd.testing.assert_frame_equal(score_store(trained["run"], trained["store"]), expected)
    assert reads == [5, 5, 5, 1]


def test_bad_image_files_are_reported_and_skipped(trained, tmp_path, extractors):
    folder = tmp_path / "mixed"
    shutil.copytree(trained["images"], folder)
    bad = make_bad_files(str(folder))
    out = tmp_path / "scores.csv"
    frame, errors = score_images(trained["run"], str(folder), str(out), extractor=extractors(net="iv3"))
    assert len(frame) == 16
    assert sorted(os.path.basename(e["path"]) for e in errors) == sorted(bad)
    for e in errors:
        assert bad[os.path.basename(e["path"])] in e["reason"]
    written = pd.read_csv(out, dtype={"id": str})
    assert written["error"].notna().sum() == len(bad)
    assert written["pred"].notna().sum() == 16


def test_exported_model_gives_the_same_numbers(trained, tmp_path):
    """`mlsp export` writes one model that plain keras.saving.load_model opens in safe mode."""
    import keras

    path = str(tmp_path / "m.keras")
    res = CliRunner().invoke(cli.main, ["export", trained["run"], "--out", path])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == f"exported: {path}"
    model = keras.saving.load_model(path, safe_mode=True)
    assert model.get_layer("fit_max_side").max_side == Run.open(trained["run"]).extract_config().max_side == 1024
    scores = score_store(trained["run"], trained["store"]).set_index("id")
    names = sorted(os.listdir(trained["images"]))[:3]
    for name in names:
        img = decode_image(os.path.join(trained["images"], name), 1024)
        pred = float(np.asarray(model.predict(img[None].astype("float32"), verbose=0))[0])
        assert pred == pytest.approx(scores.loc[os.path.splitext(name)[0], "pred"], abs=2e-3)


def test_export_to_an_h5_name_is_a_one_line_error(trained, tmp_path):
    res = CliRunner().invoke(cli.main, ["export", trained["run"], "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0
    assert res.output.strip() == f"Error: {tmp_path / 'x.h5'}: the exported model is a .keras file (Keras' format); " \
                                 "give a name ending in .keras"
    assert not os.path.exists(tmp_path / "x.h5")


def test_store_of_another_configuration_is_refused(trained, tmp_path, extractors):
    wide = str(tmp_path / "wide.h5")
    extract(trained["images"], ExtractConfig(net="iv3", pooling="wide", weights="random:0"), wide,
            extractor=extractors(net="iv3", pooling="wide"))
    with pytest.raises(StoreConfigMismatch, match="pooling: store has 'wide', asked for 'narrow'"):
        score_store(trained["run"], wide)
    res = CliRunner().invoke(cli.main, ["score", trained["run"], "--store", wide])
    assert res.exit_code == 1 and "pooling" in res.output
    # advice for scoring, not extraction's "delete the store"
    assert "delete" not in res.output and "mlsp score RUN --images DIR" in res.output


def test_images_follow_the_runs_configuration(trained):
    run = Run.open(trained["run"])
    config = run.extract_config()
    assert (config.net, config.pooling, config.augment, config.weights, config.precision, config.max_side) == (
        "iv3", "narrow", True, "random:0", "float32", 1024)
    assert run.extract_config(precision="bfloat16").precision == "bfloat16"


def test_cli_score_and_api(trained):
    """The CLI's table and the API's frame hold the scores score_store computes, image by image."""
    expected = score_store(trained["run"], trained["store"])
    res = CliRunner().invoke(cli.main, ["score", trained["run"], "--store", trained["store"]])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    header = next(k for k, line in enumerate(lines) if line.split()[:2] == ["id", "pred"])  # after any warning
    assert lines[header].split() == ["id", "pred", "pred_std", "mos", "split"]
    # the schema that owns the columns says the same (a MOS head's: heads.columns.names(1))
    assert lines[header].split() == [columns.ID, *columns.names(1), columns.MOS, columns.SPLIT]
    printed = pd.DataFrame([line.split() for line in lines[header + 1:]], columns=lines[header].split())
    assert printed["id"].tolist() == expected["id"].tolist()
    assert printed["split"].tolist() == expected["split"].tolist()
    for column in ("pred", "pred_std", "mos"):  # printed with 4 decimals
        np.testing.assert_allclose(printed[column].astype(float), expected[column], atol=5e-5)
    frame = api.score(trained["run"], store=trained["store"])
    pd.testing.assert_frame_equal(frame, expected)


def test_read_only_and_full_disk_targets_are_one_line_with_nothing_half_written(trained, small_disk, monkeypatch):
    """train, score, evaluate and export --out onto read-only media (a real tmpfs mounted
    read-only), and export and train meeting a full disk while saving their model (simulated:
    Keras' save writes part of the file, then ENOSPC)."""
    import errno

    import keras

    from helpers import remount

    disk = small_disk("4m")
    remount(disk, "ro")
    runner = CliRunner()
    commands = {
        "train": ["train", "--store", trained["store"], "--head", "single1fc", "--out", str(disk / "run"),
                  "--epochs", "1", "--no-progress"],
        "score": ["score", trained["run"], "--store", trained["store"], "--out", str(disk / "p.csv")],
        "evaluate": ["evaluate", trained["run"], "--out", str(disk / "eval")],
        "export": ["export", trained["run"], "--out", str(disk / "m.keras")],
    }
    for name, args in commands.items():
        res = runner.invoke(cli.main, args)
        assert res.exit_code == 1, (name, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and str(disk) in errors[0] and "read-only file system" in errors[0], (name, res.output)
        assert "Traceback" not in res.output
    assert os.listdir(disk) == []

    def full(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a model")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(keras.Model, "save", full)
    out = trained["root"] / "exported"
    res = runner.invoke(cli.main, ["export", trained["run"], "--out", str(out / "m.keras")])
    assert res.exit_code == 1 and "m.keras: cannot write: no space left on the device" in res.output, res.output
    assert os.listdir(out) == []  # neither m.keras nor its temporary
    run = trained["root"] / "run_full"
    res = runner.invoke(cli.main, commands["train"][:6] + [str(run), "--epochs", "1", "--no-progress"])
    assert res.exit_code == 1 and "model.keras: cannot write: no space left on the device" in res.output, res.output
    assert not (run / "model.keras").exists() and not [n for n in os.listdir(run) if ".tmp" in n]
    res = runner.invoke(cli.main, ["evaluate", str(run)])
    assert res.exit_code == 1 and "model.keras" in res.output and "Traceback" not in res.output


def _retrained_copy(run_dir, dest):
    """The run copied to ``dest`` with another head in ``model.keras`` (its weights moved), as
    when a run is trained again into the same folder."""
    import keras

    shutil.copytree(run_dir, dest)
    model = keras.saving.load_model(os.path.join(dest, "model.keras"), compile=False, safe_mode=True)
    model.set_weights([w + 0.05 for w in model.get_weights()])
    model.save(os.path.join(dest, "model.keras"))
    return str(dest)


def test_resumed_scores_never_mix_two_heads(trained, tmp_path, extractors):
    """A `score --out` interrupted, its run retrained in place, then run again: refused in one
    line naming the partial file, never finished with the first rows from the old head."""
    from helpers import ctrl_c_after

    run = _retrained_copy(trained["run"], tmp_path / "run")
    shutil.copy(os.path.join(trained["run"], "model.keras"), os.path.join(run, "model.keras"))  # the old head
    out = str(tmp_path / "p.csv")
    with pytest.raises(KeyboardInterrupt):
        score_images(run, trained["images"], out, extractor=extractors(net="iv3"), progress=ctrl_c_after(5))
    with open(out + ".partial") as handle:
        assert len(handle.readlines()) == 5
    _retrained_copy(trained["run"], tmp_path / "new")
    shutil.copy(tmp_path / "new" / "model.keras", os.path.join(run, "model.keras"))
    with pytest.raises(StoreConfigMismatch, match="head_sha256") as info:
        score_images(run, trained["images"], out, extractor=extractors(net="iv3"))
    assert f"delete {out}.partial and {out}.partial.json" in str(info.value)
    os.remove(out + ".partial")
    os.remove(out + ".partial.json")
    frame, _ = score_images(run, trained["images"], out, extractor=extractors(net="iv3"))
    fresh, _ = score_images(run, trained["images"], extractor=extractors(net="iv3"))
    np.testing.assert_allclose(frame["pred"], fresh["pred"], rtol=1e-6)


@pytest.mark.parametrize("damage", ["bad line", "not a row", "damaged meta"])
def test_damaged_score_partials_are_one_line(trained, tmp_path, extractors, damage):
    """A damaged ``OUT.partial`` or ``OUT.partial.json`` is one line naming it and what to do."""
    from helpers import ctrl_c_after

    out = str(tmp_path / "p.csv")
    with pytest.raises(KeyboardInterrupt):
        score_images(trained["run"], trained["images"], out, extractor=extractors(net="iv3"),
                     progress=ctrl_c_after(4))
    lines = open(out + ".partial").read().splitlines()
    target = out + ".partial"
    if damage == "bad line":
        lines[1] = lines[1][: len(lines[1]) // 2]
    elif damage == "not a row":
        lines[2] = '{"id": "x", "columns": "oops"}'
    else:
        target = out + ".partial.json"
    if damage == "damaged meta":
        with open(target, "w") as handle:
            handle.write('{"run": "x", ')
    else:
        with open(target, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    from mlsp.errors import ResumeError

    with pytest.raises(ResumeError) as info:
        score_images(trained["run"], trained["images"], out, extractor=extractors(net="iv3"))
    assert str(info.value).startswith(f"{target}: ") and "\n" not in str(info.value)
    assert f"delete {out}.partial and {out}.partial.json" in str(info.value)
    assert not os.path.exists(out)
    if damage == "bad line":  # the CLI: one line, exit 1, no traceback
        res = CliRunner().invoke(cli.main, ["score", trained["run"], "--images", trained["images"], "--out", out])
        assert res.exit_code == 1, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
        assert errors == [f"Error: {info.value}"], res.output
        assert "Traceback" not in res.output


@pytest.mark.parametrize("size", [(140, 200), (131, 173), (90, 80)])
def test_the_exported_model_resizes_as_scoring_decodes(tmp_path, size):
    """The exported model's first layer shrinks an image whose longer side exceeds max_side
    exactly as decoding a file does for `mlsp score` (same size, pixels within 8-bit rounding);
    smaller images pass unchanged."""
    import cv2
    import keras

    from mlsp.backbone.layers import FitMaxSide

    rng = np.random.default_rng(sum(size))
    img = cv2.resize(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8), size[::-1], interpolation=cv2.INTER_CUBIC)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, img[..., ::-1])
    decoded = decode_image(path, 100)
    images = keras.Input((None, None, 3))
    model = keras.Model(images, FitMaxSide(100)(images))
    out = np.asarray(model.predict(img[None].astype("float32"), verbose=0))[0]
    assert out.shape == decoded.shape and max(out.shape[:2]) == min(100, max(size))
    assert np.abs(out - decoded).max() <= 1 and np.abs(out - decoded).mean() < 0.2
