"""heads.evaluation: the metrics (by hand), and `mlsp evaluate` on a run's own store and on
another store of the same layout."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from synthetic import write_synthetic_store
from mlsp.errors import ConfigError


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_metrics_by_hand():
    from heads.evaluation import compute_metrics

    mos = np.array([2.0, 4.0, 5.0, 6.0, 8.0, 9.0])
    pred = np.array([3.0, 5.5, 4.0, 7.0, 6.0, 5.0])
    m = compute_metrics(mos, pred)
    # high quality is MOS > 5: truth [F F F T T T], prediction [F T F T T F]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["n"] == 6
    # Spearman by hand: ranks of pred [1 4 2 6 5 3] against [1..6], no ties
    d = np.array([1, 4, 2, 6, 5, 3]) - np.arange(1, 7)
    assert m["srcc"] == pytest.approx(1 - 6 * np.sum(d**2) / (6 * 35))
    x, y = mos - mos.mean(), pred - pred.mean()
    assert m["plcc"] == pytest.approx(np.sum(x * y) / np.sqrt(np.sum(x**2) * np.sum(y**2)))


def test_balanced_accuracy_is_not_fooled_by_a_majority_guess():
    from heads.evaluation import compute_metrics

    mos = np.array([6.0] * 7 + [4.0] * 3)
    m = compute_metrics(mos, np.full(10, 5.5) + np.arange(10) * 1e-3)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_metrics_edge_cases():
    from heads.evaluation import compute_metrics

    constant = compute_metrics(np.array([3.0, 6.0, 7.0]), np.full(3, 6.0))
    assert constant["srcc"] is None and constant["plcc"] is None and constant["accuracy"] == pytest.approx(2 / 3)
    one = compute_metrics(np.array([6.0]), np.array([7.0]))
    assert one["srcc"] is None and one["accuracy"] == 1.0 and one["balanced_accuracy"] == 1.0
    assert compute_metrics(np.array([]), np.array([]))["n"] == 0
    # exactly 5 is low quality, for truth and prediction alike
    assert compute_metrics(np.array([5.0, 5.0]), np.array([5.0, 5.01]))["accuracy"] == 0.5


def test_evaluate_on_another_store_of_the_same_layout(tmp_path):
    own = str(tmp_path / "own.h5")
    write_synthetic_store(own, 200, n_views=2, block_channels=(32, 64, 32), seed=4)
    out = tmp_path / "run"
    assert invoke("train", "--store", own, "--head", "single1fc", "--out", out, "--epochs", "1",
                  "--no-progress").exit_code == 0
    other = str(tmp_path / "other.h5")
    write_synthetic_store(other, 60, n_views=2, block_channels=(32, 64, 32), seed=5)
    res = invoke("evaluate", out, "--store", other)
    assert res.exit_code == 0, res.output
    folders = [p for p in os.listdir(out) if p.startswith("eval-other-")]
    assert len(folders) == 1
    assert json.loads((out / folders[0] / "metrics.json").read_text())["test"]["n"] > 0
    # a store of another layout is refused
    write_synthetic_store(str(tmp_path / "bad.h5"), 20, n_views=1, block_channels=(8,))
    res = CliRunner().invoke(cli.main, ["evaluate", str(out), "--store", str(tmp_path / "bad.h5")])
    assert res.exit_code != 0 and "but the model" in res.output


def test_evaluate_recomputes_the_run_and_refuses_an_unfinished_one(tmp_path):
    from heads.evaluation import evaluate
    from heads.train.loop import TrainConfig, train

    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 150, n_views=3, block_channels=(4, 8), pooling="wide", seed=2)
    result = train(TrainConfig(head="multi3fc", store=store, out=str(tmp_path / "run"), epochs=2, lr=1e-3))
    (tmp_path / "run" / "metrics.json").unlink()
    again = evaluate(result.run_dir)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == again
    for split in ("val", "test"):
        for key, value in result.metrics[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-5)
    os.remove(os.path.join(result.run_dir, "model.keras"))
    with pytest.raises(ConfigError, match="not a finished run: model.keras is missing"):
        evaluate(result.run_dir)
