"""Rewriting a store's labels: crash-safe (a kill at any write leaves the old labels or the new
ones), able to repair damaged labels, and never dropping labels the user did not replace."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from helpers import write_image
from mlsp.extraction.job import ExtractConfig, extract
from helpers import write_store
from mlsp.store.read import FeatureStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ExtractConfig(net="iv3", weights="random:0")
N = 6

# Runs relabel_store in a child that SIGKILLs itself at its KILL_AT-th write (a file copy, an
# HDF5 dataset or attribute write, a rename), the way a power cut or `kill -9` would stop it.
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    import h5py, numpy as np
    from mlsp.store.write import relabel_store

    path, kill_at = sys.argv[1], int(sys.argv[2])
    count = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    h5py.Dataset.__setitem__ = counted(h5py.Dataset.__setitem__)
    h5py.AttributeManager.__setitem__ = counted(h5py.AttributeManager.__setitem__)
    h5py.AttributeManager.create = counted(h5py.AttributeManager.create)
    shutil.copyfile = counted(shutil.copyfile)
    os.replace = counted(os.replace)

    def label_fn(ids):
        n = len(ids)
        mos = np.linspace(9, 2, n).astype(np.float32)
        votes = np.tile(np.arange(1, 11, dtype=np.float32), (n, 1))
        return mos, votes, np.array(["val"] * 2 + ["test"] * 2 + ["train"] * (n - 4))

    attrs = {"labels_file": "/new/labels.csv", "seed": 7}
    relabel_store(path, label_fn, attrs, ["labels_file", "seed"])
    print("done", count[0])
""")


def make_store(path):
    rng = np.random.default_rng(0)
    write_store(path, rng.standard_normal((N, 1, 6)).astype(np.float16), [f"im{i}" for i in range(N)],
                net="toy", pooling="narrow", block_names=["a"], block_channels=[6],
                mos=np.linspace(2, 8, N), split=["train"] * (N - 1) + ["val"],
                attrs={"labels_file": "/old/labels.csv", "seed": 0})


def labels_of(path):
    """MOS and votes (NaN written as None, so that equal labels compare equal), splits, sources."""
    with FeatureStore(str(path)) as s:  # opens, with every check
        return (np.where(np.isnan(s.mos), None, s.mos).tolist(), np.where(np.isnan(s.votes), None, s.votes).tolist(),
                s.split.tolist(), s.attrs["labels_file"], int(s.attrs["seed"]))


def test_a_kill_at_any_write_of_a_relabelling_leaves_old_or_new_labels(tmp_path):
    original = tmp_path / "original.h5"
    make_store(str(original))
    old = labels_of(original)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outcomes = []
    for kill_at in range(1, 40):
        path = tmp_path / f"k{kill_at}.h5"
        shutil.copyfile(original, path)
        res = subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at)], env=env,
                             capture_output=True, text=True, timeout=120)
        got = labels_of(path)  # never "damaged HDF5 file"
        if res.returncode == 0:
            assert "done" in res.stdout
            outcomes.append("completed")
            break
        assert res.returncode == -signal.SIGKILL, res.stderr
        assert got == old or got[3:] == ("/new/labels.csv", 7), f"kill at write {kill_at}: labels mixed"
        outcomes.append("new" if got != old else "old")
    assert outcomes[-1] == "completed" and len(outcomes) >= 6, outcomes
    assert labels_of(path)[0] == pytest.approx(np.linspace(9, 2, N).tolist())
    assert "old" in outcomes  # killed before the rename: the store is untouched


def labelled_folder(tmp_path, n=4):
    src = tmp_path / "imgs"
    for k in range(n):
        write_image(src / f"p{k}.png", 96, 100 + 4 * k, seed=k)
    labels = tmp_path / "ratings.csv"
    labels.write_text("id,mos\n" + "".join(f"p{k},{2 + k}\n" for k in range(n)))
    test_list = tmp_path / "test.txt"
    test_list.write_text("p0\n")
    return src, labels, test_list


def test_moving_the_labels_file_keeps_the_stored_labels(tmp_path, extractors, caplog):
    src, labels, test_list = labelled_folder(tmp_path)
    out = tmp_path / "s.h5"
    extract(str(src), CONFIG, str(out), labels=str(labels), test_list=str(test_list), val_fraction=0.3,
            extractor=extractors(net="iv3"))
    before = labels_of(out)
    labels.rename(tmp_path / "moved.csv")
    test_list.unlink()
    write_image(src / "p9.png", 96, 140, seed=9)
    with caplog.at_level(logging.WARNING, logger="mlsp"):
        result = extract(str(src), CONFIG, str(out), val_fraction=0.3, extractor=extractors(net="iv3"))
    assert result.images == 5 and result.new == 1
    assert "no longer exists" in caplog.text and "keeps its labels" in caplog.text
    mos, _, split, labels_file, _ = labels_of(out)
    assert mos[:4] == before[0][:4] and mos[4] is None
    assert split[:4] == before[2] and split[0] == "test" and split[4] == "unlabeled"
    assert labels_file == str(labels)  # still says where they came from


def test_a_relabelling_rerun_repairs_damaged_labels(tmp_path, extractors):
    src, labels, _ = labelled_folder(tmp_path)
    out = tmp_path / "s.h5"
    extract(str(src), CONFIG, str(out), labels=str(labels), extractor=extractors(net="iv3"))
    with h5py.File(out, "r+") as f:  # what a store written before labels were checked in float32 holds
        f["mos"][1] = 42
        f["votes"][2] = np.inf
    with pytest.raises(Exception, match="damaged"):
        labels_of(out)
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("id,mos\n" + "".join(f"p{k},{3 + k}\n" for k in range(4)))
    result = extract(str(src), CONFIG, str(out), labels=str(fixed), extractor=extractors(net="iv3"))
    assert result.new == 0
    mos, votes, _, labels_file, _ = labels_of(out)
    assert mos == [3, 4, 5, 6] and votes == [[None] * 10] * 4 and labels_file == str(fixed)
