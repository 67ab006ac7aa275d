"""What makes an image itself in a store: unique ids by construction, the file's content, names
that are not UTF-8, and a folder without one usable image."""

import os

import h5py
import pytest

from conftest import write_image
from mlsp import images
from mlsp.errors import ConfigError
from mlsp.extract import ExtractConfig, extract
from mlsp.store import FeatureStore

CONFIG = ExtractConfig(net="iv3", weights="random:0")


def run(src, out, extractors, **kw):
    return extract(str(src), CONFIG, str(out), extractor=extractors(net="iv3"), **kw)


def rows(out):
    with FeatureStore(str(out)) as s:
        return dict(zip(s.paths.tolist(), s.ids.tolist()))


def test_ids_that_would_collide_keep_their_extensions():
    paths = ["/d/a.jpg", "/d/a.png", "/d/a.jpg.png", "/d/b.jpg"]
    # a.jpg and a.png share "a"; then a.jpg.png's "a.jpg" is a.jpg's path: it keeps its extension too
    assert images.image_ids(paths, "/d") == ["a.jpg", "a.png", "a.jpg.png", "b"]
    # against ids already stored for other files
    assert images.image_ids(["/d/a.jpg"], "/d", taken={"a": "a.png"}) == ["a.jpg"]
    assert images.image_ids(["/d/a.jpg"], "/d", taken={"a": "a.jpg"}) == ["a"]
    with pytest.raises(ConfigError, match=r"a\.jpg.*already that of a\.jpg\.png"):
        images.image_ids(["/d/a.jpg"], "/d", taken={"a": "x.png", "a.jpg": "a.jpg.png"})


def test_colliding_names_lose_no_photo_and_reruns_keep_them(tmp_path, extractors):
    src = tmp_path / "imgs"
    for k, name in enumerate(["a.jpg", "a.png", "a.jpg.png", "b.jpg"]):
        write_image(src / name, 96, 100 + 4 * k, seed=k)
    out = tmp_path / "s.h5"
    result = run(src, out, extractors)
    assert result.images == 4 and result.new == 4
    first = rows(out)
    assert first == {"a.jpg": "a.jpg", "a.jpg.png": "a.jpg.png", "a.png": "a.png", "b.jpg": "b"}
    with FeatureStore(str(out)) as s:  # each row holds its own file's features
        sizes = dict(zip(s.paths.tolist(), (tuple(v) for v in h5py.File(str(out))["sizes"][:])))
    assert sizes["a.jpg.png"] == (96, 108) and sizes["a.jpg"] == (96, 100)
    assert run(src, out, extractors).new == 0
    assert rows(out) == first


def test_a_new_file_never_takes_a_stored_id(tmp_path, extractors):
    src = tmp_path / "imgs"
    write_image(src / "a.jpg.png", 96, 100, seed=0)
    out = tmp_path / "s.h5"
    run(src, out, extractors)
    assert rows(out) == {"a.jpg.png": "a.jpg"}
    write_image(src / "a.png", 96, 108, seed=2)  # "a": free
    write_image(src / "b.png", 96, 104, seed=1)
    write_image(src / "b.jpg", 96, 104, seed=3)  # b.jpg, b.png share "b"
    assert run(src, out, extractors).new == 3
    assert rows(out) == {"a.jpg.png": "a.jpg", "a.png": "a", "b.jpg": "b.jpg", "b.png": "b.png"}
    # a.jpg: "a" is a.png's, and its path "a.jpg" is a.jpg.png's id: refused, naming both, nothing written
    write_image(src / "a.jpg", 96, 112, seed=4)
    before = os.path.getmtime(out)
    with pytest.raises(ConfigError, match=r"imgs/a\.jpg: its id 'a\.jpg' is already that of a\.jpg\.png"):
        run(src, out, extractors)
    assert os.path.getmtime(out) == before and len(rows(out)) == 4


def test_a_folder_without_one_usable_image_writes_no_store_and_lists_every_file(tmp_path):
    from click.testing import CliRunner

    import cli

    src = tmp_path / "broken"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("not an image")
    write_image(src / "tiny.png", 40, 50)
    out = tmp_path / "s.h5"
    for _ in range(2):  # and again: nothing was kept as done
        res = CliRunner().invoke(cli.main, ["extract", "--images", str(src), "--net", "iv3", "--weights", "random:0",
                                            "--out", str(out)])
        assert res.exit_code == 1, res.output
        lines = res.output.splitlines()
        assert lines[-1].startswith(f"Error: {src}: none of the 3 inputs could be used, so no store was written; "
                                    "empty.jpg: empty file")
        assert "(and 2 more)" in lines[-1] and "Traceback" not in res.output
        for name in ("empty.jpg", "text.jpg", "tiny.png"):
            assert any(line.strip().startswith(f"{name}: ") for line in lines[:-1]), res.output
        assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_a_file_name_that_is_not_utf8_is_stored_losslessly(tmp_path, extractors):
    from click.testing import CliRunner

    import cli

    src = tmp_path / "names"
    write_image(src / "good.jpg", 96, 104, seed=2)
    write_image(tmp_path / "x" / "other.jpg", 96, 100, seed=1)
    raw = os.fsencode(str(src)) + b"/\xff\xfebad.jpg"  # what `cp x.jpg $'names/\xff\xfebad.jpg'` makes
    with open(os.fsencode(str(tmp_path / "x" / "other.jpg")), "rb") as a, open(raw, "wb") as b:
        b.write(a.read())
    os.symlink(b"nowhere", os.fsencode(str(src)) + b"/\xfedangling.jpg")
    out = tmp_path / "s.h5"
    result = run(src, out, extractors, flush_images=1)  # a checkpoint after every image
    assert result.images == 2 and result.new == 2
    got = rows(out)
    bad = os.fsdecode(b"\xff\xfebad.jpg")
    assert got[bad] == os.fsdecode(b"\xff\xfebad") and os.fsencode(bad) == b"\xff\xfebad.jpg"
    assert [os.fsencode(e["path"]) for e in result.errors] == [b"\xfedangling.jpg"]
    with h5py.File(out) as f:  # the name's own bytes, not a replacement character
        assert b"\xff\xfebad.jpg" in f["paths"][:].tolist()
    assert run(src, out, extractors).new == 0  # found again under the same name: nothing to redo
    res = CliRunner().invoke(cli.main, ["inspect", "--errors", "--quick", str(out)])
    assert res.exit_code == 0 and "\\xfedangling.jpg\tunreadable" in res.output, res.output
