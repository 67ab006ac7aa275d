"""mlsp report: one offline HTML page of a scores file, a run or a personalisation evaluation.

The sources are planted here in the formats stage 2 writes (no backbone runs); the browser tests
open the page from disk in headless Chromium (tests/browser.py; skipped, saying why, where it is
not installed) and check what a person would see: photos in score order, the sort toggle, the
filter, no console errors, a screenshot that is not blank."""

import json
import os
import re
import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from browser import chrome
from helpers import write_image
from heads.report.make import SOURCES

N_PHOTOS = 30


def page_data(path) -> dict:
    text = open(path, encoding="utf-8").read()
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block.replace("<\\/", "</"))


def plant_scores(root, n=N_PHOTOS, distribution=True, seed=0):
    """A scores CSV as `mlsp score --images --out` writes it, with real photos of 100-200 px."""
    rng = np.random.default_rng(seed)
    paths = [str(write_image(root / "photos" / f"photo_{k:03d}.jpg", int(rng.integers(100, 200)),
                             int(rng.integers(100, 200)), seed=k)) for k in range(n)]
    frame = pd.DataFrame({"id": [f"photo_{k:03d}" for k in range(n)], "pred": rng.uniform(2, 9, n),
                          "pred_std": rng.uniform(0, 0.3, n)})
    if distribution:
        hist = rng.dirichlet(np.ones(10), n)
        frame["pred_opinion_std"] = rng.uniform(1, 2, n)
        for k in range(10):
            frame[f"p{k + 1}"] = hist[:, k]
    frame["path"] = paths
    out = root / "scores.csv"
    frame.to_csv(out, index=False)
    return out, frame


def plant_run(root, images=True, predictions=True):
    """A run folder as `mlsp train` leaves it (config, history, metrics, predictions)."""
    run = root / "run"
    run.mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = [f"im{k}" for k in range(40)]
    if images:
        for k, i in enumerate(ids):
            write_image(root / "imgs" / f"{i}.png", 100 + k, 120, seed=k)
    mos = rng.uniform(2, 9, 40)
    pred = mos + rng.normal(0, 1, 40)
    split = ["val"] * 10 + ["test"] * 30
    config = {"head": "single1fc", "status": "finished", "store": {"net": "iv3", "pooling": "narrow", "path": "x.h5"},
              "lr_changes": [{"epoch": 3, "from": 1e-3, "to": 1e-4}]}
    (run / "config.json").write_text(json.dumps(config))
    (run / "history.csv").write_text("epoch,loss,val_loss,lr,val_srcc\n" + "".join(
        f"{e},{2 / e},{2.5 / e},{1e-3 if e < 4 else 1e-4},0.5\n" for e in range(1, 7)))
    if predictions:
        from heads.evaluation import compute_metrics

        frame = pd.DataFrame({"id": ids, "split": split, "mos": mos, "pred": pred})
        frame.to_csv(run / "predictions.csv", index=False)
        metrics = {s: compute_metrics(mos[frame.split == s], pred[frame.split == s]) for s in ("val", "test")}
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run, mos, pred, split


def plant_personalisation(root):
    folder = root / "personal"
    folder.mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(2)
    for user in ("ann", "bob", "cy"):
        for k in (10, 50):
            for repeat in range(3):
                generic = rng.uniform(0.4, 0.6)
                rows.append([user, k, repeat, k, 100, generic, generic + (0.1 if user == "ann" else -0.02)])
    frame = pd.DataFrame(rows, columns=["user", "k", "repeat", "n_adapt", "n_test", "srcc_generic", "srcc_personal"])
    frame.to_csv(folder / "evaluation.csv", index=False)
    gain = frame.srcc_personal - frame.srcc_generic
    summary = {str(k): {"mean": float(g.mean()), "std": float(g.std()), "min": float(g.min()), "max": float(g.max())}
               for k, g in gain.groupby(frame.k)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


PLANT = {"scores": lambda root: plant_scores(root)[0], "run": lambda root: plant_run(root)[0],
         "personalisation": plant_personalisation}


@pytest.mark.parametrize("name", SOURCES.names())
def test_every_source_kind_is_detected_and_reported(tmp_path, name):
    """One planted source per registered kind: detected as that kind, and its page written."""
    from heads.report.make import detect, report

    assert name in PLANT, "a new report source needs a planted example here"
    source = str(PLANT[name](tmp_path / name))
    assert detect(source).name == name
    out = report(source, str(tmp_path / f"{name}.html"))
    text = open(out, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    # offline: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', text) and "@import" not in text


def test_scores_page_holds_every_photo_best_first(tmp_path):
    from heads.report.make import report

    source, frame = plant_scores(tmp_path)
    data = page_data(report(str(source), str(tmp_path / "out" / "r.html")))
    assert [r["n"] for r in data["rows"]] == list(frame["id"])
    assert len(data["thumbs"]) == N_PHOTOS and all(t.startswith("data:image/jpeg;base64,") for t in data["thumbs"])
    best = data["lists"]["best"]
    assert [data["rows"][i]["n"] for i in best] == list(frame.sort_values("pred", ascending=False)["id"][:24])
    row = data["rows"][0]
    assert row["h"] == pytest.approx(frame.loc[0, [f"p{k}" for k in range(1, 11)]].to_numpy(float), abs=1e-4)
    assert row["o"] == pytest.approx(frame.loc[0, "pred_opinion_std"], abs=1e-4)
    # the full photo is linked relative to the page, so the page and the photos move together
    assert row["f"] == "../photos/photo_000.jpg"


def test_run_page_shows_metrics_charts_and_largest_misses(tmp_path):
    from heads.report.make import report

    run, mos, pred, split = plant_run(tmp_path)
    out = report(str(run), images=str(tmp_path / "imgs"))
    assert out == str(run / "report.html")
    text = open(out, encoding="utf-8").read()
    data = page_data(out)
    for heading in ("Metrics", "Largest over-predictions (test split)", "Largest under-predictions (test split)",
                    "Configuration"):
        assert heading in text
    assert text.count("data:image/png;base64,") == 3  # predicted vs true, loss, learning rate
    test_rows = np.flatnonzero(np.array(split) == "test")
    error = (pred - mos)[test_rows]
    assert data["lists"]["over"] == list(test_rows[np.argsort(-error)][: min(24, int((error > 0).sum()))])
    assert data["lists"]["under"][0] == int(test_rows[np.argmin(error)])
    assert len(data["thumbs"]) == 40 and all(r["t"] >= 0 for r in data["rows"])


def test_distribution_run_tiles_carry_the_predicted_histogram(tmp_path):
    """A run of --target distribution: predictions.csv has the true opinion_std beside the
    predicted one; the tiles show the predicted spread and histogram."""
    from heads.report.make import report

    run, *_ = plant_run(tmp_path, images=False)
    frame = pd.read_csv(run / "predictions.csv")
    hist = np.random.default_rng(4).dirichlet(np.ones(10), len(frame))
    frame["opinion_std"] = 9.0  # the truth, from the votes: not what the tile shows
    frame["pred_opinion_std"] = np.linspace(1, 2, len(frame))
    for k in range(10):
        frame[f"p{k + 1}"] = hist[:, k]
    frame.to_csv(run / "predictions.csv", index=False)
    rows = page_data(report(str(run), str(tmp_path / "d.html")))["rows"]
    assert [r["o"] for r in rows] == pytest.approx(list(frame["pred_opinion_std"]), abs=1e-4)
    assert rows[3]["h"] == pytest.approx(hist[3], abs=1e-4)


def test_personalisation_page_has_the_gain_per_person(tmp_path):
    from heads.report.make import report

    text = open(report(str(plant_personalisation(tmp_path)), str(tmp_path / "p.html")), encoding="utf-8").read()
    assert "Gain per person" in text and "data:image/png;base64," in text
    for user in ("ann", "bob", "cy"):
        assert f"<td>{user}</td>" in text
    assert "<td>0.1000</td>" in text  # ann's gain, exactly what was planted


def test_saliency_overlays_are_shown_beside_their_photos(tmp_path):
    """Overlays named <id>.png (as mlsp explain writes them) join their photo's tile; a run finds
    its own RUN/saliency folder without being told."""
    from heads.report.make import report

    source, frame = plant_scores(tmp_path, n=6, distribution=False)
    for k in (1, 4):
        write_image(tmp_path / "maps" / f"photo_{k:03d}.png", 100, 120, seed=50 + k)
    data = page_data(report(str(source), str(tmp_path / "r.html"), saliency=str(tmp_path / "maps")))
    with_map = {r["n"] for r in data["rows"] if r["a"] >= 0}
    assert with_map == {"photo_001", "photo_004"}
    assert data["rows"][1]["g"] == "maps/photo_001.png" and data["rows"][1]["t"] != data["rows"][1]["a"]
    run, *_ = plant_run(tmp_path / "r", images=True)
    write_image(run / "saliency" / "im3.png", 100, 120, seed=9)
    rows = page_data(report(str(run), images=str(tmp_path / "r" / "imgs")))["rows"]
    assert [r["n"] for r in rows if r["a"] >= 0] == ["im3"]


def test_unusable_photos_become_placeholder_tiles(tmp_path, caplog):
    from heads.report.make import report

    source, frame = plant_scores(tmp_path, n=6, distribution=False)
    bad = tmp_path / "photos" / "photo_001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    os.remove(tmp_path / "photos" / "photo_002.jpg")
    data = page_data(report(str(source), str(tmp_path / "r.html")))
    rows = {r["n"]: r for r in data["rows"]}
    assert rows["photo_001"]["t"] == -1 and rows["photo_001"]["x"].startswith("unreadable:")
    assert rows["photo_002"]["t"] == -1 and rows["photo_002"]["x"].startswith("photo not found:")
    assert sum(r["t"] >= 0 for r in data["rows"]) == 4
    assert "2 of the 6 photos shown could not be found or read" in caplog.text


def test_moved_photos_are_found_again_with_images(tmp_path):
    from heads.report.make import report

    source, frame = plant_scores(tmp_path, n=5, distribution=False)
    os.rename(tmp_path / "photos", tmp_path / "moved")
    lost = page_data(report(str(source), str(tmp_path / "a.html")))
    assert all(r["t"] == -1 and "not found" in r["x"] for r in lost["rows"])
    found = page_data(report(str(source), str(tmp_path / "b.html"), images=str(tmp_path / "moved")))
    assert all(r["t"] >= 0 for r in found["rows"])


def test_cli_errors_are_one_line(tmp_path):
    import cli

    runner = CliRunner()
    run, *_ = plant_run(tmp_path, images=False, predictions=False)
    result = runner.invoke(cli.main, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "No predictions.csv" in (tmp_path / "r.html").read_text()
    for bad, says in (({"x.txt": "hello"}, "not a source mlsp can report on"),
                      ({"s.csv": "a,b\n1,2\n"}, "no column id, pred")):
        (name, content), = bad.items()
        (tmp_path / name).write_text(content)
        result = runner.invoke(cli.main, ["report", str(tmp_path / name), "--out", str(tmp_path / "x.html")])
        assert result.exit_code == 1 and says in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_help_names_every_option():
    import cli

    text = CliRunner().invoke(cli.main, ["report", "--help"]).output
    for option in ("--out", "--images", "--saliency", "--max-photos"):
        assert option in text


def big_scores(root, rows, photos=40):
    """A scores file of ``rows`` rows whose paths cycle over ``photos`` real small photos."""
    paths = [str(write_image(root / "p" / f"{k}.jpg", 120, 160, seed=k)) for k in range(photos)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"id": [f"img{k:06d}" for k in range(rows)], "pred": rng.uniform(1, 10, rows),
                          "pred_std": 0.1, "path": [paths[k % photos] for k in range(rows)]})
    out = root / f"scores{rows}.csv"
    frame.to_csv(out, index=False)
    return out


def test_build_time_follows_the_photos_shown_not_the_rows(tmp_path):
    from heads.report.make import report

    times, data = {}, {}
    for rows in (5_000, 50_000):
        source = big_scores(tmp_path, rows)
        start = time.perf_counter()
        out = report(str(source), str(tmp_path / f"r{rows}.html"), max_photos=200)
        times[rows] = time.perf_counter() - start
        data[rows] = page_data(out)
        assert len(data[rows]["rows"]) == rows and len(data[rows]["thumbs"]) == 200
    # the best 100 and the worst 100 got pictures
    scores = np.array([r["s"] for r in data[50_000]["rows"]])
    pictured = np.array([r["t"] >= 0 for r in data[50_000]["rows"]])
    assert (scores[pictured] >= np.sort(scores)[-100]).sum() == 100
    # 10x the rows, the same photos: far less than 10x the time
    assert times[50_000] < 4 * times[5_000] + 2.0, times


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()


def open_page(driver, path):
    driver.get("file://" + os.path.abspath(path))
    for _ in range(100):
        if driver.execute_script("return document.body.dataset.ready") == "1":
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: the page's script did not finish")


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def gallery_scores(driver):
    return [float(t.get_attribute("data-score")) for t in driver.find_elements("css selector", "#gallery .tile")]


def test_browser_shows_the_photos_in_order_sorts_and_filters(tmp_path, browser):
    from heads.report.make import report

    source, frame = plant_scores(tmp_path)
    out = report(str(source), str(tmp_path / "r.html"))
    open_page(browser, out)
    assert console_errors(browser) == []
    scores = gallery_scores(browser)
    assert len(scores) == N_PHOTOS and scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(sorted(frame["pred"], reverse=True), abs=1e-4)
    sources = browser.execute_script("return Array.from(document.querySelectorAll('#gallery img'), i => i.src)")
    assert len(sources) == N_PHOTOS and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    browser.execute_script("document.getElementById('gallery').scrollIntoView()")
    for _ in range(100):  # thumbnails load lazily, as they come into view
        if browser.execute_script("var i = document.querySelector('#gallery img'); return i.complete && i.naturalWidth > 0"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the first thumbnail of the gallery did not load")
    browser.find_element("id", "sort").click()
    assert gallery_scores(browser) == sorted(scores)
    box = browser.find_element("id", "filter")
    box.send_keys("photo_01")
    names = [t.get_attribute("data-name") for t in browser.find_elements("css selector", "#gallery .tile")]
    assert sorted(names) == [f"photo_{k:03d}" for k in range(10, 20)]
    shot = tmp_path / "shot.png"
    browser.save_screenshot(str(shot))
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05, "the screenshot is blank"
    browser.find_elements("css selector", "#gallery .tile")[0].click()
    assert browser.find_element("id", "lightbox").is_displayed()
    assert console_errors(browser) == []


def test_browser_opens_fifty_thousand_rows_in_seconds(tmp_path, browser):
    from heads.report.make import report

    out = report(str(big_scores(tmp_path, 50_000)), str(tmp_path / "big.html"))
    start = time.perf_counter()
    open_page(browser, out)
    seconds = time.perf_counter() - start
    assert seconds < 10, f"the page took {seconds:.1f} s to open"
    assert console_errors(browser) == []
    scores = gallery_scores(browser)
    assert len(scores) == 1000 and scores == sorted(scores, reverse=True)
    assert "page 1 of 50" in browser.find_element("id", "count").text
    browser.find_element("id", "next").click()
    second = gallery_scores(browser)
    assert len(second) == 1000 and second[0] <= scores[-1]
