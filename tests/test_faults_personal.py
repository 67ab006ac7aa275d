"""Personal models under hostile use: people whose ids hold line breaks and other characters
str.splitlines() breaks at, kill -9 between a personal model's two files, an infinite scale, and
damaged personal models given to `mlsp score --user` (heads/personal/model_file.py, the one
reader and writer of a personal model; mlsp/runtime/jsonlines.py, the one reader of partial files)."""

import csv
import hashlib
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from synthetic import write_synthetic_store
from test_faults import ROOT, faulty_command, run

import cli
from heads.personal import evaluate, personalize
from mlsp import api
from mlsp.errors import ConfigError
from mlsp.sample import plant_ratings

N_IMAGES = 120
#: Ids a line-based reader breaks apart: a line break, U+2028, a file separator, NEL, and
#: pieces that equal other raters' ids once broken ("b" is a rater, "a\nb" another).
HOSTILE = ["a\nb", "b", "sep\u2028arator", "file\x1csep", "next\x85line", "crlf\r\nid", "plain"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small store, a Single-1FC run on it, and raters with planted taste: the hostile ids
    (the test raters) and four plain ones (training raters), each rating 40 images."""
    root = tmp_path_factory.mktemp("personal-faults")
    store = str(root / "s.h5")
    truth = write_synthetic_store(store, N_IMAGES, n_views=2, block_channels=(8, 8), seed=3)
    run_dir = api.train(store, head="single1fc", out=str(root / "run"), epochs=2, seed=0).run_dir
    ids = [f"img{i:06d}" for i in range(N_IMAGES)]
    planted = plant_ratings(truth["mean_features"], truth["mos"], ids, users=len(HOSTILE) + 4, per_user=40, seed=1)
    names = dict(zip(planted.users, HOSTILE + [f"train{k}" for k in range(4)]))
    ratings = root / "ratings.csv"
    with open(ratings, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "image", "score"])
        writer.writerows((names[u], f"{i}.jpg", s) for u, i, s in planted.rows)
    users = root / "test_users.txt"
    users.write_text("".join(f"{u}\n" for u in HOSTILE if "\n" not in u), encoding="utf-8", newline="")
    return {"root": root, "store": store, "run": run_dir, "ratings": str(ratings), "users": str(users)}


def _evaluation(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_evaluation_keeps_every_person_whatever_their_id(world, tmp_path, monkeypatch):
    """Every hostile id is evaluated under its own name, none lost or merged; an evaluation
    interrupted after 5 draws and run again gives the rows of an uninterrupted one."""
    from heads.personal import protocol

    whole = tmp_path / "whole"
    evaluate(world["run"], world["store"], world["ratings"], str(whole), ks=(10,), repeats=2, method="residual")
    rows = _evaluation(whole / "evaluation.csv")
    assert sorted(r["user"] for r in rows) == sorted(2 * (HOSTILE + [f"train{k}" for k in range(4)]))
    real, calls = protocol.evaluate_person, [0]

    def stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(protocol, "evaluate_person", stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate(world["run"], world["store"], world["ratings"], str(resumed), ks=(10,), repeats=2, method="residual")
    monkeypatch.setattr(protocol, "evaluate_person", real)
    evaluate(world["run"], world["store"], world["ratings"], str(resumed), ks=(10,), repeats=2, method="residual")
    assert _evaluation(resumed / "evaluation.csv") == rows
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(whole))


def test_test_raters_listed_with_such_ids_are_each_one_person(world, tmp_path):
    """--users lists ids holding U+2028, \\x1c and NEL, one a line: each is one test rater."""
    evaluate(world["run"], world["store"], world["ratings"], str(tmp_path / "e"), users_file=world["users"],
             ks=(10,), repeats=1, method="taste")
    users = {r["user"] for r in _evaluation(tmp_path / "e" / "evaluation.csv")}
    assert users == {u for u in HOSTILE if "\n" not in u}


def test_an_evaluation_that_cannot_start_writes_nothing(world, tmp_path):
    out = tmp_path / "e"
    with pytest.raises(ConfigError, match=r"no test rater has k \+ 5 rated images"):
        evaluate(world["run"], world["store"], world["ratings"], str(out), ks=(200,), repeats=1)
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("scale", [("1", "inf"), ("-inf", "5"), ("nan", "5")])
def test_an_infinite_or_nan_scale_is_refused(world, tmp_path, scale):
    res = CliRunner().invoke(cli.main, ["personalize", "--run", world["run"], "--store", world["store"],
                                        "--ratings", world["ratings"], "--user", "plain", "--scale", *scale,
                                        "--out", str(tmp_path / "me")])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "finite" in lines[0] and "Traceback" not in res.output, res.output
    assert not (tmp_path / "me").exists()


@pytest.fixture(scope="module")
def model(world):
    """A personal model of "plain" (residual)."""
    out = str(world["root"] / "plain")
    personalize(world["run"], world["store"], world["ratings"], "plain", out, method="residual")
    return out


def _score(world, *user_dirs):
    args = ["score", world["run"], "--store", world["store"]]
    for user_dir in user_dirs:
        args += ["--user", str(user_dir)]
    return CliRunner().invoke(cli.main, args + ["--out", os.devnull])


def _copy(model, tmp_path):
    import shutil

    return shutil.copytree(model, tmp_path / "m")


def _rehash(folder):
    """personal.json recording its npz again, as a model written whole with these arrays would."""
    meta = json.loads((folder / "personal.json").read_text())
    meta["arrays_sha256"] = hashlib.sha256((folder / "personal.npz").read_bytes()).hexdigest()
    (folder / "personal.json").write_text(json.dumps(meta))


def _meta(change):
    def damage(folder):
        meta = json.loads((folder / "personal.json").read_text())
        (folder / "personal.json").write_text(json.dumps(change(meta)))
    return damage


def _arrays(change, rehash=True):
    def damage(folder):
        with np.load(folder / "personal.npz") as arrays:
            state = {k: arrays[k] for k in arrays.files}
        np.savez(folder / "personal.npz", **change(state))
        if rehash:
            _rehash(folder)
    return damage


def _text(name, text):
    def damage(folder):
        (folder / name).write_bytes(text)
    return damage


def _truncate(folder):
    data = (folder / "personal.npz").read_bytes()
    (folder / "personal.npz").write_bytes(data[: len(data) // 2])
    _rehash(folder)


def _drop(key):
    return _meta(lambda m: {k: v for k, v in m.items() if k != key})


DAMAGED = [
    ("missing-user", _drop("user"), "personal.json: the key 'user' is missing"),
    ("missing-generic", _drop("generic"), "personal.json: the key 'generic' is missing"),
    ("scale-a-string", _meta(lambda m: {**m, "scale": "1..5"}), "personal.json: 'scale' is \"1..5\", expected a list"),
    ("scale-infinite", _meta(lambda m: {**m, "scale": [1, float("inf")]}), "lower to a higher finite score"),
    ("user-a-number", _meta(lambda m: {**m, "user": 7}), "personal.json: 'user' is 7, expected a string"),
    ("generic-a-list", _meta(lambda m: {**m, "generic": []}), "personal.json: 'generic' is [], expected an object"),
    ("unknown-kind", _meta(lambda m: {**m, "kind": "oracle"}), "personal.json: kind 'oracle' is not one mlsp knows"),
    ("json-a-list", _text("personal.json", b"[1, 2]"), "personal.json: not a personal model (a JSON list"),
    ("json-not-json", _text("personal.json", b"{\"user\": "), "personal.json: not a personal model (not JSON"),
    ("json-deep", _text("personal.json", b"[" * 100_000), "personal.json: not a personal model (not JSON"),
    ("npz-empty", _arrays(lambda s: {}, rehash=False), "personal.npz: not the arrays personal.json was written with"),
    ("npz-empty-file", _text("personal.npz", b""), "personal.npz: not the arrays personal.json was written with"),
    ("npz-empty-rehashed", lambda f: (_text("personal.npz", b"")(f), _rehash(f)), "personal.npz: empty (0 bytes)"),
    ("npz-truncated", _truncate, "personal.npz: not a readable .npz archive"),
    ("npz-of-another-model", _arrays(lambda s: {**s, "b": np.float64(9.0)}, rehash=False),
     "personal.npz: not the arrays personal.json was written with"),
    ("npz-missing-array", _arrays(lambda s: {"w": s["w"]}), "personal.npz: lacks the array 'b' of a residual model"),
    ("npz-wrong-shape", _arrays(lambda s: {**s, "w": np.ones(3)}), "personal.npz: its arrays do not fit this generic"),
    ("npz-strings", _arrays(lambda s: {**s, "w": np.array(["x"] * len(s["w"]))}),
     "personal.npz: the array 'w' is <U1, not numbers"),
    ("npz-nan", _arrays(lambda s: {**s, "w": np.where(np.arange(len(s["w"])) == 2, np.nan, s["w"])}),
     "personal.npz: the array 'w' holds NaN or infinite values"),
    ("npz-missing", lambda f: os.remove(f / "personal.npz"), "not a personal model (personal.npz is missing)"),
]


@pytest.mark.parametrize("case, damage, named", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_personal_model_is_one_line_naming_the_file(world, model, tmp_path, case, damage, named):
    folder = _copy(model, tmp_path)
    damage(folder)
    res = _score(world, folder)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {folder}"), res.output
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("version", [2, 1])
def test_the_undamaged_copy_scores_and_a_model_of_format_1_still_loads(world, model, tmp_path, version):
    """The copy scores as its original; a json of format 1 (before it recorded the npz's hash) is read."""
    folder = _copy(model, tmp_path)
    if version == 1:
        _meta(lambda m: {**{k: v for k, v in m.items() if k != "arrays_sha256"}, "format_version": 1})(folder)
    frames = []
    for user_dir in (folder, model):
        scores = tmp_path / f"s{len(frames)}.csv"
        res = CliRunner().invoke(cli.main, ["score", world["run"], "--store", world["store"], "--user", str(user_dir),
                                            "--out", str(scores)])
        assert res.exit_code == 0, res.output
        frames.append(pd.read_csv(scores)["pred_plain"])
    assert frames[0].notna().all() and np.ptp(frames[0]) > 0
    np.testing.assert_allclose(frames[0], frames[1])


@pytest.mark.slow
def test_killed_between_the_two_files_never_leaves_one_person_predicting_as_another(world, model, tmp_path):
    """Personalise "b" into the folder of "plain"'s model, killed as personal.json is written
    (after personal.npz): the folder then holds no model that claims "plain" (it is refused in
    one line), and personalising again into it works."""
    folder = _copy(model, tmp_path)
    env = {"env": dict(os.environ, MLSP_ROOT=ROOT, PYTHONPATH=ROOT)}
    args = ["personalize", "--run", world["run"], "--store", world["store"], "--ratings", world["ratings"],
            "--user", "b", "--method", "residual", "--out", folder]
    res = run(env, faulty_command("json:dump", 1, "kill", *args))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = _score(world, folder)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "personal.json is missing" in res.output
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((folder / "personal.json").read_text())["user"] == "b"
    scores = tmp_path / "s.csv"
    res = CliRunner().invoke(cli.main, ["score", world["run"], "--store", world["store"], "--user", str(folder),
                                        "--out", str(scores)])
    assert res.exit_code == 0 and "pred_b" in pd.read_csv(scores).columns, res.output
