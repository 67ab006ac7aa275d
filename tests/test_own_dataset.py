"""One's own dataset: a folder of photos and a CSV of one's own ratings, no test list, through
the CLI to a trained head."""

import json

import pytest
from click.testing import CliRunner

import cli
from helpers import write_image


@pytest.mark.slow
def test_a_csv_of_own_ratings_trains_without_a_test_list(tmp_path):
    src = tmp_path / "photos"
    ratings = ["id,mos"]
    for k in range(12):
        write_image(src / f"IMG_{k:04d}.jpg", 96, 100 + 2 * k, seed=k)
        ratings.append(f"IMG_{k:04d}.jpg,{1 + (k * 7) % 9 + 0.5}")
    (tmp_path / "ratings.csv").write_text("\n".join(ratings) + "\n")
    out = tmp_path / "s.h5"
    runner = CliRunner()
    args = ["extract", "--images", src, "--net", "iv3", "--narrow", "--weights", "random:0", "--labels",
            tmp_path / "ratings.csv", "--out", out, "--test-fraction", "0.25", "--val-fraction", "0.2"]
    res = runner.invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(cli.main, ["inspect", str(out), "--json", "--quick"]).output)
    assert info["test_fraction"] == 0.25 and info["splits"]["unlabeled"] == 0
    assert all(info["splits"][s] >= 1 for s in ("train", "val", "test")), info["splits"]
    res = runner.invoke(cli.main, ["train", "--store", str(out), "--head", "single1fc", "--out", str(tmp_path / "run"),
                                   "--epochs", "1", "--steps-per-epoch", "2", "--no-progress"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["n"] == info["splits"]["test"]
    # a test list and a test fraction at once is a usage error
    res = runner.invoke(cli.main, [str(a) for a in args + ["--test-list", tmp_path / "ratings.csv"]])
    assert res.exit_code == 2 and "not both" in res.output
