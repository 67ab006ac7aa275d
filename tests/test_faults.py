"""Fault injection: the CLI run as people meet it going wrong -- killed (kill -9) at set points of
extract, train and score --out, a second writer, read-only folders, a full disk (a real tmpfs
when root), a closed output pipe -- each checking that nothing finished is lost and that the
next run completes. Tiny data: iv3 narrow, random weights, ~8 images of ~100 px."""

import os
import subprocess
import sys

import pytest

from synthetic import write_synthetic_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlsp_command(*args) -> list[str]:
    """The `mlsp` command line of this checkout, for a subprocess."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import cli; cli.main()", *map(str, args)]


def test_a_closed_output_pipe_exits_quietly(tmp_path):
    """`mlsp inspect STORE | head -0`: the reader is gone before mlsp writes; no "Error: broken
    pipe", no traceback, and a non-zero exit as for any command whose output was cut."""
    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 40, n_views=1, block_channels=(4,))
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run(mlsp_command("inspect", store), stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=300)
    finally:
        os.close(write)
    assert res.returncode == 1
    assert "Error" not in res.stderr and "Traceback" not in res.stderr and "Exception" not in res.stderr, res.stderr


@pytest.mark.parametrize("step", ["model", "evaluation"])
def test_a_full_disk_while_training_saves_marks_the_run_failed(tmp_path, monkeypatch, step):
    """A write that fails (no space left) while the model or the evaluation is written: one
    line, and the run's config.json says failed and why, never 'running'."""
    import errno
    import json

    import keras
    from click.testing import CliRunner

    import cli
    from heads import evaluation
    from mlsp.errors import WriteError

    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 60, n_views=2, block_channels=(4, 4))
    if step == "model":
        def full(self, path, *args, **kwargs):
            with open(path, "wb") as handle:
                handle.write(b"PK\x03\x04 half a model")
            raise OSError(errno.ENOSPC, "No space left on device", path)

        monkeypatch.setattr(keras.Model, "save", full)
    else:
        def full(path, data, **options):
            raise WriteError(path, "no space left on the device", "nothing was written")

        monkeypatch.setattr(evaluation, "write_json", full)
    run = tmp_path / "run"
    res = CliRunner().invoke(cli.main, ["train", "--store", store, "--head", "single1fc", "--out", str(run),
                                        "--epochs", "1", "--no-progress"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "no space left on the device" in errors[0], res.output
    config = json.loads((run / "config.json").read_text())
    assert config["status"] == "failed" and "no space left on the device" in config["error"], config
    assert (run / "model.keras").exists() == (step == "evaluation")
