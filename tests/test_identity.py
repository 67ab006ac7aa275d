"""What makes an image itself in a store: unique ids by construction, the file's content, names
that are not UTF-8, and a folder without one usable image."""

import os

import h5py
import pytest

from helpers import write_image
from mlsp.images import decode as images
from mlsp.errors import ConfigError
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.store.read import FeatureStore

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


def test_a_different_photo_under_a_stored_name_is_refused_never_skipped(tmp_path, extractors):
    import shutil

    from mlsp.errors import IdentityConflict

    out = tmp_path / "s.h5"
    write_image(tmp_path / "dir1" / "IMG_0001.jpg", 96, 100, seed=1)
    write_image(tmp_path / "dir1" / "IMG_0002.jpg", 96, 100, seed=2)
    run(tmp_path / "dir1", out, extractors)
    with h5py.File(out) as f:
        assert f["file_sizes"][0] == os.path.getsize(tmp_path / "dir1" / "IMG_0001.jpg")
        assert len(f["sha256"][0]) == 64
    # another batch from the camera: the same names, other photos (one of the same size even)
    write_image(tmp_path / "dir2" / "IMG_0001.jpg", 96, 100, seed=3)
    shutil.copyfile(tmp_path / "dir1" / "IMG_0002.jpg", tmp_path / "dir2" / "IMG_0002.jpg")
    before = open(out, "rb").read()
    with pytest.raises(IdentityConflict, match=r"dir2/IMG_0001\.jpg: a different file than the IMG_0001\.jpg "
                                               r"stored in .*s\.h5 \(\d+ bytes, sha256 [0-9a-f]{12}; this one"):
        run(tmp_path / "dir2", out, extractors)
    assert open(out, "rb").read() == before
    # the very same bytes under a new modification time (a copy without -p) are the same image
    os.remove(tmp_path / "dir2" / "IMG_0001.jpg")
    assert run(tmp_path / "dir2", out, extractors).new == 0
    # a photo edited in place keeps its name and size but not its bytes
    data = bytearray((tmp_path / "dir1" / "IMG_0002.jpg").read_bytes())
    data[-3] ^= 0x55
    (tmp_path / "dir1" / "IMG_0002.jpg").write_bytes(bytes(data))
    with pytest.raises(IdentityConflict, match="IMG_0002"):
        run(tmp_path / "dir1", out, extractors)


def test_rows_stored_without_identities_are_taken_on_their_path(tmp_path, extractors):
    out = tmp_path / "s.h5"
    write_image(tmp_path / "d" / "a.jpg", 96, 100, seed=1)
    run(tmp_path / "d", out, extractors)
    with h5py.File(out, "r+") as f:  # a store of format version 2
        for key in ("file_sizes", "file_mtimes", "sha256"):
            del f[key]
        f.attrs["format_version"] = 2
    write_image(tmp_path / "d" / "a.jpg", 96, 100, seed=5)  # no way to tell: as before, done
    write_image(tmp_path / "d" / "b.jpg", 96, 100, seed=6)
    result = run(tmp_path / "d", out, extractors)
    assert result.new == 1 and result.images == 2
    with h5py.File(out) as f:
        assert f.attrs["format_version"] == 3
        assert f["file_sizes"][:].tolist()[0] == -1 and f["sha256"][0] == b""
        assert f["file_sizes"][1] == os.path.getsize(tmp_path / "d" / "b.jpg")


def test_a_store_extended_from_another_folder_keeps_its_dataset_name(tmp_path, extractors):
    out = tmp_path / "s.h5"
    write_image(tmp_path / "batch1" / "a.jpg", 96, 100, seed=1)
    write_image(tmp_path / "batch2" / "b.jpg", 96, 100, seed=2)
    run(tmp_path / "batch1", out, extractors)
    run(tmp_path / "batch2", out, extractors)
    with FeatureStore(str(out)) as s:
        assert s.attrs["dataset"] == "batch1" and s.n_images == 2
    run(tmp_path / "batch2", out, extractors, dataset="trip")
    with FeatureStore(str(out)) as s:
        assert s.attrs["dataset"] == "trip"


def test_each_photo_is_read_once_for_its_pixels_and_its_identity(tmp_path, extractors, monkeypatch):
    """A folder on a network share costs its bytes once: extraction hashes the bytes it decodes
    (in the decode threads), and the identity stored is the file's own (size, time, SHA-256)."""
    import builtins

    from mlsp.images import identity

    src = tmp_path / "imgs"
    for k in range(3):
        write_image(src / f"p{k}.jpg", 96, 100 + 8 * k, seed=k)
    opened: list = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    def py_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    out = tmp_path / "s.h5"
    assert run(src, out, extractors, workers=2).new == 3
    monkeypatch.undo()
    reads = {name: sum(os.path.basename(p) == name for p in opened) for name in ("p0.jpg", "p1.jpg", "p2.jpg")}
    assert reads == {"p0.jpg": 1, "p1.jpg": 1, "p2.jpg": 1}
    with FeatureStore(str(out)) as s:
        stored = s.identities()
    assert stored == {f"p{k}.jpg": identity.of_file(str(src / f"p{k}.jpg")) for k in range(3)}
