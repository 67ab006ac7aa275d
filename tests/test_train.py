"""heads.train.loop: the run folder, determinism, the best weights as the result, the checks that
come before any training, and training a store larger than the process may hold in memory."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from synthetic import write_synthetic_store
from heads.train.loop import TrainConfig, train
from mlsp.errors import ConfigError, StoreError
from helpers import write_store

FAST = dict(epochs=4, lr=1e-3, head_options={"width": 32})


@pytest.fixture(scope="module")
def narrow_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stores") / "narrow.h5")
    write_synthetic_store(path, 300, n_views=4, block_channels=(8, 16, 8), seed=1)
    return path


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_folder(narrow_store, tmp_path):
    import keras

    out = str(tmp_path / "run")
    result = train(TrainConfig(head="single3fc", store=narrow_store, out=out, **FAST))
    assert sorted(os.listdir(out)) == ["config.json", "history.csv", "loss.png", "metrics.json", "model.keras",
                                       "predictions.csv", "predictions.png"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["store"]["path"] == os.path.abspath(narrow_store)
    assert len(config["store"]["fingerprint"]) == 16 and config["store"]["block_channels"] == [8, 16, 8]
    assert config["head"] == "single3fc" and config["head_options"] == {"width": 32}
    assert {"keras", "numpy", "h5py", "scipy", "mlsp", "python"} <= set(config["versions"])
    assert config["status"] == "finished" and config["data"]["mode"] == "memory"
    # config.json holds everything to rerun: the training config round-trips
    assert TrainConfig.from_dict(config["train"]) == TrainConfig(head="single3fc", store=narrow_store, out=out, **FAST)
    history = read_csv(os.path.join(out, "history.csv"))
    assert list(history[0]) == ["epoch", "loss", "val_loss", "lr", "val_srcc"]
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics) == {"val", "test"}
    for split, m in metrics.items():
        assert set(m) == {"srcc", "plcc", "accuracy", "balanced_accuracy", "n"}
        assert m["n"] == config["splits"][split]
    predictions = read_csv(os.path.join(out, "predictions.csv"))
    assert list(predictions[0]) == ["id", "split", "mos", "pred"]
    assert len(predictions) == metrics["val"]["n"] + metrics["test"]["n"]
    model = keras.saving.load_model(os.path.join(out, "model.keras"), safe_mode=True)
    assert model.input_shape == (None, 32)
    assert result.metrics == metrics
    for png in ("loss.png", "predictions.png"):
        with open(os.path.join(out, png), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_result(narrow_store, tmp_path):
    # 3 epochs of 20 batches (not the automatic 100): each run still draws its own views and
    # batches every epoch and starts from its own weights, which is what a seed decides
    def run(name, seed, **kw):
        out = str(tmp_path / name)
        train(TrainConfig(head="single3fc", store=narrow_store, out=out, seed=seed, epochs=3, lr=1e-3,
                          steps_per_epoch=20, head_options={"width": 32}, **kw))
        return read_csv(os.path.join(out, "history.csv")), read_csv(os.path.join(out, "predictions.csv"))

    a, b = run("a", 7), run("b", 7)
    assert a == b
    # how the data is read (threads, memory or disk) does not change the result
    assert run("c", 7, workers=1, memory_budget=0) == a
    other = run("d", 8)
    assert other[0] != a[0] and other[1] != a[1]


def test_the_result_is_the_best_weights_on_validation_loss(narrow_store, tmp_path):
    out = str(tmp_path / "run")
    result = train(TrainConfig(head="single3fc", store=narrow_store, out=out, epochs=12, lr=3e-3, patience=2,
                               lr_epochs=4, head_options={"width": 32}))
    history = result.history
    best = min(h["val_loss"] for h in history)
    assert result.config["best_val_loss"] == pytest.approx(best)
    # the saved model's val predictions give exactly the best val loss, not the last epoch's
    val = [r for r in read_csv(os.path.join(out, "predictions.csv")) if r["split"] == "val"]
    mse = np.mean([(float(r["pred"]) - float(r["mos"])) ** 2 for r in val])
    assert mse == pytest.approx(best, rel=1e-4)
    # the logged LR follows the recorded changes
    for event in result.config["lr_changes"]:
        assert history[event["epoch"] - 1]["lr"] == pytest.approx(event["from"])
        if event["epoch"] < len(history):
            assert history[event["epoch"]]["lr"] == pytest.approx(event["to"])


def test_narrow_head_on_wide_store_uses_the_grid_mean(tmp_path, caplog):
    import keras

    path = str(tmp_path / "wide.h5")
    write_synthetic_store(path, 120, n_views=2, block_channels=(4, 4), pooling="wide")
    with caplog.at_level("INFO", logger="heads"):
        result = train(TrainConfig(head="single1fc", store=path, out=str(tmp_path / "run"), epochs=2))
    assert "mean of its 5x5 grid, which equals the narrow feature" in caplog.text
    assert result.config["data"]["reduce_grid"] is True
    model = keras.saving.load_model(os.path.join(result.run_dir, "model.keras"))
    assert model.input_shape == (None, 5, 5, 8)  # takes what the store holds


def store_with(path, **changes):
    n = 30
    fields = dict(mos=np.linspace(2, 9, n), split=np.array(["train"] * 20 + ["val"] * 5 + ["test"] * 5))
    fields.update(changes)
    write_store(path, np.ones((n, 2, 6), np.float16), [f"i{k}" for k in range(n)], net="test", pooling="narrow",
                block_names=["a", "b"], block_channels=[2, 4], **fields)
    return path


@pytest.mark.parametrize("case,error,message", [
    ("missing", StoreError, "not an mlsp feature store, missing mos"),
    ("nan", StoreError, "every MOS is NaN"),
    ("noval", StoreError, "the val split has no labelled images"),
    ("notest", StoreError, "the test split has no labelled images"),
    ("head", ConfigError, "unknown head 'resnet'"),
    ("wide", ConfigError, "needs wide"),
    ("option", ConfigError, "does not take kernels"),
])
def test_bad_input_is_a_clear_error_before_training(tmp_path, case, error, message):
    path = str(tmp_path / "s.h5")
    head, options = "single1fc", {}
    if case == "nan":
        store_with(path, mos=np.full(30, np.nan))
    elif case == "noval":
        store_with(path, split=np.array(["train"] * 25 + ["test"] * 5))
    elif case == "notest":
        store_with(path, mos=np.r_[np.linspace(2, 9, 25), np.full(5, np.nan)])
    else:
        store_with(path)
    if case == "missing":
        with h5py.File(path, "r+") as f:
            del f["mos"]
    head = {"head": "resnet", "wide": "pool3fc", "option": "single3fc"}.get(case, head)
    if case == "option":
        options = {"kernels": 8}
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(TrainConfig(head=head, store=path, out=str(out), head_options=options))
    assert not out.exists()  # nothing started


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown training option.*learning_rate"):
        TrainConfig.from_dict({"head": "single1fc", "learning_rate": 1e-3})
    for bad in ({"lr": -1.0}, {"batch_size": 0}, {"patience": 1.5}, {"lr_factor": 2}, {"seed": -1},
                {"min_lr": 1.0}, {"epochs": 0}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict({"head": "single1fc", **bad})


def test_a_run_folder_is_never_overwritten(narrow_store, tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(head="single1fc", store=narrow_store, out=out, epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(head="single1fc", store=narrow_store, out=out, epochs=1))


MEMORY_CAPPED = textwrap.dedent("""
    import json, resource, sys
    from heads.train.loop import TrainConfig, train

    store, small, out, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # warm up first (TensorFlow's thread pools and allocator arenas), then cap the address space
    train(TrainConfig(head="single1fc", store=small, out=out + "-warmup", epochs=1))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + headroom, resource.RLIM_INFINITY))
    try:
        bytearray(2 * headroom)  # the cap holds
        sys.exit("the memory cap does not hold")
    except MemoryError:
        pass
    result = train(TrainConfig(head="single1fc", store=store, out=out, epochs=2, lr=1e-3))
    print(json.dumps({"data": result.config["data"], "epochs": len(result.history),
                      "peak_rss": status("VmHWM"), "metrics": result.metrics}))
""")


def test_a_store_larger_than_the_memory_cap_trains_from_disk(tmp_path):
    # 48,000 images x 8 views x 1,408 channels, float16: 1.01 GiB; the process gets 384 MiB more
    n, channels, headroom = 48000, 1408, 384 * 2**20
    rng = np.random.default_rng(0)
    pattern = rng.uniform(0, 1, size=(97, 8, channels)).astype(np.float16)
    features = np.resize(pattern, (n, 8, channels))
    store = str(tmp_path / "big.h5")
    split = np.where(np.arange(n) % 20 == 0, "val", np.where(np.arange(n) % 20 == 1, "test", "train"))
    write_store(store, features, [f"i{k}" for k in range(n)], net="test", pooling="narrow",
                block_names=["a", "b"], block_channels=[1024, 384], mos=rng.uniform(1, 10, n), split=split)
    del features
    assert os.path.getsize(store) > 2.5 * headroom
    small = str(tmp_path / "small.h5")
    write_synthetic_store(small, 100, n_views=8, block_channels=(1024, 384))
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2", TF_NUM_INTEROP_THREADS="2",
               TF_NUM_INTRAOP_THREADS="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", MEMORY_CAPPED, store, small, str(tmp_path / "run"), str(headroom)],
                          capture_output=True, text=True, env=env, timeout=600)
    size = os.path.getsize(store)
    os.remove(store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streaming them from the store instead" not in proc.stderr  # not a failed attempt
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["data"]["mode"] == "stream"  # decided from the process's limit, not told
    assert report["data"]["memory_budget"] is None
    assert report["epochs"] == 2
    assert report["metrics"]["test"]["n"] == n // 20
    assert report["peak_rss"] < size  # the features were never all in memory


def test_ctrl_c_keeps_the_best_weights_so_far(narrow_store, tmp_path, monkeypatch):
    from heads.train import loop as training

    original = training.HistoryCSV.on_epoch_end

    def interrupt_at_third(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.HistoryCSV, "on_epoch_end", interrupt_at_third)
    result = train(TrainConfig(head="single1fc", store=narrow_store, out=str(tmp_path / "run"), epochs=10, lr=1e-2))
    assert result.config["status"] == "interrupted"
    assert len(result.history) == 3
    assert os.path.isfile(os.path.join(result.run_dir, "model.keras"))
    val = [r for r in read_csv(os.path.join(result.run_dir, "predictions.csv")) if r["split"] == "val"]
    mse = np.mean([(float(r["pred"]) - float(r["mos"])) ** 2 for r in val])
    assert mse == pytest.approx(min(h["val_loss"] for h in result.history), rel=1e-4)


def test_a_loss_that_is_never_finite_is_a_clear_error(narrow_store, tmp_path):
    from mlsp.errors import TrainingError

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="validation loss was never finite"):
        train(TrainConfig(head="single1fc", store=narrow_store, out=str(out), epochs=2, lr=1e30, steps_per_epoch=3))
    assert json.loads((out / "config.json").read_text())["status"] == "failed"


def test_features_that_are_not_finite_are_a_clear_error(tmp_path):
    path = str(tmp_path / "inf.h5")
    features = np.ones((60, 2, 4), np.float16)
    features[3] = np.inf  # every view of one training image
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    write_store(path, features, [f"i{k}" for k in range(60)], net="test", pooling="narrow", block_names=["a"],
                block_channels=[4], mos=np.linspace(2, 9, 60), split=split)
    out = tmp_path / "run"
    with pytest.raises(StoreError, match="image i3 .*not finite"):
        train(TrainConfig(head="single1fc", store=path, out=str(out), epochs=3))
    if (out / "config.json").exists():
        assert json.loads((out / "config.json").read_text())["status"] == "failed"


def test_divergence_rule():
    from heads.train.loop import divergence

    rng = np.random.default_rng(0)
    train_mos, val_mos = rng.uniform(2, 8, 100), rng.uniform(2, 8, 20)
    history = [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 1.0}]
    good = {"val": (None, val_mos + 0.3), "test": (None, rng.uniform(1.5, 9, 20))}
    assert divergence(history, 0.1, train_mos, val_mos, good) is None
    nan = history + [{"epoch": 3, "loss": float("nan")}]
    assert divergence(nan, 0.1, train_mos, val_mos, good) == "the training loss was not finite at epoch 3"
    constant = np.mean((val_mos - train_mos.mean()) ** 2)
    assert divergence(history, 9 * constant, train_mos, val_mos, good) is None
    assert "the loss exploded" in divergence(history, 11 * constant, train_mos, val_mos, good)
    assert "the loss exploded" in divergence(history, float("inf"), train_mos, val_mos, good)
    lo, hi = train_mos.min(), train_mos.max()
    for value in (hi + 0.51 * (hi - lo), lo - 0.51 * (hi - lo), -4000.0, float("nan")):
        test = rng.uniform(3, 7, 20)
        test[5] = value
        why = divergence(history, 0.1, train_mos, val_mos, {"val": (None, val_mos), "test": (None, test)})
        assert why is not None and why.startswith("1 of 20 test predictions leave the label range"), why


def test_a_run_that_blows_up_is_marked_diverged_never_done(narrow_store, tmp_path):
    from mlsp.errors import TrainingError

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="training diverged: .*try a lower --lr") as caught:
        train(TrainConfig(head="single1fc", store=narrow_store, out=str(out), lr=1e3, epochs=2, steps_per_epoch=5))
    assert "\n" not in str(caught.value)
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "diverged" and config["error"] in str(caught.value)
    assert "metrics" not in config and not (out / "metrics.json").exists()
