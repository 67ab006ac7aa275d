"""Personal taste: heads adapted to one person (heads.personal), the PIAA evaluation protocol,
`mlsp personalize` and `mlsp score --user`, on a synthetic store with planted personal taste."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cli
from heads.personal import METHODS, evaluate, personalize
from heads.personal.adapt import FOLDS, choose, from_generic, to_generic
from heads.personal.methods import Context
from heads.personal.people import read_rated
from heads.personal.protocol import COLUMNS, draw
from mlsp import api
from mlsp.errors import ConfigError, LabelsError, StoreConfigMismatch
from mlsp.sample import plant_ratings
from synthetic import write_synthetic_store

N_IMAGES = 500
TEST_RATERS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic store (planted MOS), a Single-1FC run on it, and 24 raters rating 150 images
    each with planted taste (3 shared directions, strength 1 against the generic signal's 1); the
    last of them rates at random. The last 6 raters are the test raters."""
    root = tmp_path_factory.mktemp("personal")
    store = str(root / "s.h5")
    truth = write_synthetic_store(store, N_IMAGES, n_views=2, block_channels=(16, 32, 16), seed=3)
    run = api.train(store, head="single1fc", out=str(root / "run"), epochs=6, seed=0).run_dir
    ids = [f"img{i:06d}" for i in range(N_IMAGES)]
    planted = plant_ratings(truth["mean_features"], truth["mos"], ids, users=24, per_user=150, noise_users=1, seed=0)
    ratings = root / "ratings.csv"
    rows = planted.rows + [("rater000", "not_stored", 3), ("rater001", "gone.jpg", 4)]
    ratings.write_text("user,image,score\n" + "".join(f"{u},{i}.jpg,{s}\n" for u, i, s in rows))
    users = root / "test_users.txt"
    users.write_text("".join(f"{u}\n" for u in planted.users[-TEST_RATERS:]))
    return {"root": root, "store": store, "run": run, "ratings": str(ratings), "users": str(users),
            "planted": planted, "ids": ids}


@pytest.fixture(scope="module")
def evaluation(world):
    out = str(world["root"] / "eval")
    summary = evaluate(world["run"], world["store"], world["ratings"], out, users_file=world["users"], ks=(10, 100),
                       repeats=3, seed=0)
    return {"out": out, "summary": summary, "frame": pd.read_csv(os.path.join(out, "evaluation.csv"), dtype={"user": str})}


def test_scale_maps_onto_the_generic_scale_and_back():
    scores = np.array([1, 2, 3, 4, 5.0])
    np.testing.assert_allclose(to_generic(scores, (1, 5)), [1, 3.25, 5.5, 7.75, 10])
    np.testing.assert_allclose(from_generic(to_generic(scores, (1, 5)), (1, 5)), scores)


def test_personal_models_gain_at_k100_and_never_lose_at_k10(evaluation, world):
    frame, summary = evaluation["frame"], evaluation["summary"]
    assert list(frame.columns) == list(COLUMNS)
    assert set(frame["k"]) == {10, 100} and set(frame["repeat"]) == {0, 1, 2}
    assert len(frame) == 2 * 3 * TEST_RATERS
    assert (frame["n_adapt"] == frame["k"]).all() and (frame["n_adapt"] + frame["n_test"] == 150).all()
    gain = frame.assign(gain=frame["srcc_personal"] - frame["srcc_generic"])
    planted = [u for u in world["planted"].users[-TEST_RATERS:] if u not in world["planted"].noise]
    at100 = gain[(gain["k"] == 100) & gain["user"].isin(planted)]
    by_repeat = at100.groupby("repeat")["gain"].mean()
    assert by_repeat.mean() > 0.1 and by_repeat.mean() > 3 * by_repeat.std(), by_repeat
    assert summary["100"]["mean"] > 0.1 and summary["100"]["mean"] > 3 * summary["100"]["std_over_repeats"]
    assert summary["10"]["mean"] >= 0.0, summary["10"]
    assert summary["100"]["srcc_personal"] > summary["100"]["srcc_generic"]
    for key in ("mean", "std", "min", "max"):
        assert json.load(open(os.path.join(evaluation["out"], "summary.json")))["100"][key] == summary["100"][key]
    assert os.path.getsize(os.path.join(evaluation["out"], "gain_per_person.png")) > 5000
    assert not os.path.exists(os.path.join(evaluation["out"], "evaluation.csv.partial"))


def test_a_person_of_pure_noise_gets_no_gain_and_no_harm(evaluation, world):
    frame = evaluation["frame"]
    noise = frame[frame["user"].isin(world["planted"].noise)]
    assert len(noise) == 6
    gain = noise["srcc_personal"] - noise["srcc_generic"]
    assert abs(gain.mean()) < 0.05 and gain.min() > -0.1, gain.tolist()


def test_draws_never_put_a_test_image_into_adaptation_and_are_reproducible(world, evaluation):
    rated = read_rated(world["run"], world["store"], world["ratings"])
    for user in world["planted"].users[-TEST_RATERS:]:
        images, _ = rated.person(user)
        for k in (10, 100):
            for repeat in range(3):
                adapt_at, test_at = draw(len(images), k, 0, repeat, user)
                assert len(adapt_at) == k and len(test_at) == len(images) - k
                assert not np.intersect1d(images.rows[adapt_at], images.rows[test_at]).size
                np.testing.assert_array_equal(draw(len(images), k, 0, repeat, user)[0], adapt_at)
    assert not np.array_equal(draw(150, 10, 0, 0, "a")[0], draw(150, 10, 1, 0, "a")[0])
    again = evaluate(world["run"], world["store"], world["ratings"], str(world["root"] / "again"),
                     users_file=world["users"], ks=(10,), repeats=1, seed=0)
    first = evaluation["frame"]
    first = first[(first["k"] == 10) & (first["repeat"] == 0)].reset_index(drop=True)
    second = pd.read_csv(world["root"] / "again" / "evaluation.csv", dtype={"user": str})
    pd.testing.assert_frame_equal(first, second, check_exact=False, rtol=1e-6)
    assert again["10"]["people"] == TEST_RATERS


def test_adaptation_sees_only_the_drawn_images(world, monkeypatch):
    """Every image any method is fitted on during the protocol is among the k drawn ones."""
    from heads.personal import adapt as adapt_module
    from heads.personal import protocol

    seen = []
    real = adapt_module.fit

    def spy(spec, images, y, context, params):
        seen.append(set(images.rows.tolist()))
        return real(spec, images, y, context, params)

    monkeypatch.setattr(adapt_module, "fit", spy)
    rated = read_rated(world["run"], world["store"], world["ratings"])
    user = world["planted"].users[-2]
    images, _ = rated.person(user)
    row = protocol.evaluate_person(rated, user, 10, 0, Context(rated.head, None, 0), "auto", 0)
    adapt_at, test_at = draw(len(images), 10, 0, 0, user)
    assert row["n_adapt"] == 10 and seen
    assert set().union(*seen) <= set(images.rows[adapt_at].tolist())
    assert not set().union(*seen) & set(images.rows[test_at].tolist())


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_fits_planted_taste_and_its_model_reloads(world, name, tmp_path):
    """Each registered method, forced, on a person with planted taste at k = 100: the model it
    saves predicts the same after loading, on the person's scale, and (but the offset-only
    generic) ranks the person's other images better than the generic model."""
    from heads.personal import load_personal
    from heads.personal.protocol import srcc

    user = world["planted"].users[-3]
    rated = read_rated(world["run"], world["store"], world["ratings"])
    images, scores = rated.person(user)
    adapt_at, test_at = draw(len(scores), 100, 0, 0, user)
    model = personalize(world["run"], world["store"], _subset(world, user, images, adapt_at, tmp_path),
                        user, str(tmp_path / "model"), method=name)
    assert model.method == name and model.n_ratings == 100
    loaded = load_personal(str(tmp_path / "model"), rated.head)
    test = images.take(test_at)
    np.testing.assert_allclose(loaded.predict(test), model.predict(test), rtol=1e-5, atol=1e-5)
    on_scale = model.predict(test)
    assert 0 < on_scale.mean() < 6  # the person's 1..5 scale, not the generic 1..10
    gain = srcc(on_scale, scores[test_at]) - srcc(test.generic, scores[test_at])
    if name == "generic":
        assert abs(gain) < 1e-9
    else:
        assert gain > 0.05, gain


def _subset(world, user, images, adapt_at, tmp_path):
    """A ratings file with the user's drawn ratings only, and every other rater's."""
    frame = pd.read_csv(world["ratings"], dtype=str)
    keep_ids = {world["ids"][r] + ".jpg" for r in images.rows[adapt_at]}
    frame = frame[(frame["user"] != user) | frame["image"].isin(keep_ids)]
    path = tmp_path / "adapt.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_cross_validation_falls_back_to_the_generic_prediction_without_signal(world):
    rated = read_rated(world["run"], world["store"], world["ratings"])
    noise = world["planted"].noise[0]
    images, scores = rated.person(noise)
    taste = rated.taste(world["planted"].users[:-TEST_RATERS])
    picks = [choose(images.take(draw(len(scores), 10, 0, r, noise)[0]),
                    to_generic(scores[draw(len(scores), 10, 0, r, noise)[0]], (1, 5)),
                    Context(rated.head, taste, r)).spec.name for r in range(10)]
    assert picks.count("generic") >= 7, picks
    assert FOLDS == 5


def test_cli_personalize_score_and_evaluate(world, tmp_path):
    runner = CliRunner()
    user = world["planted"].users[-3]
    out = tmp_path / "me"
    res = runner.invoke(cli.main, ["personalize", "--run", world["run"], "--store", world["store"], "--ratings",
                                   world["ratings"], "--user", user, "--out", str(out), "--method", "residual"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "personal.json").read_text())
    assert meta["user"] == user and meta["method"] == "residual" and meta["scale"] == [1.0, 5.0]
    from mlsp.runtime.files import file_sha256

    assert meta["generic"]["sha256"] == file_sha256(os.path.join(world["run"], "model.keras"))
    other = tmp_path / "other"
    res = runner.invoke(cli.main, ["personalize", "--run", world["run"], "--store", world["store"], "--ratings",
                                   world["ratings"], "--user", world["planted"].users[-4], "--out", str(other),
                                   "--method", "taste"])
    assert res.exit_code == 0, res.output
    scores = tmp_path / "scores.csv"
    res = runner.invoke(cli.main, ["score", world["run"], "--store", world["store"], "--user", str(out), "--user",
                                   str(other), "--out", str(scores)])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(scores)
    assert f"pred_{user}" in frame.columns and f"pred_{world['planted'].users[-4]}" in frame.columns
    assert len(frame) == N_IMAGES and frame[f"pred_{user}"].between(-1, 7).all()
    res = runner.invoke(cli.main, ["score", world["run"], "--store", world["store"], "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(frame["pred"], pd.read_csv(tmp_path / "p.csv")["pred"], rtol=1e-5)
    res = runner.invoke(cli.main, ["personalize", "--evaluate", "--run", world["run"], "--store", world["store"],
                                   "--ratings", world["ratings"], "--users", world["users"], "--k", "10",
                                   "--repeats", "1", "--method", "taste", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "k = 10: mean SRCC gain +" in res.output
    assert {"evaluation.csv", "summary.json", "gain_per_person.png"} <= set(os.listdir(tmp_path / "ev"))


def test_flickr_aes_file_is_read_and_its_split_is_asked_for(world, tmp_path):
    flickr = tmp_path / "FLICKR-AES_image_labeled_by_each_worker.csv"
    frame = pd.read_csv(world["ratings"], dtype=str)
    lines = [" worker, imagePair, score"] + [f"{u}, {i}, {s}" for u, i, s in frame.itertuples(index=False)]
    flickr.write_text("\n".join(lines) + "\n")
    rated = read_rated(world["run"], world["store"], str(flickr))
    assert rated.ratings.format == "flickr-aes" and rated.ratings.unmatched == 2
    assert len(rated.ratings.rows) == len(world["planted"].rows)
    with pytest.raises(ConfigError, match="173 training and 37 test workers .* --users"):
        evaluate(world["run"], world["store"], str(flickr), str(tmp_path / "e"), ks=(10,), repeats=1)


def _write(tmp_path, text, name="r.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_input_is_one_line_naming_the_file(world, tmp_path):
    run, store = world["run"], world["store"]
    ids = world["ids"]
    cases = [
        (_write(tmp_path, f"user,image,score\na,{ids[0]},7\n", "scale.csv"), LabelsError, r"scale.csv, line 2: score 7 is outside"),
        (_write(tmp_path, f"user,image,score\na,{ids[0]},3\nb,{ids[1]},2\na,{ids[0]}.jpg,4\n", "dup.csv"),
         LabelsError, r"dup.csv, lines 2 and 4: user 'a' rated image '%s' twice" % ids[0]),
        (_write(tmp_path, "who,what\nx,y\n", "cols.csv"), LabelsError, r"cols.csv: expected the columns"),
        (_write(tmp_path, f"user,image,score\na,{ids[0]},x\n", "num.csv"), LabelsError, r"num.csv, line 2"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            personalize(run, store, path, "a", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"no user 'nobody'"):
        personalize(run, store, world["ratings"], "nobody", str(tmp_path / "out"))
    few = _write(tmp_path, "user,image,score\n" + "".join(f"a,{i},3\n" for i in ids[:3]) + "a,zz,2\n", "few.csv")
    with pytest.raises(ConfigError, match=r"user 'a' has 3 ratings of images in the store \(1 more of images not"):
        personalize(run, store, few, "a", str(tmp_path / "out"))
    other = str(tmp_path / "other.h5")
    write_synthetic_store(other, 20, n_views=2, block_channels=(16, 32, 16), net="othernet")
    with pytest.raises(StoreConfigMismatch, match="othernet"):
        personalize(run, other, world["ratings"], "rater000", str(tmp_path / "out"))
    res = CliRunner().invoke(cli.main, ["personalize", "--run", run, "--store", store, "--ratings",
                                        cases[0][0], "--user", "a", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output
    with pytest.raises(ConfigError, match=r"no test rater has k \+ 5 rated images .* \(200\); choose a smaller --k"):
        evaluate(run, store, world["ratings"], str(tmp_path / "e"), users_file=world["users"], ks=(200,), repeats=1)
    res = CliRunner().invoke(cli.main, ["personalize", "--run", run, "--store", store, "--ratings", world["ratings"],
                                        "--user", "rater000", "--k", "10", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--k is a setting of --evaluate" in res.output


def test_a_personal_model_of_another_generic_model_is_refused(world, tmp_path):
    user = world["planted"].users[-3]
    personalize(world["run"], world["store"], world["ratings"], user, str(tmp_path / "me"), method="generic")
    other = api.train(world["store"], head="single1fc", out=str(tmp_path / "run2"), epochs=1, seed=1).run_dir
    res = CliRunner().invoke(cli.main, ["score", other, "--store", world["store"], "--user", str(tmp_path / "me")])
    assert res.exit_code == 1 and "adapts the generic model" in res.output and "personalise again" in res.output


def test_sample_raters_have_planted_taste_and_unmatched_ratings(tmp_path):
    """`mlsp sample --users N`'s ratings: every stored image rated 1..5 by each rater, the planted
    taste visible (raters disagree beyond noise), ratings of unstored ids reported, test raters listed."""
    from heads.personal.ratings import read_ratings
    from mlsp.sample import write_sample_ratings
    from mlsp.store.read import FeatureStore

    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 60, n_views=2, block_channels=(8, 8), seed=1)
    ratings, test = write_sample_ratings(store, str(tmp_path), 8, seed=0, unstored_ids=["999", "998"])
    with FeatureStore(store) as s:
        ids = list(s.ids)
    read = read_ratings(ratings, ids)
    assert read.unmatched == 2 and len(read.rows) == 8 * 60 and set(read.scores) == {1, 2, 3, 4, 5}
    assert open(test).read().split() == ["rater006", "rater007"]
    table = pd.DataFrame({"user": read.users, "image": read.images, "score": read.scores}).pivot(
        index="image", columns="user", values="score")
    corr = table.corr(method="spearman").to_numpy()
    assert corr[np.triu_indices(7, 1)].std() > 0.15  # raters with planted taste differ from one another
    assert abs(corr[7, :7]).max() < 0.4  # the last rater is pure noise
    with pytest.raises(ConfigError, match="at least 2"):
        write_sample_ratings(store, str(tmp_path), 1)


def test_a_content_model_keeps_its_coefficients_and_its_basis_bound_by_hash(world, tmp_path):
    """A feature-space personal model holds the person's coefficients and the basis's SHA-256; the
    basis is saved once beside the run's model and used only when its arrays hash to that."""
    from heads.personal import load_personal
    from heads.personal.features import BASIS_FOLDER, Basis, load_basis

    user = world["planted"].users[-3]
    rated = read_rated(world["run"], world["store"], world["ratings"])
    model = personalize(world["run"], world["store"], world["ratings"], user, str(tmp_path / "me"), method="content")
    meta = json.loads((tmp_path / "me" / "personal.json").read_text())
    assert meta["kind"] == "content" and meta["basis"]["sha256"] == rated.basis.sha256
    with np.load(tmp_path / "me" / "personal.npz") as arrays:
        assert arrays["w"].size == meta["params"]["dims"] <= meta["basis"]["dims"]
    shared = os.path.join(world["run"], BASIS_FOLDER, meta["basis"]["file"])
    assert os.path.isfile(shared) and not os.path.exists(tmp_path / "me" / meta["basis"]["file"])
    images, _ = rated.person(user)
    np.testing.assert_allclose(load_personal(str(tmp_path / "me"), rated.head).predict(images), model.predict(images),
                               rtol=1e-5, atol=1e-5)
    personalize(world["run"], world["store"], world["ratings"], world["planted"].users[-4], str(tmp_path / "you"),
                method="content_taste")
    assert json.loads((tmp_path / "you" / "personal.json").read_text())["basis"] == meta["basis"]  # one basis
    original = load_basis(shared, meta["basis"]["sha256"])
    planted = Basis(original.mean, original.scale, original.components[:, ::-1].copy())
    try:
        np.savez(shared, mean=planted.mean, scale=planted.scale, components=planted.components)
        with pytest.raises(ConfigError, match=r"personal-basis.*sha256 .* is not the .* personalise again"):
            load_personal(str(tmp_path / "me"), rated.head)
        os.remove(shared)
        with pytest.raises(ConfigError, match=r"its basis basis-.*\.npz is in none of"):
            load_personal(str(tmp_path / "me"), rated.head)
    finally:
        original.save(os.path.dirname(shared))
    assert load_personal(str(tmp_path / "me"), rated.head).basis.sha256 == meta["basis"]["sha256"]


def test_scoring_several_people_reads_each_image_once(world, tmp_path, monkeypatch):
    """Personal models of the hidden layer and of the content, scored together: every stored
    image's features are read once, and each column is the person's model on them."""
    from mlsp.store.read import FeatureStore

    users = world["planted"].users[-3], world["planted"].users[-4]
    dirs = [str(tmp_path / u) for u in users]
    mine = personalize(world["run"], world["store"], world["ratings"], users[0], dirs[0], method="content")
    yours = personalize(world["run"], world["store"], world["ratings"], users[1], dirs[1], method="residual")
    read = []
    real = FeatureStore.read

    def counted(self, indices, views=None):
        read.extend(np.asarray(indices).tolist())
        return real(self, indices, views)

    monkeypatch.setattr(FeatureStore, "read", counted)
    frame = api.score(world["run"], store=world["store"], users=dirs)
    assert sorted(read) == list(range(N_IMAGES))
    monkeypatch.setattr(FeatureStore, "read", real)
    rated = read_rated(world["run"], world["store"], world["ratings"])
    images = rated.images
    for model in (mine, yours):
        np.testing.assert_allclose(frame[model.column].to_numpy()[images.rows], model.predict(images),
                                   rtol=1e-4, atol=1e-4)
