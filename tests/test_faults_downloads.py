"""Downloads and the model cache under hostile use (docs/faults.md, "Downloads and the model cache").

A local HTTP server on 127.0.0.1 (tests/http_files.py) that lies about sizes, sends malformed
headers, redirects in a loop, trickles and stalls; links planted in the cache where mlsp writes.
Every case ends in one line, writes nothing outside the cache, and keeps exactly what it says it
keeps. Deadlines and timeouts are the tests' own (fractions of a second)."""

import hashlib
import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from heads.score import catalogue as pt
from mlsp.runtime import download as dl
from mlsp.runtime.atomic import temporary_name, write_json
from mlsp.errors import DownloadError, DownloadInterrupted, IntegrityError, LinkRefused, WriteError
from mlsp.runtime.progress import NullProgress

SIZE = 300_000
FAST = {"timeout": 0.5, "retries": 2}  # a stall is noticed after 0.5 s
BREAKS = FAST["retries"] + 1


@pytest.fixture
def payload():
    data = np.random.default_rng(29).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    return data, hashlib.sha256(data).hexdigest()


class Bars(NullProgress):
    """A progress factory that keeps every bar it made."""

    made = []

    def __init__(self, total=None, **options):
        super().__init__(total, **options)
        Bars.made.append(self)


def one_line(exc) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    return message


def catalogue_entry(tmp_path, name, data, urls):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"models": [{
        "name": name, "net": "iv3", "pooling": "narrow", "head": "single3fc", "head_options": {"width": 64},
        "views": "full", "file_name": "head.h5", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "urls": list(urls), "source": "a test mirror on 127.0.0.1", "paper": {}, "backbone_weights": "random:0"}]}))
    spec, = pt.add_catalogue(path)
    return spec, path


# --------------------------------------------------------------------------------------------
# Links planted in the cache
# --------------------------------------------------------------------------------------------


def test_a_link_planted_as_the_partial_file_is_refused_and_its_target_untouched(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data)
    victim = tmp_path / "elsewhere" / "notes.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"the user's own file, outside the cache\n")
    dest = tmp_path / "cache" / "m.h5"
    dest.parent.mkdir()
    os.symlink(victim, dl.partial_path(dest))
    with pytest.raises(LinkRefused) as info:
        dl.download([url], dest, size=SIZE, sha256=sha)
    message = one_line(info.value)
    assert dl.partial_path(dest) in message and "symbolic link" in message and str(victim) in message
    assert victim.read_bytes() == b"the user's own file, outside the cache\n"
    assert not os.path.lexists(dest) and server.requests == []


def test_a_link_replacing_the_partial_file_during_the_download_is_never_moved_into_place(tmp_path, server,
                                                                                        payload):
    """The partial file is written and renamed through its descriptor: a link swapped in under its
    name meanwhile is not renamed to the model's name."""
    data, sha = payload
    url = server.add("/m.h5", data)
    dest = str(tmp_path / "m.h5")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"mine")

    class Swap(NullProgress):
        def update(self, n=1):
            super().update(n)
            if self.n == SIZE:
                part = dl.partial_path(dest)
                os.rename(part, part + ".moved")
                os.symlink(victim, part)

    with pytest.raises(WriteError, match="replaced by another file while downloading"):
        dl.download([url], dest, size=SIZE, sha256=sha, progress=Swap)
    assert not os.path.lexists(dest) and victim.read_bytes() == b"mine"


def test_a_cached_model_that_is_a_link_is_refused_in_one_line(tmp_path, model_home, server, payload):
    data, sha = payload
    spec, catalogue = catalogue_entry(tmp_path, "team-link", data, [server.add("/head.h5", data)])
    outside = tmp_path / "outside.h5"
    outside.write_bytes(data)  # even the right bytes: mlsp does not keep its files through links
    dest = pt.local_path(spec)
    os.makedirs(os.path.dirname(dest))
    os.symlink(outside, dest)
    with pytest.raises(LinkRefused):
        pt.fetch(spec)
    res = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "--fetch", "team-link"])
    assert res.exit_code == 1
    assert res.output.strip() == (f"Error: {dest}: a symbolic link (to {str(outside)!r}), where mlsp keeps a file of "
                                  "its own; refused (mlsp never writes or reads its cache through links): delete it "
                                  "and run again")
    assert os.path.islink(dest) and server.requests == []
    os.remove(dest)
    os.rmdir(os.path.dirname(dest))
    os.symlink(tmp_path, os.path.dirname(dest))  # the model's folder a link: the same
    with pytest.raises(LinkRefused, match="team-link: a symbolic link"):
        pt.fetch(spec)
    assert not os.path.exists(tmp_path / "head.h5")


def test_a_link_planted_under_a_temporary_name_is_removed_not_written_through(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    target = tmp_path / "cache" / "index.json"
    target.parent.mkdir()
    os.symlink(victim, temporary_name(str(target)))  # the name is predictable: this process's id
    write_json(str(target), {"a": 1})
    assert victim.read_text() == "{}" and json.loads(target.read_text()) == {"a": 1}
    assert not os.path.lexists(temporary_name(str(target))) and not os.path.islink(target)


# --------------------------------------------------------------------------------------------
# Servers that lie about sizes, trickle and stall
# --------------------------------------------------------------------------------------------


def test_a_stream_without_content_length_is_capped_at_the_catalogues_size(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/endless.h5", data * 4, length=None)
    Bars.made = []
    dest = str(tmp_path / "m.h5")
    with pytest.raises(DownloadError) as info:
        dl.download([url], dest, size=SIZE, sha256=sha, progress=Bars, **FAST)
    assert "sends more than the 300,000 bytes expected" in one_line(info.value)
    assert max(bar.n for bar in Bars.made) <= SIZE  # never more than the entry's size was written
    assert not os.path.exists(dest) and not os.path.exists(dl.partial_path(dest))


def test_the_right_file_without_content_length_is_downloaded(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, length=None)
    assert open(dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha, **FAST), "rb").read() == data


def test_bytes_received_before_a_stall_are_kept_and_the_download_resumes_there(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, stall_after=120_000)
    Bars.made = []
    started = time.monotonic()
    dest = dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha, progress=Bars, **FAST)
    assert open(dest, "rb").read() == data and time.monotonic() - started < 5
    assert server.ranges_asked("/m.h5")[:2] == [None, "bytes=120000-"]
    assert Bars.made[0].n == SIZE


def test_a_trickling_server_counts_as_stalled_and_the_bar_shows_its_bytes(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/slow.h5", data, trickle=(500, 0.02))  # 25 KB/s
    Bars.made = []
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha, progress=Bars, min_rate=100_000, **FAST)
    assert time.monotonic() - started < 5
    message = one_line(info.value)
    assert "slower than 100,000 bytes/s" in message and f"broke {BREAKS} times" in message
    kept = os.path.getsize(dl.partial_path(tmp_path / "m.h5"))
    assert f"{kept:,} bytes kept for the next try" in message and 0 < kept < SIZE
    assert Bars.made and Bars.made[0].n > 0  # bytes shown as they arrive
    first, *resumed = server.ranges_asked("/slow.h5")
    assert first is None and len(resumed) == FAST["retries"]
    assert all(r.startswith("bytes=") and r != "bytes=0-" for r in resumed)  # resumed where it stalled


def test_a_source_that_never_finishes_is_given_up_at_its_deadline(tmp_path, server, payload):
    data, sha = payload
    slow = server.add("/slow.h5", data, trickle=(2_000, 0.02))  # 100 KB/s: not a stall, but 3 s for the file
    good = server.add("/mirror.h5", data)
    started = time.monotonic()
    dest = dl.download([slow, good], tmp_path / "m.h5", size=SIZE, sha256=sha, deadline=0.5, **FAST)
    assert time.monotonic() - started < 5 and open(dest, "rb").read() == data
    # the mirror resumed where the slow source stopped (its bytes checked with the rest)
    assert server.ranges_asked("/mirror.h5")[0].startswith("bytes=")


def test_a_deadline_failure_names_the_deadline_and_what_is_kept(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/slow.h5", data, trickle=(2_000, 0.02))
    with pytest.raises(DownloadError) as info:
        dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha, deadline=0.4, **FAST)
    message = one_line(info.value)
    kept = os.path.getsize(dl.partial_path(tmp_path / "m.h5"))
    assert f"did not finish within 0.4 s (too slow); {kept:,} bytes kept for the next try" in message and kept > 0
    assert dl.deadline_for(255_383_120) > 3600  # the real deadline leaves a slow line hours for a large head


def test_nothing_kept_is_said_when_nothing_was_kept(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, cut_after=0, cuts=9)
    dest = str(tmp_path / "m.h5")
    with pytest.raises(DownloadError) as info:
        dl.download([url], dest, size=SIZE, sha256=sha, **FAST)
    message = one_line(info.value)
    assert f"broke {BREAKS} times, nothing kept" in message and "bytes kept" not in message
    assert not os.path.exists(dl.partial_path(dest))


def test_ctrl_c_says_what_is_kept_truly(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data)
    dest = str(tmp_path / "m.h5")

    class CtrlCAtOnce(NullProgress):
        def __init__(self, total=None, **options):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        dl.download([url], dest, size=SIZE, sha256=sha, progress=CtrlCAtOnce)
    assert isinstance(info.value, DownloadInterrupted)
    assert info.value.kept == "nothing was downloaded yet" and not os.path.exists(dl.partial_path(dest))

    class CtrlCLater(NullProgress):
        def update(self, n=1):
            super().update(n)
            if self.n >= 100_000:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        dl.download([url], dest, size=SIZE, sha256=sha, progress=CtrlCLater)
    assert isinstance(info.value, DownloadInterrupted)
    kept = os.path.getsize(dl.partial_path(dest))
    assert info.value.kept.startswith(f"{kept:,} of 300,000 bytes downloaded so far are kept in ") and kept >= 100_000


def test_mlsp_models_fetch_interrupted_before_a_byte_says_nothing_is_kept(tmp_path, model_home, server, payload,
                                                                         monkeypatch):
    data, sha = payload
    spec, catalogue = catalogue_entry(tmp_path, "team-ctrl-c", data, [server.add("/head.h5", data)])

    def ctrl_c(**options):
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "resolve_progress", lambda progress: ctrl_c)
    res = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "--fetch", "team-ctrl-c"])
    assert res.exit_code == 130
    assert "interrupted: nothing was downloaded yet." in res.output and "are kept" not in res.output


@pytest.mark.slow  # imports TensorFlow when run alone
def test_score_interrupted_while_its_model_downloads_says_what_the_download_kept(tmp_path, model_home, server,
                                                                                payload, monkeypatch):
    data, sha = payload
    spec, catalogue = catalogue_entry(tmp_path, "team-score-ctrl-c", data, [server.add("/head.h5", data)])
    images = tmp_path / "photos"
    images.mkdir()

    def ctrl_c(**options):
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "resolve_progress", lambda progress: ctrl_c)
    res = CliRunner().invoke(cli.main, ["score", "--model", "team-score-ctrl-c", "--images", str(images),
                                        "--out", str(tmp_path / "scores.csv")])
    assert res.exit_code == 130
    assert "interrupted: downloading the model: nothing was downloaded yet." in res.output
    assert "scored images are kept" not in res.output


# --------------------------------------------------------------------------------------------
# Malformed headers, redirect loops: one line, and the next mirror
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", ["abc", "-5", "300000, 300000", "1e5", ""])
def test_a_malformed_content_length_fails_that_source_in_one_line(tmp_path, server, payload, length):
    data, sha = payload
    bad = server.add("/bad.h5", data, length=length)
    with pytest.raises(DownloadError) as info:
        dl.download([bad], tmp_path / "m.h5", size=SIZE, sha256=sha, **FAST)
    assert f"{bad}: sent a malformed Content-Length header ({length!r})" in one_line(info.value)
    good = server.add("/good.h5", data)
    assert dl.download([bad, good], tmp_path / "m.h5", size=SIZE, sha256=sha, **FAST)


@pytest.mark.parametrize("content_range", ["bytes 100000-299999/xyz", "bytes=100000-299999/300000", "items 1-2/3",
                                           "bytes 100000-299999/99999999999999999999999"])
def test_a_malformed_content_range_fails_that_source_in_one_line(tmp_path, server, payload, content_range):
    data, sha = payload
    url = server.add("/m.h5", data, cut_after=100_000, content_range=content_range)
    with pytest.raises(DownloadError) as info:
        dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha, **FAST)
    assert f"malformed Content-Range header ({content_range!r})" in one_line(info.value)


def test_a_redirect_loop_is_one_line(tmp_path, server, payload):
    data, sha = payload
    loop = server.redirect("/loop.h5", "/loop.h5")
    server.redirect("/a.h5", "/b.h5")
    ping_pong = server.redirect("/b.h5", "/a.h5")
    with pytest.raises(DownloadError) as info:
        dl.download([loop, ping_pong], tmp_path / "m.h5", size=SIZE, sha256=sha)
    message = one_line(info.value)
    assert f"{loop}: HTTP 302: redirects in a loop" in message and f"{ping_pong}: HTTP 302: redirects in a loop" in message


def test_a_servers_reason_phrase_is_kept_to_one_line(tmp_path, payload):
    """What a server sends is text it chose: its line breaks never reach the message."""
    assert dl._one_line("Not\r\nFound\x85\u2028now\x1b[31m") == "Not Found now [31m"


# --------------------------------------------------------------------------------------------
# The cache as `mlsp models` shows it
# --------------------------------------------------------------------------------------------


def test_mlsp_models_shows_a_file_of_the_right_size_and_another_sha256_as_bad(tmp_path, model_home, payload):
    data, sha = payload
    spec, catalogue = catalogue_entry(tmp_path, "team-bad-sha", data, [])
    dest = pt.local_path(spec)
    os.makedirs(os.path.dirname(dest))
    other = bytearray(data)
    other[-1] ^= 0xFF
    with open(dest, "wb") as handle:
        handle.write(other)
    res = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "team-bad-sha"])
    assert res.exit_code == 0
    row = [line for line in res.output.splitlines() if line.startswith("team-bad-sha ")][0]
    assert "  bad  " in row and " yes " not in row
    note, = [line for line in res.output.splitlines() if line.startswith("team-bad-sha: ")]
    assert f"sha256 {hashlib.sha256(other).hexdigest()}" in note and f"expected sha256 {sha}" in note
    rows = json.loads(CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "team-bad-sha",
                                                    "--json"]).output)
    assert rows[0]["cached"] is False and "sha256" in rows[0]["cache_problem"]
    with open(dest, "wb") as handle:
        handle.write(data)
    rows = json.loads(CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "team-bad-sha",
                                                    "--json"]).output)
    assert rows[0]["cached"] is True and rows[0]["cache_problem"] is None


def test_a_read_only_cache_holding_a_bad_file_says_what_is_wrong(tmp_path, model_home, payload, monkeypatch):
    data, sha = payload
    spec, catalogue = catalogue_entry(tmp_path, "team-read-only", data, [])
    dest = pt.local_path(spec)
    os.makedirs(os.path.dirname(dest))
    with open(dest, "wb") as handle:
        handle.write(data[:-1] + b"\0")
    replace = os.replace

    def read_only(src, dst, **kwargs):
        if str(dst).endswith(".rejected"):
            raise OSError(30, "Read-only file system", str(src))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(IntegrityError):
        pt.fetch(spec)
    res = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "--fetch", "team-read-only"])
    assert res.exit_code == 1
    message = res.output.strip()
    assert message.startswith(f"Error: {dest}: sha256 ") and f"expected sha256 {sha}" in message
    assert "cannot be moved aside (read-only file system)" in message and "--model" in message
    assert "\n" not in message


def test_a_bad_file_on_a_really_read_only_cache(small_disk, tmp_path, monkeypatch, payload):
    """The same on read-only media (a real tmpfs remounted read-only, where it can be mounted)."""
    from helpers import remount

    data, sha = payload
    disk = small_disk("2m")
    monkeypatch.setenv("KERAS_HOME", str(disk / "keras"))
    monkeypatch.delenv(pt.CATALOGUE_ENV, raising=False)
    spec, catalogue = catalogue_entry(tmp_path, "team-ro-media", data, [])
    dest = pt.local_path(spec)
    os.makedirs(os.path.dirname(dest))
    with open(dest, "wb") as handle:
        handle.write(bytes(reversed(data)))
    remount(disk, "ro")
    try:
        res = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "--fetch", "team-ro-media"])
        listing = CliRunner().invoke(cli.main, ["models", "--catalogue", str(catalogue), "team-ro-media"])
    finally:
        remount(disk, "rw")
    assert res.exit_code == 1
    assert res.output.strip().startswith(f"Error: {dest}: sha256 ") and "\n" not in res.output.strip()
    assert "cannot be moved aside (read-only file system)" in res.output
    assert listing.exit_code == 0 and "  bad  " in listing.output and "team-ro-media: bad file in the cache" in listing.output


@pytest.mark.parametrize("change, said", [
    ({"photo": "a\0.jpg"}, "check.photo 'a\\x00.jpg' must be a plain file name"),
    ({"photo": "../a.jpg"}, "must be a plain file name"),
    ({"photo_size": 10 ** 30}, "check.photo_size must be the photo's size in bytes (1 to 68,719,476,736)"),
    ({"photo_urls": ["https://x/a b.jpg"]}, "check.photo_urls must be a list of http(s) URLs"),
    ({"photo_urls": None}, "check.photo_urls must be a list of http(s) URLs, received None"),
])
def test_a_check_table_of_the_wrong_type_is_one_line_naming_the_field(change, said):
    """An entry's published-prediction photo is fetched into the cache as its model is: its fields
    are held to the same rules."""
    problem = pt.check_problem(pt.AUTHORS_WIDE_CHECK | change)
    assert problem is not None and said in problem and "\n" not in problem
    assert pt.check_problem(pt.AUTHORS_WIDE_CHECK) is None
