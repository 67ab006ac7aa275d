"""Fault injection: the CLI run as people meet it going wrong -- killed (kill -9) at set points of
extract, train and score --out, a second writer, read-only folders, a full disk (a real tmpfs
when root), a closed output pipe -- each checking that nothing finished is lost and that the
next run completes. Tiny data: iv3 narrow, random weights, ~8 images of ~100 px."""

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import remount, write_image
from synthetic import write_synthetic_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRACT = ["extract", "--net", "iv3", "--weights", "random:0", "--checkpoint-every", "3"]

# The CLI with one function wrapped: at its COUNT-th call the process kills itself with SIGKILL
# (kill -9: no handler runs, as when the machine or the OOM killer ends it), or, with "wait",
# prints "holding" and waits for the file GO before going on. A fixed set of points, not random
# ones: each run of the suite tests the same moments.
FAULT = r"""
import importlib, os, signal, sys, time
sys.path.insert(0, os.environ["MLSP_ROOT"])
import cli  # first: a module that imported the function by name keeps the real one
target, count, action = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module, _, qualname = target.partition(":")
owner = importlib.import_module(module)
*parents, name = qualname.split(".")
for part in parents:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == count:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("holding", flush=True)
        while not os.path.exists(action):
            time.sleep(0.05)
    return real(*args, **kwargs)
setattr(owner, name, wrapper)
sys.argv = ["mlsp", *sys.argv[4:]]
cli.main()
"""


def mlsp_command(*args) -> list[str]:
    """The `mlsp` command line of this checkout, for a subprocess."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import cli; cli.main()", *map(str, args)]


def faulty_command(target: str, count: int, action: str, *args) -> list[str]:
    """`mlsp ARGS` with ``target`` ("module:function" or "module:Class.method") killed (action
    "kill") or held until a file exists (action: that file's path) at its ``count``-th call."""
    return [sys.executable, "-c", FAULT, target, str(count), action, *map(str, args)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Eight small images and the environment of the CLI's subprocesses: this checkout, and a
    Keras home of their own where the extractor cache is on (built once, loaded after)."""
    root = tmp_path_factory.mktemp("faults")
    images = root / "imgs"
    for k in range(8):
        write_image(images / f"{k}.png", 96 + 4 * k, 120, seed=k)
    env = dict(os.environ, MLSP_ROOT=ROOT, PYTHONPATH=ROOT, KERAS_HOME=str(root / "keras"), MLSP_FORWARD_CACHE="1")
    return {"root": root, "images": images, "env": env}


def run(world, command, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=world["env"], capture_output=True, text=True, timeout=300,
                          **options)


def same_features(a, b):
    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        assert [i.decode() for i in x["ids"][...]] == [i.decode() for i in y["ids"][...]]
        np.testing.assert_array_equal(x["features"][...], y["features"][...])


def no_temporaries(folder):
    left = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if ".tmp-" in f]
    assert left == [], left


@pytest.fixture(scope="module")
def clean_store(world, extractors):
    """The store of an extraction nothing interrupted, made in this process."""
    from mlsp.extraction.job import ExtractConfig, extract

    out = str(world["root"] / "clean.h5")
    extract(str(world["images"]), ExtractConfig(net="iv3", weights="random:0"), out, extractor=extractors(net="iv3"),
            flush_images=3)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mlsp.store.shards:ShardWriter.flush:2", "mlsp.store.write:create_layout:1"],
                         ids=["between-shards", "in-the-merge"])
def test_extract_killed_then_rerun_gives_the_store_of_an_uninterrupted_run(world, clean_store, extractors, point,
                                                                              tmp_path):
    """kill -9 after the first shard, and inside the merge (the store's temporary open): the
    rerun finishes, keeping the shards already written, and equals a run nothing stopped."""
    from mlsp.extraction.job import ExtractConfig, extract

    target, count = point.rsplit(":", 1)
    out = tmp_path / "s.h5"
    res = run(world, faulty_command(target, int(count), "kill", *EXTRACT, "--images", world["images"], "--out", out))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    shards = [n for n in os.listdir(str(out) + ".partial") if n.startswith("shard-")]
    assert not out.exists() and len(shards) == (1 if "flush" in target else 3)
    result = extract(str(world["images"]), ExtractConfig(net="iv3", weights="random:0"), str(out),
                     extractor=extractors(net="iv3"), flush_images=3)
    assert result.images == 8 and result.new == {1: 5, 3: 0}[len(shards)]  # shards of 3, 3 and 2 images
    same_features(out, clean_store)
    assert sorted(os.listdir(tmp_path)) == ["s.h5"]


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_finishes(world, clean_store, extractors, tmp_path):
    """While one extraction writes a store (held after its first shard), a second into the same
    store is refused at once naming the first's pid; the first then finishes untouched."""
    from mlsp.errors import StoreLocked
    from mlsp.extraction.job import ExtractConfig, extract

    out, go = tmp_path / "s.h5", tmp_path / "go"
    first = subprocess.Popen(faulty_command("mlsp.store.shards:ShardWriter.flush", 2, str(go), *EXTRACT, "--images",
                                            world["images"], "--out", out),
                             cwd=ROOT, env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        with pytest.raises(StoreLocked, match=rf"being written by another mlsp process \(pid {first.pid} "):
            extract(str(world["images"]), ExtractConfig(net="iv3", weights="random:0"), str(out),
                    extractor=extractors(net="iv3"))
    finally:
        go.write_text("go")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    same_features(out, clean_store)


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


@pytest.mark.slow
def test_score_out_killed_then_rerun_gives_the_uninterrupted_scores(world, sample_store, sample_run, extractors,
                                                                     tmp_path):
    """kill -9 of `mlsp score --out` while its 6th image is scored: five rows are kept in
    OUT.partial, and the rerun scores only the rest into the CSV an uninterrupted run writes."""
    import pandas as pd

    from heads.score.scoring import score_images, score_store

    out = str(tmp_path / "p.csv")
    res = run(world, faulty_command("heads.score.scoring:ImageScorer.process", 6, "kill", "score", sample_run, "--images",
                                    sample_store["images"], "--out", out))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    with open(out + ".partial") as handle:
        assert len(handle.read().splitlines()) == 5
    assert not os.path.exists(out)
    frame, errors = score_images(sample_run, sample_store["images"], out, extractor=extractors(net="iv3"))
    assert errors == [] and len(frame) == 16
    # an uninterrupted run's scores: those of the same images' stored features (equal to 1e-4)
    fresh = score_store(sample_run, sample_store["store"])
    written = pd.read_csv(out, dtype={"id": str}).set_index("id")
    assert sorted(written.index) == sorted(fresh["id"])
    np.testing.assert_allclose(written.loc[fresh["id"], "pred"], fresh["pred"], atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["p.csv"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["heads.train.callbacks:HistoryCSV.on_epoch_end:2", "heads.run:Run.save_model:1",
                                   "heads.train.loop:write_outputs:1"],
                         ids=["mid-training", "saving-the-model", "before-the-evaluation"])
def test_train_killed_keeps_what_it_finished(world, tmp_path, point):
    """kill -9 of `mlsp train` mid-training, while saving its model and before its evaluation:
    config.json and history.csv stay readable, no half-written file is left under a final
    name, a saved model is kept (and `mlsp evaluate` completes the run's evaluation), and the
    next training completes."""
    from click.testing import CliRunner

    import cli

    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 60, n_views=2, block_channels=(4, 4))
    target, count = point.rsplit(":", 1)
    killed = tmp_path / "killed"
    args = ["train", "--store", store, "--head", "single1fc", "--epochs", "3", "--no-progress"]
    res = run(world, faulty_command(target, int(count), "kill", *args, "--out", killed))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    config = json.loads((killed / "config.json").read_text())
    assert config["status"] == "running"  # nothing runs after kill -9; `mlsp evaluate` tells the rest
    history = (killed / "history.csv").read_text().splitlines()
    assert len(history) == {"on_epoch_end": 2}.get(target.rsplit(".", 1)[-1], 4)  # header + epochs
    no_temporaries(killed)
    saved = (killed / "model.keras").exists()
    assert saved == (target.endswith("write_outputs"))
    if saved:
        res = CliRunner().invoke(cli.main, ["evaluate", str(killed)])
        assert res.exit_code == 0, res.output
        assert (killed / "metrics.json").exists()
    else:
        res = CliRunner().invoke(cli.main, ["evaluate", str(killed)])
        assert res.exit_code == 1 and "model.keras is missing" in res.output and "Traceback" not in res.output
    if not saved:  # once is enough: the next training, into another folder, completes
        return
    res = CliRunner().invoke(cli.main, args + ["--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["status"] == "finished"


def test_train_onto_read_only_media_says_nothing_was_written(small_disk, tmp_path):
    """`mlsp train --out` on read-only media (a real tmpfs remounted read-only): one line naming
    the folder, saying nothing was written; the store is untouched."""
    from click.testing import CliRunner

    import cli

    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 40, n_views=1, block_channels=(4,))
    before = os.path.getmtime(store)
    disk = small_disk("1m")
    remount(disk, "ro")
    res = CliRunner().invoke(cli.main, ["train", "--store", store, "--head", "single1fc", "--out", str(disk / "run"),
                                        "--epochs", "1", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {disk / 'run'}: cannot write: read-only file system; nothing was written; the store is unchanged")
    assert os.listdir(disk) == [] and os.path.getmtime(store) == before
