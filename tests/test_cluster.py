"""Extraction over a Ray cluster (`--ray`): one real local Ray instance with 2 workers for the
module (each start costs seconds), stores equal to the one-process store, a worker killed
mid-run, the second run, workers that differ in provenance (accepted) or configuration (refused),
and `--ray auto` against a cluster made with `ray start --head`; also planning the workers from the
machines' resources, a start that fails after Ray started, and `--workers` reaching the workers."""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cli
from helpers import ctrl_c_after, write_image
from heads.score.scoring import score_images
from mlsp.extraction.job import ExtractConfig, FeatureExtractor, extract
from mlsp.runtime.progress import NullProgress
from mlsp.images.readahead import DECODE_WORKERS

ray = pytest.importorskip("ray", reason='the Ray extra is not installed (pip install -e ".[ray]")')
psutil = pytest.importorskip("psutil", reason="psutil (a dependency of Ray) finds the workers' processes")

from mlsp.extraction.cluster import Address, Cluster, plan  # noqa: E402
from mlsp.errors import ClusterError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ExtractConfig(net="iv3", weights="random:0")


def store_content(path):
    with h5py.File(path, "r") as f:
        content = {k: f[k][...] for k in ("features", "ids", "paths", "sizes", "mos", "votes", "split", "views")}
        content.update({f"errors/{k}": f["errors"][k][...] for k in ("id", "path", "reason")})
    return content


def assert_same_store(a, b):
    x, y = store_content(a), store_content(b)
    for key in x:
        if key == "features":
            # Equal within float16 rounding: a worker of 1 CPU runs the convolutions on one thread, the
            # one process on two, and oneDNN's AVX2 kernels split their sums by thread (AVX-512 ones
            # gave the same bits); two float16 steps (2 x 2^-10 relative) bound the difference.
            np.testing.assert_allclose(x[key].astype(np.float32), y[key].astype(np.float32), rtol=2 ** -9,
                                       atol=1e-4, err_msg=key)
        elif x[key].dtype.kind == "f":
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)  # NaN equals NaN here
        else:
            assert x[key].tolist() == y[key].tolist(), key


def ray_processes():
    """Ray's processes under this one (the instance ray.init started, and its workers)."""
    return [p for p in psutil.Process().children(recursive=True) if _is_ray(p)]


def _is_ray(p):
    try:
        name = p.name() + " " + " ".join(p.cmdline()[:2])
    except psutil.Error:
        return False
    return any(k in name for k in ("raylet", "gcs_server", "ray::", "default_worker", "ray/_private"))


@pytest.fixture(scope="module")
def cluster():
    """Ray on this machine with 2 workers of 1 CPU, as `--ray local:2` starts it."""
    if ray.is_initialized():
        pytest.fail("a Ray instance is already running in this test process")
    c = Cluster("local:2")
    yield c
    c.close()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray left processes behind"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, extractors):
    """Twelve small images of several sizes, one broken file, and their one-process store."""
    root = tmp_path_factory.mktemp("cluster")
    images = root / "imgs"
    for k in range(12):
        write_image(images / ("sub" if k % 3 == 0 else "") / f"img{k:02d}.png", 96 + 8 * (k % 4), 128 - 6 * (k % 3),
                    seed=k)
    (images / "broken.jpg").write_text("not an image")
    one = root / "one.h5"
    extract(str(images), CONFIG, str(one), extractor=extractors(net="iv3"))
    return {"root": root, "images": str(images), "one": str(one)}


CPU_MACHINES = [{"CPU": 8.0}, {"CPU": 4.0}]


def test_plan_gives_each_machine_its_workers_and_refuses_gpus_no_machine_has():
    assert plan(CPU_MACHINES, Address.parse("auto"), None, None) == (4.0, 0.0, 3)
    assert plan([{"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0}], Address.parse("auto"), None, None) == (4.0, 1.0, 4)
    for address in ("auto", "local:2"):
        with pytest.raises(ClusterError) as caught:
            plan(CPU_MACHINES, Address.parse(address), None, 1)
        assert str(caught.value) == ("no machine of the Ray cluster has 1 GPUs for a worker (the most on one "
                                     "machine: 0); lower --ray-gpus-per-worker (0: workers on CPUs)")
    with pytest.raises(ClusterError, match="local:4 with 1 GPUs per worker needs 4 GPUs, this machine has 2"):
        plan([{"CPU": 8.0, "GPU": 2.0}], Address.parse("local:4"), None, None)  # 2 workers would wait forever


def test_a_cluster_that_fails_after_starting_ray_stops_it():
    """Before the module's cluster starts: Ray is started, then planning refuses the GPUs."""
    assert not ray.is_initialized(), "this test runs before the module's Ray instance starts"
    with pytest.raises(ClusterError, match="no machine of the Ray cluster has 64 GPUs"):
        Cluster("local:1", gpus_per_worker=64)
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray left processes behind"


def test_two_workers_give_the_one_process_store_and_a_second_run_does_nothing(cluster, folder, tmp_path):
    out = str(tmp_path / "ray.h5")
    runner = cluster.runner(CONFIG, chunk_images=2)
    result = extract(folder["images"], CONFIG, out, runner=runner)
    assert (result.images, result.new, len(result.errors)) == (12, 12, 1)
    assert len(runner.workers) == 2 and len({pid for _, pid in runner.workers.values()}) == 2
    assert runner.retried_chunks == 0
    assert_same_store(out, folder["one"])
    with h5py.File(out, "r") as f:
        assert f.attrs["weights_sha256"] == h5py.File(folder["one"], "r").attrs["weights_sha256"]

    again = cluster.runner(CONFIG, chunk_images=2)
    second = extract(folder["images"], CONFIG, out, runner=again)
    assert (second.new, second.skipped_existing, second.images) == (0, 13, 12)
    assert not os.path.exists(out + ".partial")
    assert_same_store(out, folder["one"])


def test_workers_may_differ_in_provenance_but_not_in_configuration(cluster):
    """Each worker's extractor reports its own device (its pid): accepted, the store records the
    first's; a weights hash of its own (another weights file on that machine): refused."""

    @dataclasses.dataclass(frozen=True)
    class Skewed:
        """A recipe whose extractor differs per worker process in one store attribute; the
        backbone is not built (store_attrs needs the configuration and the weights' record)."""

        what: str

        def build(self):
            extractor = FeatureExtractor.__new__(FeatureExtractor)
            extractor.config, extractor.provenance = CONFIG, {"backend": "tensorflow", "backend_version": "2.x",
                                                              "device": "cpu"}
            extractor.weights_record = {"source": CONFIG.weights, "sha256": "0" * 64}
            if self.what == "device":
                extractor.provenance["device"] = f"GPU of process {os.getpid()}"
            else:
                extractor.weights_record["sha256"] = f"{os.getpid():064d}"
            return extractor

    runner = cluster.runner(Skewed("device"))
    info = runner.info()
    assert len(runner.workers) == 2
    replies = ray.get([actor.info.remote(Skewed("device")) for actor in cluster.actors])
    assert len({r["info"]["device"] for r in replies}) == 2 and len({r["identity"] for r in replies}) == 1
    assert info["device"].startswith("GPU of process") and info["weights_sha256"] == "0" * 64

    with pytest.raises(ClusterError, match=r"built another model than the job's: weights_sha256: '0+\d+' here"):
        cluster.runner(Skewed("weights")).info()


def test_a_killed_worker_loses_nothing_and_doubles_nothing(cluster, folder, tmp_path, caplog):
    out = str(tmp_path / "killed.h5")
    runner = cluster.runner(CONFIG, chunk_images=1)
    killed = []

    class KillOnce(NullProgress):
        """A progress bar that SIGKILLs one worker's process once the first image is back."""

        def update(self, n=1):
            if not killed:
                host, pid = runner.workers[max(runner.workers)]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    result = extract(folder["images"], CONFIG, out, runner=runner, progress=KillOnce)
    assert killed and runner.retried_chunks >= 1, "the killed worker had chunks in hand"
    assert "died" in caplog.text
    assert (result.images, result.new, len(result.errors)) == (12, 12, 1)
    assert_same_store(out, folder["one"])


def test_scoring_on_the_cluster_resumes_a_killed_job_and_equals_local_scoring(cluster, folder, sample_run,
                                                                              tmp_path, extractors, caplog):
    local_csv = str(tmp_path / "local.csv")
    local, local_errors = score_images(sample_run, folder["images"], local_csv, extractor=extractors(net="iv3"))
    assert len(local) == 12 and len(local_errors) == 1

    out = str(tmp_path / "ray.csv")
    with pytest.raises(KeyboardInterrupt):
        score_images(sample_run, folder["images"], out, extractor=extractors(net="iv3"), progress=ctrl_c_after(4))
    assert not os.path.exists(out)
    with open(out + ".partial") as handle:
        assert len(handle.read().splitlines()) == 4, "one line per scored image"
    with caplog.at_level("INFO"):
        frame, errors = score_images(sample_run, folder["images"], out, cluster=cluster)
    assert "4 of 13 images already scored; 9 to go" in caplog.text
    assert not os.path.exists(out + ".partial")
    assert errors == local_errors
    assert frame["id"].tolist() == local["id"].tolist() and frame["path"].tolist() == local["path"].tolist()
    # A 1-thread worker and the 2-thread process sum convolutions in another order on AVX2 (see
    # assert_same_store): the scores agree to float32 rounding carried through the head; pred_std,
    # a small spread over the views, keeps an absolute bound.
    np.testing.assert_allclose(frame[["pred", "pred_std"]], local[["pred", "pred_std"]], rtol=1e-4, atol=1e-5)
    a, b = pd.read_csv(out, dtype=str), pd.read_csv(local_csv, dtype=str)
    assert a.drop(columns=["pred", "pred_std"]).equals(b.drop(columns=["pred", "pred_std"]))
    np.testing.assert_allclose(a[["pred", "pred_std"]].astype(float), b[["pred", "pred_std"]].astype(float),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_killed_driver_resumes_into_the_same_store(cluster, folder, tmp_path):
    """`mlsp extract --ray local:2` whose driver (the process that writes the store) is killed
    with SIGKILL after its second checkpoint: the finished checkpoints are kept, and the same extraction on a cluster again finishes the store the
    one-process run writes, each image once."""
    from test_faults import faulty_command

    out, never = tmp_path / "s.h5", tmp_path / "never"
    env = dict(os.environ, PYTHONPATH=ROOT, MLSP_ROOT=ROOT, MLSP_FORWARD_CACHE="0")
    driver = subprocess.Popen(faulty_command("mlsp.store.shards:ShardWriter.flush", 3, str(never), "extract", "--images",
                                             folder["images"], "--net", "iv3", "--weights", "random:0", "--out", out,
                                             "--checkpoint-every", "2", "--ray", "local:2"),
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "holding", driver.stderr.read()[-3000:]
        tree = _children(driver.pid)
        assert [p for p in tree if _is_ray(p)], "the driver started no Ray processes"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    # Ray's agents (runtime env, dashboard) outlive a driver killed with SIGKILL for a while (20 s
    # and more): this test's own processes, ended by their ids at once
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=20)
    shards = [os.path.join(str(out) + ".partial", n) for n in os.listdir(str(out) + ".partial")
              if n.startswith("shard-")]
    assert len(shards) == 2 and not out.exists()
    kept = 0
    for shard in shards:
        with h5py.File(shard, "r") as f:
            kept += len(f["features"])
    result = extract(folder["images"], CONFIG, str(out), runner=cluster.runner(CONFIG, chunk_images=2))
    assert kept >= 2 and (result.images, result.new, len(result.errors)) == (12, 12 - kept, 1)
    assert_same_store(out, folder["one"])


def test_the_workers_run_on_the_engine_the_driver_chose(cluster, folder, tmp_path):
    """--engine reaches the Ray workers: native is refused there as on one machine (this suite's
    workers run TensorFlow), where a worker left to its own default would run Keras."""
    from mlsp.backbone import native

    with native.engine_chosen("native"), pytest.raises(ClusterError, match="--engine native runs on PyTorch"):
        extract(folder["images"], CONFIG, str(tmp_path / "n.h5"), runner=cluster.runner(CONFIG, chunk_images=4))
    assert not os.path.exists(tmp_path / "n.h5")
    with native.engine_chosen("keras"):
        result = extract(folder["images"], CONFIG, str(tmp_path / "k.h5"), runner=cluster.runner(CONFIG, chunk_images=4))
    assert result.images == 12
    with h5py.File(tmp_path / "k.h5", "r") as f:
        assert f.attrs["engine"] == "keras"


def test_ray_without_the_extra_says_how_to_install_it(monkeypatch, folder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    res = CliRunner().invoke(cli.main, ["extract", "--images", folder["images"], "--net", "iv3", "--weights",
                                        "random:0", "--out", str(tmp_path / "x.h5"), "--ray", "local:2"])
    assert res.exit_code != 0
    last = res.output.strip().splitlines()[-1]
    assert last == 'Error: --ray needs Ray, which is not installed: pip install -e ".[ray]"'


def test_workers_are_the_ray_workers_decode_threads_in_extract_and_score(monkeypatch, folder, sample_run, tmp_path):
    """`--workers` means the same with and without --ray: the threads decoding ahead of each model."""
    made = []

    class Recording:
        def __init__(self, address, cpus_per_worker=None, gpus_per_worker=None, decode_threads=None):
            made.append(decode_threads)
            raise ClusterError("stopped before starting Ray")

    import mlsp.extraction.cluster

    monkeypatch.setattr(mlsp.extraction.cluster, "Cluster", Recording)
    common = ["--images", folder["images"], "--ray", "local:2"]
    for args in (["extract", "--net", "iv3", "--weights", "random:0", "--out", str(tmp_path / "x.h5")],
                 ["score", sample_run]):
        for workers in ([], ["--workers", "5"]):
            res = CliRunner().invoke(cli.main, args + common + workers)
            assert res.output.strip().splitlines()[-1] == "Error: stopped before starting Ray"
    assert made == [DECODE_WORKERS, 5, DECODE_WORKERS, 5]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_joins_a_cluster_started_with_ray_start(folder, tmp_path):
    """As a user would: `ray start --head` on this machine, then `mlsp extract --ray auto`."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ADDRESS=f"127.0.0.1:{port}", RAY_AUTH_MODE="token")
    bin_dir = os.path.dirname(sys.executable)
    # --block: the cluster lives as long as this one process, so the test ends it (and only it)
    # by its id; `ray stop` would stop every Ray instance on the machine, this module's too
    # its own --temp-dir (short: Ray puts sockets there): the address file it leaves behind must
    # not send later `ray.init()`s on this machine to a cluster that is gone
    temp_dir = tempfile.mkdtemp(prefix="mlsp-ray-", dir="/tmp")
    head = subprocess.Popen([os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", temp_dir],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail(f"ray start --head failed (exit code {head.wait()})")
        out = str(tmp_path / "auto.h5")
        res = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "extract", "--images", folder["images"],
                              "--net", "iv3", "--weights", "random:0", "--out", out, "--ray", "auto",
                              "--ray-cpus-per-worker", "2"],
                             env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "12 images (12 new" in res.stdout
        assert "1 Ray workers on 1 machines" in res.stderr
        assert_same_store(out, folder["one"])
    finally:
        tree = [head] + [p for p in _children(head.pid)]
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        _, alive = psutil.wait_procs([p for p in tree[1:]], timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"ray start left {alive} behind"


def _children(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
