"""``mlsp finetune`` and ``mlsp compare`` (heads/finetune/): metrics against independent
computations, the configuration's checks and the checkpoint's (fast); on planted images whose MOS
follows brightness, sharpness and colourfulness, a small network learns it, is killed in phase 2
and resumes, and is scored, evaluated, exported and compared (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from scipy import stats

from finetune_data import planted_images
from helpers import same_threads_env
from heads.finetune import checkpoint
from heads.finetune.checkpoint import Checkpoint
from heads.finetune.config import FinetuneConfig
from heads.finetune.loop import validation_loss
from heads.finetune.metrics import auc, binary_metrics, run_metrics
from heads.finetune.nets import NETS
from heads.targets import emd
from mlsp.errors import ConfigError, ResumeError, WeightsUnavailableError
from mlsp.images.decode import SALIENCY_SUFFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(net="mobilenet_025", weights="random:0", size=64, batch_size=16, dropout=0.25, optimizer="adam",
            val_fraction=0.2)


# --------------------------------------------------------------------------------------------
# Metrics against independent computations
# --------------------------------------------------------------------------------------------


def test_auc_is_the_share_of_pairs_ranked_right():
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.4
    score = np.round(rng.random(300) + 0.3 * positive, 1)  # many ties
    pairs = score[positive][:, None] - score[~positive][None, :]
    by_pairs = (np.sum(pairs > 0) + 0.5 * np.sum(pairs == 0)) / pairs.size
    assert auc(positive, score) == pytest.approx(by_pairs, abs=1e-12)
    u = stats.mannwhitneyu(score[positive], score[~positive]).statistic
    assert auc(positive, score) == pytest.approx(u / (positive.sum() * (~positive).sum()), abs=1e-12)
    assert auc(positive, -score) == pytest.approx(1 - by_pairs, abs=1e-12)
    assert auc(np.ones(3, bool), [1, 2, 3]) is None


def test_binary_metrics_by_hand_and_delta_leaves_out_the_middle():
    mos = np.array([2.0, 4.0, 4.9, 5.0, 5.2, 6.0, 8.0, 7.0])
    score = np.array([0.1, 0.6, 0.4, 0.2, 0.9, 0.7, 0.8, 0.3])  # probabilities of "good"
    m = binary_metrics(mos, score, 0.5)
    truth, said = mos > 5, score > 0.5
    assert m["accuracy"] == pytest.approx(np.mean(truth == said))
    recall_good = np.sum(said & truth) / truth.sum()
    recall_bad = np.sum(~said & ~truth) / (~truth).sum()
    assert m["balanced_accuracy"] == pytest.approx((recall_good + recall_bad) / 2)
    kept = np.abs(mos - 5) >= 1.0  # delta 1: 4.9, 5.0, 5.2 (and 4.0: |4 - 5| = 1 stays) are decided or not
    m1 = binary_metrics(mos, score, 0.5, delta=1.0)
    assert m1["n_binary"] == kept.sum() == 5
    assert m1["accuracy"] == pytest.approx(np.mean(truth[kept] == said[kept]))


def test_emd_and_distribution_metrics_against_scipy():
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(10), 20), rng.dirichlet(np.ones(10), 20)
    scores = np.arange(1, 11)
    w1 = np.array([stats.wasserstein_distance(scores, scores, a, b) for a, b in zip(p, q)])
    assert np.allclose(emd(p, q, 1), w1 / 10)  # mean over the 10 CDF differences, not their sum
    cdf = np.cumsum(p, 1) - np.cumsum(q, 1)
    assert np.allclose(emd(p, q, 2), np.sqrt(np.mean(cdf**2, 1)))
    votes = np.round(p * 200)
    m = run_metrics("distribution", votes @ scores / votes.sum(1), q, votes)
    assert m["emd2"] == pytest.approx(np.mean(emd(votes / votes.sum(1, keepdims=True), q, 2)))
    assert m["srcc"] == pytest.approx(stats.spearmanr(votes @ scores / votes.sum(1), q @ scores)[0])


def test_validation_losses():
    y = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert validation_loss("binary", y, p) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert validation_loss("mos", np.array([5.0, 6.0]), np.array([5.5, 5.0])) == pytest.approx((0.25 + 1) / 2)


# --------------------------------------------------------------------------------------------
# Configuration, registry, checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"delta": 0.5}, "--target binary"),
    ({"target": "binary", "unfreeze": "top"}, "--unfreeze"),
    ({"size": 16}, "at least"),
    ({"optimizer": "rmsprop"}, "--optimizer"),
    ({"net": "alexnet"}, "alexnet"),
])
def test_config_refuses(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(images=str(tmp_path), labels="x.csv", **options)


def test_imagenet_weights_without_a_pinned_hash_are_refused():
    from heads.finetune.model import check_weights_pinned
    from mlsp.backbone.weights import WeightsSource

    with pytest.raises(WeightsUnavailableError, match="pins no hash.*--weights PATH"):
        check_weights_pinned(NETS["mobilenet"], WeightsSource.parse("imagenet"))
    check_weights_pinned(NETS["vgg16"], WeightsSource.parse("imagenet"))  # Keras pins VGG16's: no error


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "mobilenet_025" else [pytest.mark.slow])
                                  for n in NETS])
def test_every_net_builds_with_its_blocks(name):
    spec = NETS[name]
    model = spec.build()
    names = [layer.name for layer in model.layers]
    assert all(block in names for block in spec.blocks), spec.blocks
    assert [names.index(b) for b in spec.blocks] == sorted(names.index(b) for b in spec.blocks)
    assert spec.weights_url.endswith(spec.weights_file)


def test_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    checkpoint.save(str(tmp_path), {"phase": 1, "epoch": 1}, model, model.get_weights(), {})
    assert Checkpoint(str(tmp_path)).state == {"phase": 1, "epoch": 1}
    path = tmp_path / checkpoint.FILE
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # change one byte inside the kernel's data
        info = z.getinfo("model/00000.npy")
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 3
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ResumeError) as damaged:
        Checkpoint(str(tmp_path))
    assert "damaged checkpoint" in str(damaged.value) and "\n" not in str(damaged.value)
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # cut by a full disk
    with pytest.raises(ResumeError, match="damaged checkpoint"):
        Checkpoint(str(tmp_path))
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    checkpoint.save(str(tmp_path), {}, model, None, {})
    with pytest.raises(ResumeError, match="do not fit this network"):
        Checkpoint(str(tmp_path)).assign("model", other.variables)


# --------------------------------------------------------------------------------------------
# Planted data: learning, kill -9 and resume, score, evaluate, export, compare (slow)
# --------------------------------------------------------------------------------------------

#: MOS run: a random MobileNet learns the planted MOS mostly in phase 2 (test SRCC 0.80 and 0.82 on
#: 32 test images in two draws of the data when these were chosen; chance: |SRCC| < 0.35 at 95%)
LEARN = dict(TINY, target="mos", dropout=0.0, head_epochs=10, epochs=15, patience=5, head_lr=1e-2,
             phase2_head_lr=1e-3, backbone_lr=1e-3)
SRCC_BOUND = 0.6
N_TEST = 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    images, labels, test, _ = planted_images(str(root), n=128, size=96, seed=0)
    return {"root": root, "images": images, "labels": labels, "test": test}


@pytest.fixture(scope="module")
def learned(planted):
    from mlsp import api

    out = str(planted["root"] / "run")
    api.finetune(planted["images"], labels=planted["labels"], test_list=planted["test"], out=out, **LEARN)
    return out


def _cli_args(planted, out, options):
    args = [sys.executable, "-m", "cli", "finetune", "--images", planted["images"], "--labels", planted["labels"],
            "--test-list", planted["test"], "--out", out, "--no-progress", "--workers", "0"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.slow
def test_a_small_network_learns_the_planted_mos(learned):
    metrics = json.load(open(os.path.join(learned, "metrics.json")))
    assert metrics["test"]["n"] == N_TEST
    assert metrics["test"]["srcc"] > SRCC_BOUND, metrics["test"]
    config = json.load(open(os.path.join(learned, "config.json")))
    assert config["status"] == "finished" and config["kind"] == "finetune"
    assert config["params_trained"] > 200_000  # phase 2 trained the whole backbone
    assert not os.path.exists(os.path.join(learned, checkpoint.FILE))  # removed once finished


@pytest.mark.slow
def test_killed_in_phase_2_resumes_to_the_uninterrupted_result(planted, learned, tmp_path):
    out = str(tmp_path / "killed")
    args = _cli_args(planted, out, LEARN)
    env = same_threads_env()  # `learned` was trained in this process
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, checkpoint.FILE)):
            try:
                state = Checkpoint(out).state
            except ResumeError:
                state = {}
            if state.get("phase") == 2 and state.get("epoch", 0) >= 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert json.load(open(os.path.join(out, "config.json")))["status"] == "running"  # killed: nothing marked it
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch" in again.stderr
    want = json.load(open(os.path.join(learned, "metrics.json")))
    have = json.load(open(os.path.join(out, "metrics.json")))
    assert have["test"]["srcc"] == pytest.approx(want["test"]["srcc"], abs=1e-6)
    epochs = [line.split(",")[:5] for line in open(os.path.join(out, "history.csv"))]  # all but the seconds
    assert epochs == [line.split(",")[:5] for line in open(os.path.join(learned, "history.csv"))]


@pytest.mark.slow
def test_binary_target_beats_a_wrong_label_mapping(planted, tmp_path):
    from mlsp import api

    result = api.finetune(planted["images"], labels=planted["labels"], test_list=planted["test"],
                          out=str(tmp_path / "binary"), **dict(LEARN, target="binary", delta=0.5, head_epochs=15, unfreeze="0"))
    test = result.metrics["test"]
    import pandas as pd

    frame = pd.read_csv(os.path.join(result.run_dir, "predictions.csv"))
    frame = frame[(frame.split == "test") & ((frame.mos - 5).abs() >= 0.5)]
    flipped = binary_metrics(10 - frame.mos.to_numpy(), frame.pred.to_numpy(), 0.5)  # good <-> bad
    # phase 1 alone (the head on a random MobileNet): accuracy 0.74 and AUC 0.88 on the 23 test images
    # outside 5 +- 0.5 when the bounds were chosen; the mapping good <-> bad gets their complements
    assert test["accuracy"] > 0.65 and test["auc"] > 0.75, test
    assert flipped["accuracy"] < 0.35 and flipped["auc"] < 0.25, flipped
    assert test["n_binary"] == len(frame) < N_TEST


@pytest.mark.slow
def test_score_evaluate_export_report_explain_a_finetuned_run(learned, planted, tmp_path):
    import pandas as pd

    from heads.score.export import load_exported
    from heads.finetune.images import load_whole
    from heads.run import Run
    from mlsp import api

    frame = api.score(learned, images=planted["images"], out=str(tmp_path / "scores.csv"))
    predictions = pd.read_csv(os.path.join(learned, "predictions.csv"), dtype={"id": str})
    both = predictions.merge(frame, on="id", suffixes=("", "_scored"))
    assert len(both) == len(predictions) and np.allclose(both.pred, both.pred_scored, atol=1e-4)
    with pytest.raises(ConfigError, match="no store"):
        api.score(learned, store=str(tmp_path / "x.h5"))
    metrics = api.evaluate(learned, out=str(tmp_path / "eval"))
    stored = json.load(open(os.path.join(learned, "metrics.json")))
    assert metrics["test"]["srcc"] == pytest.approx(stored["test"]["srcc"], abs=1e-6)
    path = api.export(learned, str(tmp_path / "model.keras"))
    exported = load_exported(path)
    paths = sorted(os.path.join(planted["images"], f) for f in os.listdir(planted["images"]))[:4]
    batch = np.stack([load_whole(p, LEARN["size"]) for p in paths])  # already the run's size: no resizing
    network = Run.open(learned).load_model()
    assert np.allclose(np.asarray(exported.predict_on_batch(batch)),
                       np.asarray(network.predict_on_batch(batch))[:, 0], atol=1e-4)
    explained, errors = api.explain(paths[:1], str(tmp_path / "saliency"), run=learned, samples=2)
    assert len(explained) == 1 and not errors
    name = os.path.splitext(os.path.basename(paths[0]))[0] + SALIENCY_SUFFIX + ".npy"
    saliency = np.load(str(tmp_path / "saliency" / name))
    assert saliency.shape == (96, 96) and saliency.max() == pytest.approx(1.0)
    page = api.report(learned, str(tmp_path / "report.html"), images=planted["images"])
    assert "Run: run" in open(page, encoding="utf-8").read()


@pytest.fixture(scope="module")
def compared(sample_store, sample_run, tmp_path_factory):
    """A short fine-tuning of the sample store's images (one phase-1 epoch) and the page of it
    beside the sample's MLSP run."""
    from mlsp import api

    root = os.path.dirname(sample_store["images"])
    tmp = tmp_path_factory.mktemp("compared")
    out = str(tmp / "ft")
    api.finetune(sample_store["images"], labels=os.path.join(root, "AVA.txt"),
                 test_list=os.path.join(root, "generic_test.jpgl"), out=out,
                 **dict(TINY, val_fraction=0.25, head_epochs=1, epochs=0, unfreeze="0"))
    return {"mlsp": sample_run, "finetuned": out, "page": str(tmp / "compare.html")}


@pytest.mark.slow
def test_compare_sets_a_finetuned_run_beside_an_mlsp_run(compared, learned):
    import pandas as pd
    from click.testing import CliRunner

    import cli
    from mlsp import api

    runs = [compared["mlsp"], compared["finetuned"]]
    result = CliRunner().invoke(cli.main, ["compare", *runs, "--out", compared["page"]])
    assert result.exit_code == 0, result.output
    rows = api.compare(runs)
    assert [r["method"] for r in rows] == ["MLSP", "fine-tuned"]
    assert rows[0]["n"] == rows[1]["n"] > 0
    for row, run in zip(rows, runs):
        frame = pd.read_csv(os.path.join(run, "predictions.csv"))
        frame = frame[frame.split == "test"]
        assert row["srcc"] == pytest.approx(stats.spearmanr(frame.mos, frame.pred)[0])
        assert row["params_trained"] > 0 and row["train_seconds"] > 0
    refused = CliRunner().invoke(cli.main, ["compare", compared["mlsp"], learned])
    assert refused.exit_code == 1 and "test splits of" in refused.output and "differ" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_comparison_page_in_a_browser(compared):
    from browser import chrome, why_not

    if why_not():
        pytest.skip(why_not())
    from mlsp import api

    api.compare([compared["mlsp"], compared["finetuned"]], out=compared["page"])
    driver = chrome()
    try:
        driver.get("file://" + os.path.abspath(compared["page"]))
        rows = driver.find_elements("css selector", "#comparison tbody tr")
        assert len(rows) == 2
        assert "MLSP" in rows[0].text and "fine-tuned" in rows[1].text
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


@pytest.mark.slow
def test_both_phases_run_on_the_torch_backend(tmp_path):
    """The training step is keras.ops and mlsp's backend helpers: it runs on PyTorch (the GPU route
    without TensorFlow's CUDA build), and the run scores there too."""
    pytest.importorskip("torch")
    images, labels, test, _ = planted_images(str(tmp_path), n=24, size=64, seed=2)
    out = str(tmp_path / "torch-run")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    args = [sys.executable, "-m", "cli", "finetune", "--images", images, "--labels", labels, "--test-list", test,
            "--out", out, "--net", "mobilenet_025", "--weights", "random:0", "--size", "48", "--batch-size", "8",
            "--head-epochs", "1", "--epochs", "1", "--steps-per-epoch", "1", "--val-fraction", "0.25",
            "--target", "distribution", "--no-progress"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["versions"]["keras_backend"] == "torch" and config["status"] == "finished"
    scored = subprocess.run([sys.executable, "-m", "cli", "score", out, "--images", images], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0 and "p10" in scored.stdout, scored.stderr[-2000:]
