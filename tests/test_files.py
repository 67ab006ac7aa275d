"""Files mlsp writes: one writer per store, complete-or-absent files, one-line errors on a full
disk or a read-only target, prompt ends on SIGTERM/SIGINT with finished images kept."""

import errno
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers import remount, write_image
from mlsp.runtime import atomic, files
from mlsp.errors import LabelsError, StoreLocked, WriteError
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.store.read import FeatureStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ExtractConfig(net="iv3", weights="random:0")


def visible(folder):
    """Every name in a folder tree, hidden temporaries included."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def ids_of(path):
    with FeatureStore(str(path)) as s:
        return s.ids.tolist()


# --------------------------------------------------------------------------------------------
# One writer per store
# --------------------------------------------------------------------------------------------


def _as_another_user(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in Python as user nobody (needs root and setpriv); skip where that cannot be."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a second writer as another user")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                          f"import sys; sys.path.insert(0, {ROOT!r}); " + code], capture_output=True, text=True)
    if "ok-python" not in res.stdout and "Error" not in res.stderr and res.returncode:
        pytest.skip(f"cannot run a process as another user here: {res.stderr.strip()[-200:]}")
    return res


def test_a_lock_file_of_another_user_is_a_refusal_not_a_licence(tmp_path):
    """A shared folder (anyone may write) where another user's writer holds ``s.h5.lock``: a
    second writer who cannot open that file is refused, not let through unlocked."""
    import pathlib
    import shutil
    import tempfile

    shared = pathlib.Path(tempfile.mkdtemp(prefix="mlsp-shared-"))  # pytest's tmp_path is root's alone
    os.chmod(shared, 0o777)
    store = str(shared / "s.h5")
    with files.StoreLock(store):  # the first writer (root here): its lock file is 0644, root's
        res = _as_another_user(
            "print('ok-python'); from mlsp.runtime.files import StoreLock; from mlsp.errors import MLSPError\n"
            f"try:\n    lock = StoreLock({store!r}).acquire(); print('read_only', lock.read_only)\n"
            "except MLSPError as exc:\n    print('refused:', exc)")
        assert "refused: " in res.stdout, res.stdout + res.stderr
        assert f"{store}.lock: cannot take the store's lock (permission denied" in res.stdout
        assert "another user (pid " in res.stdout  # what the lock file says, where readable
        assert os.path.exists(store + ".lock")  # the first writer's, untouched
    # a folder nobody but its owner may write, and no lock in it: nothing can be written there
    os.chmod(shared, 0o755)
    res = _as_another_user(f"print('ok-python'); from mlsp.runtime.files import StoreLock; "
                           f"print('read_only', StoreLock({store!r}).acquire().read_only)")
    shutil.rmtree(shared)
    assert "read_only True" in res.stdout, res.stdout + res.stderr


def test_a_file_system_without_locks_is_one_line_and_leaves_no_lock_file(tmp_path, image_dir, monkeypatch):
    """ENOLCK (an NFS share without a lock service): a one-line refusal, no ``.lock`` left."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    out = tmp_path / "s.h5"
    res = CliRunner().invoke(cli.main, ["extract", "--images", str(image_dir), "--net", "iv3", "--weights",
                                        "random:0", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {out}.lock: cannot take the store's lock (the file system cannot lock files (ENOLCK: an NFS "
        "share without a lock service?)); nothing was written. One writer per store: wait for the other writer, "
        "delete the lock file if no mlsp process writes the store, or write to another --out on a local disk")
    assert os.listdir(tmp_path) == ["imgs"]


def test_a_live_writer_is_refused_with_its_pid_and_a_stale_lock_is_taken_over(tmp_path, image_dir, extractors):
    out = tmp_path / "s.h5"
    ex = extractors(net="iv3")
    with files.StoreLock(out):  # another writer holds the store (flock: any other open file conflicts)
        with pytest.raises(StoreLocked, match=rf"s\.h5 is being written by another mlsp process \(pid {os.getpid()} "):
            extract(str(image_dir), CONFIG, str(out), extractor=ex)
        assert not out.exists() and not os.path.exists(str(out) + ".partial")
    # a lock file left by a process that died (kill -9): nobody holds it, so it is taken over
    (tmp_path / "s.h5.lock").write_text("pid 999999 on elsewhere since 2020-01-01T00:00:00+00:00\n")
    result = extract(str(image_dir), CONFIG, str(out), extractor=ex)
    assert result.new == 6 and not os.path.exists(str(out) + ".lock")
    # released on an error too
    bad = tmp_path / "labels.csv"
    bad.write_text("id,mos\nimg0,11\n")
    with pytest.raises(LabelsError):
        extract(str(image_dir), CONFIG, str(out), extractor=ex, labels=str(bad))
    assert not os.path.exists(str(out) + ".lock")


def test_two_concurrent_extractions_never_mix(tmp_path, extractors):
    """Two CLI runs from different folders into one --out at once: the second is refused with
    the first's pid, and the store holds exactly the first's images."""
    first, second = tmp_path / "a", tmp_path / "b"
    for k in range(10):  # 100-145 x 120 px: what is checked is whose images the store holds
        write_image(first / f"a{k:02d}.png", 100 + 5 * k, 120, seed=k)
    for k in range(4):
        write_image(second / f"b{k}.png", 100, 100, seed=50 + k)
    out, go = tmp_path / "s.h5", tmp_path / "go"
    args = ["extract", "--net", "iv3", "--weights", "random:0", "--checkpoint-every", "1", "--out", str(out)]
    # the first run pauses after its first image until the second one has tried
    script = f"""
import os, sys, time, cli
from mlsp.extraction import job as ex
run = ex.FeatureExtractor.__call__
def paused(self, views):
    out = run(self, views)
    print('ready', flush=True)
    while not os.path.exists({str(go)!r}):
        time.sleep(0.02)
    return out
ex.FeatureExtractor.__call__ = paused
sys.argv = ['mlsp'] + {args + ["--images", str(first)]!r}
cli.main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        res = CliRunner().invoke(cli.main, args + ["--images", str(second)])
        assert res.exit_code == 1
        assert f"pid {proc.pid} " in res.output and "s.h5" in res.output and "Traceback" not in res.output
        assert res.output.strip().splitlines()[-1].startswith("Error: ")  # one line after the random warning
    finally:
        go.write_text("")
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    assert ids_of(out) == [f"a{k:02d}" for k in range(10)]


# --------------------------------------------------------------------------------------------
# Complete or absent
# --------------------------------------------------------------------------------------------


def test_atomic_path_renames_when_complete_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"
    with atomic.AtomicPath(target) as tmp:
        assert os.path.basename(tmp).startswith(".") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as handle:
            handle.write("{}")
        assert not target.exists()
    assert target.read_text() == "{}" and visible(tmp_path) == ["sub/metrics.json"]
    # any failure while writing: the previous file stays, the temporary goes
    with pytest.raises(RuntimeError):
        with atomic.AtomicPath(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "{}" and visible(tmp_path) == ["sub/metrics.json"]
    # a full disk while writing: one line naming the file and what was kept
    with pytest.raises(WriteError, match=r"metrics\.json: cannot write: no space left on the device; the previous "
                                         r"file is unchanged"):
        with atomic.AtomicPath(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
    # h5py's kind of OSError carries the errno in its message only
    assert atomic.describe_os_error(OSError("Unable to create file (errno = 30, error message = 'x')")) == \
        "read-only file system"
    # Keras needs its extension last
    assert atomic.temporary_name("r/model.keras", keep_extension=True).endswith(".keras")


def test_full_disk_and_read_only_media_on_a_real_tmpfs(small_disk, tmp_path, image_dir, extractors):
    """iv3 narrow, 8 views: 161 KB per image, and mlsp keeps 1 MiB free for HDF5's metadata:
    1600 KB hold about three images' shards, not six."""
    disk = small_disk("1600k")
    out = disk / "s.h5"
    ex = extractors(net="iv3")
    args = dict(extractor=ex, flush_images=1)
    with pytest.raises(WriteError, match=r"no space left on the device; finished images are kept in .*s\.h5\.partial"):
        extract(str(image_dir), CONFIG, str(out), **args)
    kept = [n for n in os.listdir(str(out) + ".partial") if n.startswith("shard-")]
    assert 1 <= len(kept) < 6 and not out.exists()
    assert not [n for n in visible(disk) if ".tmp" in n]
    # room for the shards but not for the finished store: the shards stay, no store.h5 at all
    remount(disk, "size=2500k")
    with pytest.raises(WriteError, match=r"s\.h5: cannot write: no space left on the device; finished images are "
                                         r"kept in .*s\.h5\.partial"):
        extract(str(image_dir), CONFIG, str(out), **args)
    assert not out.exists() and not [n for n in visible(disk) if ".tmp" in n]
    assert len([n for n in os.listdir(str(out) + ".partial") if n.startswith("shard-")]) == 6
    # room enough: the rerun finishes from the shards
    remount(disk, "size=8m")
    result = extract(str(image_dir), CONFIG, str(out), **args)
    assert result.new == 0 and result.images == 6 and visible(disk) == ["s.h5"]
    clean = tmp_path / "clean.h5"
    extract(str(image_dir), CONFIG, str(clean), extractor=ex)
    with h5py.File(out, "r") as a, h5py.File(clean, "r") as b:
        np.testing.assert_array_equal(a["features"][...], b["features"][...])
    # read-only media: a rerun with nothing to do works, and writes nothing
    remount(disk, "ro")
    result = extract(str(image_dir), CONFIG, str(out), extractor=ex)
    assert result.new == 0 and result.images == 6
    # a new image on read-only media: one line, nothing lost
    write_image(image_dir / "new.png", 100, 100, seed=9)
    res = CliRunner().invoke(cli.main, ["extract", "--images", str(image_dir), "--net", "iv3", "--weights",
                                        "random:0", "--out", str(out)])
    assert res.exit_code == 1 and "read-only file system" in res.output and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: ")
    assert ids_of(out) == ["img0", "img1", "img2", "img3", "sub/img4", "sub/img5"]


def test_full_disk_simulated(tmp_path, image_dir, extractors, monkeypatch):
    """Without a small disk to fill: every write of a shard's data fails with ENOSPC."""
    out = tmp_path / "s.h5"
    ex = extractors(net="iv3")
    extract(str(image_dir), CONFIG, str(out), extractor=ex, flush_images=2)
    write_image(image_dir / "new.png", 100, 100, seed=9)
    write_image(image_dir / "new2.png", 100, 110, seed=10)
    real_setitem, calls = h5py.Dataset.__setitem__, []

    def full(self, *args, **kwargs):  # the first image's features fit, then the disk is full
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(WriteError, match="no space left on the device; finished images are kept") as info:
        extract(str(image_dir), CONFIG, str(out), extractor=ex)
    # the disk filled inside HDF5, after the free-space check: the open checkpoint is lost, and said so
    assert str(info.value).endswith("(the 1 image of the unfinished checkpoint could not be kept: the next run "
                                    "extracts it again)")
    monkeypatch.undo()
    assert not [n for n in visible(tmp_path) if ".tmp" in n]
    assert ids_of(out) == ["img0", "img1", "img2", "img3", "sub/img4", "sub/img5"]
    assert extract(str(image_dir), CONFIG, str(out), extractor=ex).new == 2


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


def test_a_mismatch_message_summarises_long_values():
    from mlsp.backbone.nets import BACKBONES
    from mlsp.errors import StoreConfigMismatch

    irv2, iv3 = list(BACKBONES["irv2"].taps), list(BACKBONES["iv3"].taps)
    message = str(StoreConfigMismatch("s.h5", {"block_names": (irv2, iv3)}, advice="Do this."))
    assert f"store has {len(irv2)} items [{irv2[0]!r}, ..., {irv2[-1]!r}]" in message
    assert irv2[1] not in message and message.endswith("Do this.") and len(message) < 300


def test_a_signal_another_thread_receives_still_ends_the_wait_for_a_stalled_decode():
    """The kernel may hand a process's signal to any of its threads (a backend's pool): Python then
    runs its handler only when the main thread next runs Python code. Waiting for a decode that
    never returns, the main thread wakes often enough to see it."""
    import threading

    from mlsp.images.readahead import WAKE_SECONDS, decode_ahead

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    release = threading.Event()
    before = signal.signal(signal.SIGUSR1, stop)
    poke = threading.Timer(0.3, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGUSR1))
    unstick = threading.Timer(5.0, release.set)  # without the waking wait: the handler runs only now
    try:
        waiting = decode_ahead(lambda path: release.wait(), [("stalled.jpg", 0)], workers=1)
        start = time.monotonic()
        poke.start()
        unstick.start()
        with pytest.raises(Stopped):
            next(waiting)
        assert time.monotonic() - start < 0.3 + 4 * WAKE_SECONDS
    finally:
        release.set()
        poke.cancel()
        unstick.cancel()
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_extraction_promptly_and_keeps_finished_images(tmp_path, sig):
    """A decode that never returns (a FIFO named like a photo, read by a custom loader that
    opens it) must not keep the process alive: the signal ends it, finished images are kept."""
    root = tmp_path / "imgs"
    for k in range(4):
        write_image(root / f"{k}.png", 120, 120, seed=k)
    out = tmp_path / "s.h5"
    script = f"""
import sys, threading, time, cli
from mlsp.extraction import job as ex
load, run = ex.FeatureExtractor.load_views, ex.FeatureExtractor.__call__
def slow(self, path):
    if path.endswith('3.png'):
        threading.Event().wait()   # never returns
    return load(self, path)
done = []
def counted(self, views):
    out = run(self, views)
    done.append(1)
    if len(done) == 3:
        print('stuck', flush=True)  # the next image's decode never returns
    return out
ex.FeatureExtractor.load_views, ex.FeatureExtractor.__call__ = slow, counted
sys.argv = ['mlsp', 'extract', '--images', {str(root)!r}, '--net', 'iv3', '--weights', 'random:0',
            '--out', {str(out)!r}, '--checkpoint-every', '100']
cli.main()
"""
    # as in a terminal: the signal's default action. (Full-suite runs were seen to hand this child
    # SIGINT, SIGQUIT and SIGHUP ignored, /proc's SigIgn 0x7, from whatever the worker ran before;
    # an ignored Ctrl-C ends no program.)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "stuck"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    assert code == 130 and time.monotonic() - sent < 15, proc.stderr.read()
    assert "finished images are kept" in proc.stderr.read()
    shards = [n for n in os.listdir(str(out) + ".partial") if n.startswith("shard-")]
    assert len(shards) == 1
    with h5py.File(os.path.join(str(out) + ".partial", shards[0]), "r") as f:
        assert len(f["ids"]) == 3 and f["features"].shape[0] == 3
