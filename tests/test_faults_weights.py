"""Hostile and damaged Keras 2 weight files for `mlsp import-weights` (heads/score/h5_tensors.py, the one
validator of weight files), and the import killed or stopped by a full disk. Each bad file is
made here with h5py from a good one, and refused in one line naming the tensor; a killed or
failed import leaves no run claiming to run and a rerun into the same --out works."""

import errno
import json
import os
import signal

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from keras2_files import authors_layers, write_keras2
from synthetic import write_synthetic_store
from test_faults import ROOT, faulty_command, no_temporaries, run

import cli

CHANNELS = (16, 24)
FC0 = "head_fc0/head_fc0/kernel:0"
BN0 = "head_bn0/head_bn0"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "narrow.h5")
    write_synthetic_store(path, n_images=12, n_views=2, block_channels=CHANNELS, seed=4)
    return path


def _good(folder):
    return write_keras2(folder / "model_best_weights.h5", authors_layers("single3fc", sum(CHANNELS), 16, seed=5))


def _replace(name, data=None, **options):
    def change(f, tmp_path):
        del f[name]
        f.create_dataset(name, data=data, **options)
    return change


def _set(name, where, value):
    def change(f, tmp_path):
        data = f[name][()]
        data[where] = value
        f[name][...] = data
    return change


def _soft(f, tmp_path):
    f["stash/kernel"] = f[FC0][()]
    del f[FC0]
    f[FC0] = h5py.SoftLink("/stash/kernel")


def _dangling(f, tmp_path):
    del f[FC0]
    f[FC0] = h5py.SoftLink("/nowhere/kernel")


def _external(f, tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["kernel"] = f[FC0][()]
    del f[FC0]
    f[FC0] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/kernel")


def _external_text(f, tmp_path):
    (tmp_path / "notes.txt").write_text("not hdf5\n")
    del f[FC0]
    f[FC0] = h5py.ExternalLink(str(tmp_path / "notes.txt"), "/kernel")


def _raw_file(f, tmp_path):
    data = f[FC0][()]
    (tmp_path / "raw.bin").write_bytes(data.tobytes())
    del f[FC0]
    f.create_dataset(FC0, shape=data.shape, dtype=data.dtype, external=[(str(tmp_path / "raw.bin"), 0, data.nbytes)])


def _huge(f, tmp_path):
    del f[FC0]
    f.create_dataset(FC0, shape=(40, 10 ** 11), dtype="f4")  # declared only: the file stores none of it


def _sparse(f, tmp_path):
    """Compressed chunks of which one is stored: 4e10 bytes declared over a few stored."""
    del f[FC0]
    f.create_dataset(FC0, shape=(40, 250_000_000), dtype="f4", chunks=(40, 1000), compression="gzip")
    f[FC0][:, :1000] = 1.0


def _attr(name, value):
    def change(f, tmp_path):
        (f if name == "layer_names" else f["head_fc1"]).attrs[name] = value
    return change


CASES = [
    ("nan", _set(FC0, (3, 2), np.nan), "head_fc0/kernel holds 1 NaN or infinite values"),
    ("inf", _set("head_out/head_out/bias:0", 0, -np.inf), "head_out/bias holds 1 NaN or infinite values"),
    ("negative-variance", _set(f"{BN0}/moving_variance:0", slice(0, 2), -0.5),
     "head_bn0/moving_variance holds 2 negative values"),
    ("integer", _replace(FC0, np.ones((40, 16), np.int32)), f"{FC0} is an integer tensor"),
    ("bool", _replace(FC0, np.ones((40, 16), bool)), f"{FC0} is a bool tensor"),
    ("complex", _replace(FC0, np.ones((40, 16), np.complex64)), f"{FC0} is a complex tensor"),
    ("string", _replace(FC0, np.array([b"a kernel"] * 40)), f"{FC0} is a string dataset"),
    ("soft-link", _soft, f"{FC0} is a soft link (to /stash/kernel)"),
    ("dangling-link", _dangling, f"{FC0} is a soft link (to /nowhere/kernel)"),
    ("external-link", _external, f"{FC0} is a link into another file"),
    ("external-link-to-text", _external_text, f"{FC0} is a link into another file"),
    ("external-raw-data", _raw_file, f"{FC0} takes its data from other files"),
    ("huge-declared-shape", _huge,
     f"{FC0} declares 4,000,000,000,000 elements (40, 100000000000) but the file stores 0 bytes"),
    ("compressed-sparse", _sparse, f"{FC0} declares 10,000,000,000 elements (40, 250000000) but the file stores"),
    ("layer-names-scalar", _attr("layer_names", 7), "the attribute layer_names of the file is not a list of names"),
    ("layer-names-string", _attr("layer_names", "head_fc0"),
     "the attribute layer_names of the file is not a list of names"),
    ("weight-names-string", _attr("weight_names", "head_fc1/kernel:0"),
     "the attribute weight_names of layer head_fc1 is not a list of names"),
]


@pytest.mark.parametrize("case, change, named", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_weight_file_is_refused_in_one_line_naming_the_tensor(tmp_path, store, case, change, named):
    path = _good(tmp_path)
    with h5py.File(path, "a") as f:
        change(f, tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli.main, ["import-weights", str(path), "--head", "single3fc", "--store", store,
                                        "--out", str(out)])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), res.output
    assert named in lines[0], lines[0]
    assert not out.exists()


def test_a_width_the_file_cannot_hold_is_refused_before_a_head_is_built(tmp_path, store):
    """head_fc0/kernel really stored (compressed zeros) with a width of 300,000: the head it
    implies (fc1 alone 45 billion weights) is refused from the declared shapes, not allocated."""
    path = _good(tmp_path)
    with h5py.File(path, "a") as f:
        _replace(FC0, np.zeros((40, 300_000), np.float32), compression="gzip")(f, tmp_path)
    res = CliRunner().invoke(cli.main, ["import-weights", str(path), "--head", "single3fc", "--store", store,
                                        "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "head_fc0/kernel declares a single3fc of width 300,000" in res.output


def _import(store, path, out):
    return ["import-weights", str(path), "--head", "single3fc", "--store", store, "--out", str(out)]


@pytest.mark.slow
def test_import_killed_while_saving_leaves_no_running_run_and_imports_again(tmp_path, store):
    """kill -9 while the model is being written (inside Keras' zip writer): no config.json says
    `running`; the same command into the same --out then imports, leaving no temporary file."""
    path = _good(tmp_path)
    out = tmp_path / "run"
    world = {"env": dict(os.environ, MLSP_ROOT=ROOT, PYTHONPATH=ROOT)}
    res = run(world, faulty_command("keras.src.saving.saving_lib:_save_state", 1, "kill", *_import(store, path, out)))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert any(".tmp-" in name for name in os.listdir(out)), "killed while the model was written"
    assert not (out / "config.json").exists()
    res = CliRunner().invoke(cli.main, _import(store, path, out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["status"] == "finished"
    no_temporaries(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.keras"]


@pytest.mark.parametrize("step", ["model", "config"])
def test_a_full_disk_while_importing_leaves_no_run_and_imports_again(tmp_path, store, monkeypatch, step):
    """No space left while the model or config.json is written: one line that says nothing of
    the run was kept (no history.csv is spoken of), no config.json, no temporary; a rerun works."""
    import keras

    from mlsp.runtime import atomic
    from mlsp.errors import WriteError

    path = _good(tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        if step == "model":
            def full(self, target, *args, **kwargs):
                with open(target, "wb") as handle:
                    handle.write(b"PK\x03\x04 half a model")
                raise OSError(errno.ENOSPC, "No space left on device", target)

            patch.setattr(keras.Model, "save", full)
        else:
            real = atomic.write_json

            def full(target, data, **options):
                if str(target).endswith("config.json"):
                    raise WriteError(target, "no space left on the device", "nothing was written")
                return real(target, data, **options)

            patch.setattr("heads.run.write_json", full)
        res = CliRunner().invoke(cli.main, _import(store, path, out))
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "no space left on the device" in lines[0], res.output
    assert "history.csv" not in lines[0] and "no run was written" in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert not (out / "config.json").exists()
    no_temporaries(out)
    res = CliRunner().invoke(cli.main, _import(store, path, out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["status"] == "finished"


def test_more_weights_than_any_head_are_refused_from_the_headers(tmp_path, store, monkeypatch):
    """The file's tensors together declare more weights than the cap (lowered here to 500 so a
    small file shows it): refused before anything is read."""
    from heads.score import h5_tensors

    monkeypatch.setattr(h5_tensors, "MAX_ELEMENTS", 500)
    path = _good(tmp_path)
    res = CliRunner().invoke(cli.main, _import(store, path, tmp_path / "run"))
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"{path}: declares 917 weights, more than any head mlsp builds (500)" in res.output
