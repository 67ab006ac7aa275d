"""Personal taste about content: raters who like the generic quality plus content of their own,
which a head trained for the generic MOS discards and the store's features keep
(heads.personal.features, the ``content`` and ``content_taste`` methods)."""

import os

import numpy as np
import pandas as pd
import pytest

from heads.personal import evaluate
from heads.personal.features import Basis, basis_rows, fit_basis, pooled
from heads.personal.people import read_rated
from heads.personal.protocol import draw, srcc
from mlsp import api
from mlsp.sample import plant_ratings
from synthetic import write_content_store

FACTORS = 16
N_IMAGES = 1000
TRAINING, PLANTED, NOISE = 30, 8, 2
PER_USER = 160
KS, REPEATS = (10, 100), 2


@pytest.fixture(scope="module")
def content_world(tmp_path_factory):
    """A store of 1,000 images whose content varies along 16 factors, the generic MOS along one
    direction of them; a Single-3FC head (last hidden layer of 8 values) trained on it; 40 raters
    rating 160 images each: the generic quality plus their own mix of the 16 main axes of the
    features (as strong as the quality), the last 2 at random. The last 10 are the test raters."""
    root = tmp_path_factory.mktemp("content")
    store = str(root / "s.h5")
    truth = write_content_store(store, N_IMAGES, factors=FACTORS, seed=0)
    run = api.train(store, head="single3fc", head_options={"width": 64}, out=str(root / "run"), epochs=8,
                    seed=0).run_dir
    users = TRAINING + PLANTED + NOISE
    planted = plant_ratings(truth["mean_features"], truth["mos"], truth["ids"], users=users, per_user=PER_USER,
                            tastes=FACTORS, noise_users=NOISE, seed=1)
    ratings = root / "ratings.csv"
    ratings.write_text("user,image,score\n" + "".join(f"{u},{i},{s}\n" for u, i, s in planted.rows))
    test = planted.users[-(PLANTED + NOISE):]
    users_file = root / "test_users.txt"
    users_file.write_text("".join(f"{u}\n" for u in test))
    return {"root": root, "store": store, "run": run, "ratings": str(ratings), "users": str(users_file),
            "test": test, "noise": planted.noise, "mean_features": truth["mean_features"]}


def loo_ridge(x, r, alphas=np.logspace(-3, 4, 30)):
    """A plain ridge regression of ``r`` on ``x`` (centred), its penalty the one of least
    leave-one-out error (closed form through the SVD); returns the prediction function."""
    xm, rm = x.mean(0), r.mean()
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    rc = r - rm

    def loo_error(alpha):
        d = s ** 2 / (s ** 2 + alpha)
        leverage = (u ** 2 * d).sum(1) + 1.0 / len(r)
        return float((((rc - u @ (d * (u.T @ rc))) / (1.0 - leverage)) ** 2).mean())

    alpha = min(alphas, key=loo_error)
    w = vt.T @ ((s / (s ** 2 + alpha)) * (u.T @ rc))
    return lambda z: (z - xm) @ w + rm


def ridge_baseline(world) -> pd.DataFrame:
    """Each draw's SRCC gain of a ridge regression of the person's standardised residual (their
    standardised ratings less the standardised generic prediction) on the store's view-mean
    features (standardised over the store), computed here, outside mlsp's methods, on the draws
    of the protocol."""
    rated = read_rated(world["run"], world["store"], world["ratings"])
    features = world["mean_features"]
    x_all = (features - features.mean(0)) / features.std(0)
    rows = []
    for k in KS:
        for repeat in range(REPEATS):
            for user in world["test"]:
                images, scores = rated.person(user)
                adapt_at, test_at = draw(len(scores), k, 0, repeat, user)
                x, g, y = x_all[images.rows], images.generic, scores.astype(np.float64)
                g_mean, g_std = g[adapt_at].mean(), g[adapt_at].std()
                y_std = (y[adapt_at] - y[adapt_at].mean()) / (y[adapt_at].std() + 1e-12)
                residual = loo_ridge(x[adapt_at], y_std - (g[adapt_at] - g_mean) / g_std)
                personal = (g[test_at] - g_mean) / g_std + residual(x[test_at])
                rows.append({"user": user, "k": k, "repeat": repeat,
                             "gain": srcc(personal, y[test_at]) - srcc(g[test_at], y[test_at])})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_content_taste_gains_as_a_ridge_on_the_features_and_harms_no_one(content_world):
    world = content_world
    out = str(world["root"] / "eval")
    summary = evaluate(world["run"], world["store"], world["ratings"], out, users_file=world["users"], ks=KS,
                       repeats=REPEATS, seed=0)
    frame = pd.read_csv(os.path.join(out, "evaluation.csv"), dtype={"user": str})
    frame["gain"] = frame["srcc_personal"] - frame["srcc_generic"]
    planted = frame[~frame["user"].isin(world["noise"])]
    baseline = ridge_baseline(world)
    baseline = baseline[~baseline["user"].isin(world["noise"])]
    ours = planted.groupby("k")["gain"].mean()
    theirs = baseline.groupby("k")["gain"].mean()
    assert theirs[100] > 0.1, theirs  # the taste is there to be found
    assert ours[100] >= theirs[100], (ours, theirs)
    assert ours[10] >= 0.0 and summary["10"]["mean"] >= 0.0, (ours, summary["10"])
    noise = frame[frame["user"].isin(world["noise"])]
    assert len(noise) == len(KS) * REPEATS * NOISE
    assert abs(noise["gain"].mean()) < 0.05 and noise["gain"].min() > -0.1, noise
    for k in KS:
        at = frame[frame["k"] == k]
        assert summary[str(k)]["methods_chosen"] == at["method"].value_counts().to_dict()
    chosen = planted[planted["k"] == 100]["method"]
    assert chosen.isin(["content", "content_taste"]).mean() > 0.5, chosen.value_counts()


def test_auto_chooses_in_the_heads_space_first_then_in_the_features_against_that_choice(content_world,
                                                                                      monkeypatch, tmp_path):
    """`auto` judges each space's candidates on their own (heads.personal.adapt.choose): the nested
    check sees the choice so far and one space's candidates, the head's space before the store's
    features; a rater whose taste lies in content gets a feature-space model."""
    from heads.personal import adapt as adapt_module
    from heads.personal.methods import SPACES
    from heads.personal.people import personalize

    seen = []
    real = adapt_module.nested_errors

    def spy(found, *args):
        seen.append([spec.space for spec, _, _ in found[1:]])
        return real(found, *args)

    monkeypatch.setattr(adapt_module, "nested_errors", spy)
    world = content_world
    user = next(u for u in world["test"] if u not in world["noise"])
    model = personalize(world["run"], world["store"], world["ratings"], user, str(tmp_path / "me"))
    spaces = [set(call) for call in seen]
    assert all(len(s) == 1 for s in spaces), seen  # one space's candidates per check
    order = [s.pop() for s in spaces]
    assert order == sorted(order, key=SPACES.index) and order[-1] == "features", order
    assert model.method in ("content", "content_taste"), model.method


def test_pooled_features_average_views_and_a_wide_views_cells():
    rng = np.random.default_rng(0)
    narrow = rng.normal(size=(3, 4, 6)).astype(np.float16)
    wide = rng.normal(size=(3, 4, 5, 5, 6)).astype(np.float16)
    np.testing.assert_allclose(pooled(narrow), narrow.astype(np.float32).mean(1), rtol=1e-6)
    np.testing.assert_allclose(pooled(wide), wide.astype(np.float32).mean(axis=(1, 2, 3)), rtol=1e-5)
    assert pooled(wide).shape == (3, 6)


def test_the_basis_is_the_stores_principal_components_and_its_hash_is_its_arrays():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(400, 3)) * [5.0, 3.0, 2.0]
    features = latent @ rng.normal(size=(3, 12)) + 0.01 * rng.normal(size=(400, 12)) + 4.0
    basis = fit_basis(features, dims=8)
    assert basis.dims == 8 and basis.components.shape == (12, 8)
    content = basis.project(features)
    np.testing.assert_allclose(content.mean(0), 0.0, atol=1e-3)
    variance = content.var(0)
    assert (np.diff(variance) <= 1e-6).all() and variance[:3].sum() > 0.99 * variance.sum()
    again = fit_basis(features.copy(), dims=8)
    assert again.sha256 == basis.sha256 and again.file_name == basis.file_name
    moved = Basis(basis.mean, basis.scale, basis.components.copy())
    moved.components[0, 0] += 1e-3
    assert moved.sha256 != basis.sha256
    assert list(basis_rows(10, 20)) == list(range(10))
    spread = basis_rows(10_000, 2000)
    assert len(spread) == 2000 and spread[0] == 0 and spread[-1] == 9999


def test_a_wide_stores_basis_pools_views_and_cells(tmp_path):
    """A wide store's images pooled over their views and the 5 x 5 cells of each, read in slabs
    from the store, and its basis the principal components of those."""
    from heads.personal.features import read_pooled, store_basis
    from mlsp.store.read import FeatureStore
    from synthetic import write_synthetic_store

    path = str(tmp_path / "wide.h5")
    truth = write_synthetic_store(path, 40, n_views=2, block_channels=(8, 8), pooling="wide", seed=2)
    with FeatureStore(path) as store:
        rows = np.array([5, 0, 39, 5])
        np.testing.assert_allclose(read_pooled(store, rows), truth["mean_features"][rows], rtol=1e-5, atol=1e-5)
        basis = store_basis(store, dims=8)
    assert basis.components.shape == (16, 8)
    features = truth["mean_features"]
    direct = fit_basis(features, dims=8)
    np.testing.assert_allclose(basis.project(features), direct.project(features), rtol=1e-3, atol=1e-3)
