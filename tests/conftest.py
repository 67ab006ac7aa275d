"""Shared fixtures (plain helpers are in tests/helpers.py). Every test runs offline on random
backbones and small generated images; nothing here needs ImageNet weights, AVA or a GPU."""

import json
import os
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras writes its config and weights cache under KERAS_HOME: keep tests away from the user's.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="mlsp-keras-home-"))
# The extractor cache (mlsp.backbone.forward_cache) would write an entry for each net and seed the tests
# use: tests/test_startup.py turns it on where it is tested.
os.environ.setdefault("MLSP_FORWARD_CACHE", "0")

# before any test module imports keras: TensorFlow reads its oneDNN switch once, when it starts,
# and the CLI sets it (on CPUs without AVX-512, mlsp.runtime.backend.prepare_process), so the
# tests' processes compute as the CLI's subprocesses do, whichever test file runs first
from mlsp.runtime.backend import prepare_process  # noqa: E402

prepare_process()

# pytest-xdist's workers share the machine's cores: each worker's TensorFlow gets its share (on 2
# cores, 2 or 3 workers: one thread each) instead of a pool of one thread per core, which ran 4 busy
# threads on 2 cores (the CPU-bound test files took 14% longer). In the worker only, before its first
# op: a subprocess a test starts keeps every core while its worker waits for it; one whose result
# must equal the worker's bit for bit runs with the worker's threads (helpers.same_threads_env).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    from mlsp.runtime.backend import configure_threads  # noqa: E402

    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    configure_threads(_SHARE, _SHARE)

import pytest  # noqa: E402

from helpers import write_image  # noqa: E402  (tests/ is on the path: pyproject's pythonpath)

#: What each test took in the last full run that stored it (`--store-durations`, on the 2-core
#: machine; docs/testing.md): seconds per test, and per file. It decides two things, so that no
#: list is kept by hand:
#: - the order: with `-n 3 --dist loadfile` each worker takes the next file when it is nearly done
#:   with its own, in collection order, so the longest files start first and the short ones fill
#:   the end, and neither worker is left alone on a long file (a file not in it counts as the median);
#: - the tiers: a test that took more than SLOW_SECONDS is marked `slow`, like those marked by hand,
#:   so `-m "not slow"` (the fast tier, README) leaves it out. A new test is fast until measured.
DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
SLOW_SECONDS = 2.0


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test's and each file's time to tests/durations.json after the run")


def pytest_configure(config):
    # pytest-xdist would otherwise hand out the files with the most tests first (its
    # --loadscope-reorder), undoing the order by duration
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(StoreDurations(), "mlsp-store-durations")


def stored_durations() -> dict:
    """{"tests": {nodeid: s}, "files": {name: s}} of tests/durations.json (empty where missing)."""
    try:
        with open(DURATIONS) as handle:
            stored = json.load(handle)
        return {"tests": dict(stored.get("tests", {})), "files": dict(stored.get("files", {}))}
    except (OSError, ValueError, AttributeError, TypeError):
        return {"tests": {}, "files": {}}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    stored = stored_durations()
    files = sorted(stored["files"].values())
    default = files[len(files) // 2] if files else 0.0
    for item in items:
        if stored["tests"].get(item.nodeid, 0.0) > SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -stored["files"].get(item.path.name, default))  # stable: a file's own order kept


class StoreDurations:
    """``--store-durations``: each test's time (set-up, call and tear-down, as the workers report
    them to the controller) and each file's sum, written to tests/durations.json at the end."""

    def __init__(self):
        self.tests = {}

    def pytest_runtest_logreport(self, report):
        self.tests[report.nodeid] = self.tests.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session, exitstatus):
        if not self.tests:
            return
        files = {}
        for nodeid, seconds in self.tests.items():
            name = os.path.basename(nodeid.split("::")[0])
            files[name] = files.get(name, 0.0) + seconds
        by_time = lambda d: {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
        with open(DURATIONS, "w") as handle:
            json.dump({"files": by_time(files), "tests": by_time(self.tests)}, handle, indent=1)
            handle.write("\n")


@pytest.fixture(scope="session")
def extractors():
    """One FeatureExtractor per (net, pooling, augment) asked for, built once per session."""
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    cache = {}

    def get(net="iv3", pooling="narrow", augment=True, weights="random:0", precision="float32"):
        key = (net, pooling, augment, weights, precision)
        if key not in cache:
            cache[key] = FeatureExtractor(ExtractConfig(net=net, pooling=pooling, augment=augment,
                                                        weights=weights, precision=precision))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory, extractors):
    """A small sample (16 images, its votes, a test list) and its iv3 narrow store, made once
    per session. Read it; write elsewhere (a test's own tmp_path)."""
    from mlsp.extraction.job import ExtractConfig, extract
    from mlsp.sample import build_sample

    root = tmp_path_factory.mktemp("sample_store")
    # at most 200 px a side (the sample's default is 200-700): every test scoring these images
    # runs the backbone on 8 views of each, and none of them is about the images' size
    info = build_sample(str(root / "sample"), n_images=16, seed=1, max_side=200)
    store = str(root / "iv3_narrow.h5")
    extract(info.images_dir, ExtractConfig(net="iv3", weights="random:0"), store, labels=info.labels_path,
            test_list=info.test_list_path, val_fraction=0.25, extractor=extractors(net="iv3"))
    return {"images": info.images_dir, "store": store}


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, sample_store):
    """A single1fc run (two short epochs) on :func:`sample_store`, made once per session."""
    from mlsp import api

    out = str(tmp_path_factory.mktemp("sample_run") / "run")
    return api.train(sample_store["store"], head="single1fc", out=out, epochs=2, steps_per_epoch=2,
                     lr=1e-3).run_dir


@pytest.fixture
def image_dir(tmp_path):
    """Six small images of five sizes, two of them in a sub-folder."""
    root = tmp_path / "imgs"
    sizes = [(96, 128), (120, 100), (100, 100), (130, 90), (96, 128), (110, 140)]
    for k, (h, w) in enumerate(sizes):
        sub = "sub/" if k >= 4 else ""
        write_image(root / f"{sub}img{k}.png", h, w, seed=k)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of the given size (needs root and the right to mount)."""
    mounts = []

    def mount(size, name="disk"):
        folder = tmp_path / name
        folder.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); "
                        "the simulated tests cover the same paths without one")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def server():
    """A file server on 127.0.0.1 for the download tests (tests/http_files.py)."""
    from http_files import FileServer

    with FileServer() as files:
        yield files


@pytest.fixture
def model_home(tmp_path, monkeypatch):
    """An empty KERAS_HOME (the models' cache lives below it) and no users' catalogue."""
    from heads.score.catalogue import CATALOGUE_ENV

    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv(CATALOGUE_ENV, raising=False)
    return home
