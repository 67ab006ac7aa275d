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
from heads.finetune import checkpoint
from heads.finetune.checkpoint import Checkpoint
from heads.finetune.config import FinetuneConfig
from heads.finetune.loop import validation_loss
from heads.finetune.metrics import auc, binary_metrics, run_metrics
from heads.finetune.nets import NETS
from heads.targets import emd
from mlsp.errors import ConfigError, ResumeError, WeightsUnavailableError

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
    from mlsp.backbone_weights import WeightsSource

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
