"""mlsp.runtime.download against a local HTTP server (127.0.0.1): resume, mirrors, refused files, offline."""

import fcntl
import hashlib
import logging
import os

import numpy as np
import pytest

from mlsp.runtime import download as dl
from mlsp.errors import DownloadError, IntegrityError, WeightsUnavailableError
from mlsp.runtime.progress import NullProgress
from helpers import ctrl_c_after
from http_files import closed_port_url

SIZE = 300_000  # bytes of the served file


@pytest.fixture
def payload():
    data = np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    return data, hashlib.sha256(data).hexdigest()


class Counting(NullProgress):
    made = []

    def __init__(self, total=None, **options):
        super().__init__(total, **options)
        self.options = options
        Counting.made.append(self)


def test_a_cut_connection_is_resumed_with_a_range_request(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, cut_after=120_000)
    Counting.made = []
    dest = dl.download([url], tmp_path / "cache" / "m.h5", size=SIZE, sha256=sha, progress=Counting)
    assert open(dest, "rb").read() == data
    assert server.ranges_asked("/m.h5") == [None, "bytes=120000-"]
    assert not os.path.exists(dl.partial_path(dest))
    bar, = Counting.made
    assert bar.total == SIZE and bar.n == SIZE and bar.options["unit"] == "B"


def test_a_download_broken_too_often_keeps_its_part_and_the_next_call_resumes(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, cut_after=100_000, cuts=5)
    dest = str(tmp_path / "m.h5")
    with pytest.raises(DownloadError) as info:
        dl.download([url], dest, size=SIZE, sha256=sha, retries=1)
    assert "broke 2 times, 200,000 bytes kept for the next try" in str(info.value)
    assert not os.path.exists(dest)
    assert os.path.getsize(dl.partial_path(dest)) == 200_000
    server.cuts.clear()
    Counting.made = []
    assert dl.download([url], dest, size=SIZE, sha256=sha, progress=Counting) == dest
    assert open(dest, "rb").read() == data
    assert server.ranges_asked("/m.h5") == [None, "bytes=100000-", "bytes=200000-"]
    assert Counting.made[0].n == SIZE  # the kept bytes count in the progress too


def test_resume_follows_a_redirect_as_github_raw_urls_do(tmp_path, server, payload):
    data, sha = payload
    server.add("/media/m.h5", data, cut_after=50_000)
    url = server.redirect("/raw/m.h5", "/media/m.h5")
    dest = dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha)
    assert open(dest, "rb").read() == data
    assert server.ranges_asked("/media/m.h5") == [None, "bytes=50000-"]


def test_a_server_that_ignores_range_is_read_again_from_the_start(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data, cut_after=80_000, ranges=False)
    dest = dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha)
    assert open(dest, "rb").read() == data
    assert server.ranges_asked("/m.h5") == [None, "bytes=80000-"]


def test_a_wrong_sha256_is_refused_and_not_kept(tmp_path, server, payload, caplog):
    data, sha = payload
    wrong = bytearray(data)
    wrong[SIZE // 2] ^= 0xFF
    url = server.add("/m.h5", wrong)
    dest = str(tmp_path / "m.h5")
    with caplog.at_level(logging.WARNING, logger="mlsp.runtime.download"), pytest.raises(DownloadError) as info:
        dl.download([url], dest, size=SIZE, sha256=sha)
    assert f"expected sha256 {sha}" in str(info.value)
    assert hashlib.sha256(wrong).hexdigest() in str(info.value)
    assert not os.path.exists(dest) and not os.path.exists(dl.partial_path(dest))
    assert any(hashlib.sha256(wrong).hexdigest() in r.getMessage() for r in caplog.records)


def test_a_source_of_another_size_is_refused_before_downloading(tmp_path, server, payload):
    data, sha = payload
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + sha.encode() + b"\nsize 300000\n"
    url = server.add("/pointer.h5", pointer)
    with pytest.raises(DownloadError, match=rf"serves {len(pointer)} bytes, expected 300,000"):
        dl.download([url], tmp_path / "m.h5", size=SIZE, sha256=sha)


def test_mirrors_are_tried_in_order_after_a_refused_connection_a_404_and_a_corrupt_copy(tmp_path, server, payload):
    data, sha = payload
    server.add("/corrupt.h5", bytes(reversed(data)))
    good = server.add("/mirror/m.h5", data)
    urls = [closed_port_url(), server.url("/missing.h5"), server.url("/corrupt.h5"), good]
    dest = dl.download(urls, tmp_path / "m.h5", size=SIZE, sha256=sha)
    assert open(dest, "rb").read() == data
    assert [p for p, _ in server.requests] == ["/missing.h5", "/corrupt.h5", "/mirror/m.h5"]


def test_offline_one_line_names_the_file_its_sha256_the_urls_and_where_to_put_it(tmp_path, payload):
    data, sha = payload
    urls = [closed_port_url("/a/m.h5"), closed_port_url("/b/m.h5")]
    dest = str(tmp_path / "cache" / "m.h5")
    with pytest.raises(DownloadError) as info:
        dl.download(urls, dest, size=SIZE, sha256=sha, advice=", or give its path")
    message = str(info.value)
    assert "\n" not in message
    assert "m.h5" in message and sha in message and "300,000 bytes" in message and dest in message
    assert all(u in message for u in urls) and "refused" in message
    assert message.endswith(", or give its path")
    assert isinstance(info.value, WeightsUnavailableError)
    assert not os.path.exists(dest) and not os.path.exists(dl.partial_path(dest))


def test_no_url_at_all_says_so(tmp_path, payload):
    with pytest.raises(DownloadError, match="no URL is known for it"):
        dl.download([], tmp_path / "m.h5", size=SIZE, sha256=payload[1])


def test_a_valid_file_in_place_is_used_without_a_request_and_an_invalid_one_is_refused(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data)
    dest = tmp_path / "m.h5"
    dest.write_bytes(data)
    assert dl.download([url], dest, size=SIZE, sha256=sha) == str(dest)
    assert server.requests == []
    dest.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match="299,999 bytes, expected 300,000 bytes"):
        dl.download([url], dest, size=SIZE, sha256=sha)


def test_verify_names_a_git_lfs_pointer(tmp_path, payload):
    path = tmp_path / "m.h5"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + payload[1].encode() + b"\n")
    with pytest.raises(IntegrityError, match="Git LFS pointer"):
        dl.verify(str(path), size=SIZE, sha256=payload[1])


def test_one_download_of_a_file_at_a_time(tmp_path, server, payload):
    data, sha = payload
    url = server.add("/m.h5", data)
    dest = str(tmp_path / "m.h5")
    with open(dl.partial_path(dest), "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(WeightsUnavailableError, match="another mlsp process is downloading it"):
            dl.download([url], dest, size=SIZE, sha256=sha)
    assert server.requests == []
    assert dl.download([url], dest, size=SIZE, sha256=sha) == dest


def test_ctrl_c_keeps_what_was_downloaded_and_the_next_call_finishes_without_downloading_again(tmp_path, server,
                                                                                               payload):
    data, sha = payload
    url = server.add("/m.h5", data)
    dest = str(tmp_path / "m.h5")
    with pytest.raises(KeyboardInterrupt):
        dl.download([url], dest, size=SIZE, sha256=sha, progress=ctrl_c_after(None))  # at the last byte
    assert not os.path.exists(dest) and os.path.getsize(dl.partial_path(dest)) == SIZE
    assert dl.download([url], dest, size=SIZE, sha256=sha) == dest
    assert open(dest, "rb").read() == data and len(server.requests) == 1


def test_bytes_kept_from_a_bad_source_do_not_spoil_a_good_mirror(tmp_path, server, payload):
    data, sha = payload
    bad = server.add("/bad/m.h5", bytes(reversed(data)), cut_after=100_000, cuts=9)
    good = server.add("/good/m.h5", data)
    dest = dl.download([bad, good], tmp_path / "m.h5", size=SIZE, sha256=sha, retries=0)
    assert open(dest, "rb").read() == data
    # the mirror first completed the bad source's 100,000 bytes; that failed its check, so the
    # mirror was asked again for the whole file
    assert server.ranges_asked("/good/m.h5") == ["bytes=100000-", None]
