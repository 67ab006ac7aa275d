"""Start-up: the extractor cache (mlsp.backbone.forward_cache) gives the same features as building,
and an altered entry is refused. (Commands that need no model import no backend:
tests/test_house.py's import hygiene test.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("MLSP_FORWARD_CACHE", raising=False)
    return tmp_path / "keras"


def test_cached_extractor_gives_the_same_features_and_an_altered_entry_is_refused(keras_home, extractors, caplog,
                                                                                  monkeypatch, tmp_path):
    from mlsp.backbone import forward_cache
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    config = ExtractConfig(net="iv3", weights="random:0")
    built = extractors(net="iv3")
    views = np.random.default_rng(0).integers(0, 256, (8, 80, 96, 3), dtype=np.uint8)
    expected = built(views)
    key = forward_cache.cache_key(config, forward_cache.weights_identity(config))
    folder = forward_cache.save(key, built._forward.compiled, built.model.variables, built.weights_record)
    assert folder == forward_cache.entry_path(key) and folder.startswith(str(keras_home))
    assert [name for name in os.listdir(os.path.dirname(folder)) if ".tmp-" in name] == []

    with caplog.at_level("INFO", logger="mlsp"):
        cached = FeatureExtractor(config, cache=True)
    assert "loaded the built iv3 extractor from the cache" in caplog.text
    assert cached._model is None  # nothing was built
    assert cached.weights_record == built.weights_record and cached.tracing_count == 1
    np.testing.assert_array_equal(cached(views), expected)

    # an entry is found by the weights' hash: the file's name and place recorded are this run's,
    # not those of the run that wrote the entry (the file's content is never read from the cache)
    from mlsp.runtime.files import file_sha256

    renamed = tmp_path / "renamed.weights.h5"
    renamed.write_bytes(b"the same weights as another file, under another name")
    by_file = ExtractConfig(net="iv3", weights=str(renamed))
    sha256 = file_sha256(str(renamed))
    forward_cache.save(forward_cache.cache_key(by_file, forward_cache.weights_identity(by_file)),
                       built._forward.compiled, built.model.variables,
                       {"source": "first.weights.h5", "sha256": sha256, "path": "/elsewhere/first.weights.h5"})
    assert FeatureExtractor(by_file, cache=True).weights_record == {
        "source": "renamed.weights.h5", "sha256": sha256, "path": str(renamed)}

    # one flipped byte in the weights: the entry is refused, removed and written again
    variables = os.path.join(folder, "variables")
    data = max((os.path.join(variables, n) for n in os.listdir(variables)), key=os.path.getsize)
    with open(data, "r+b") as handle:
        handle.seek(os.path.getsize(data) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    caplog.clear()
    with caplog.at_level("INFO", logger="mlsp"):
        assert forward_cache.load(key) is None  # the caller builds the extractor again and writes a new entry
    assert "cannot be used" in caplog.text and "differ from the SHA-256 recorded" in caplog.text
    assert not os.path.exists(folder)

    # each (net, pooling, weights, precision) has its own entry; the switch turns it off
    other = forward_cache.cache_key(ExtractConfig(net="iv3", weights="random:1", precision="bfloat16"), "random:1")
    assert forward_cache.entry_path(other) != folder
    monkeypatch.setenv("MLSP_FORWARD_CACHE", "0")
    assert not forward_cache.enabled()


def test_a_planted_cache_entry_is_never_loaded_or_run(keras_home, extractors, caplog, tmp_path):
    """An entry written at the real key by someone else, with its file hashes recomputed beside
    it: its graph (which would write a file when run, as a planted one wrote a .pth file into
    site-packages) is never loaded; the extractor is built, and its own entry is used after."""
    import hashlib

    import tensorflow as tf

    from mlsp.backbone import forward_cache
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    config = ExtractConfig(net="iv3", weights="random:0")
    built = extractors(net="iv3")
    views = np.random.default_rng(1).integers(0, 256, (8, 80, 96, 3), dtype=np.uint8)
    key = forward_cache.cache_key(config, forward_cache.weights_identity(config))
    folder = forward_cache.entry_path(key)
    marker = tmp_path / "planted.pth"
    channels = built(views).shape[-1]

    class Planted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def forward(self, batch):
            with tf.control_dependencies([tf.io.write_file(str(marker), "import os  # run at every start")]):
                return tf.zeros([tf.shape(batch)[0], channels])

    tf.saved_model.save(Planted(), folder)
    hashes = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as handle:
                hashes[os.path.relpath(os.path.join(parent, name), folder)] = hashlib.sha256(handle.read()).hexdigest()
    with open(os.path.join(folder, forward_cache.META_FILE), "w") as handle:
        json.dump({"key": key, "files": hashes, "weights_record": built.weights_record}, handle)
    with caplog.at_level("INFO", logger="mlsp"):
        extractor = FeatureExtractor(config, cache=True)
    assert "mlsp recorded no hash for it" in caplog.text
    assert not marker.exists()
    np.testing.assert_array_equal(extractor(views), built(views))
    caplog.clear()
    with caplog.at_level("INFO", logger="mlsp"):
        again = FeatureExtractor(config, cache=True)  # the entry mlsp wrote on building
    assert "loaded the built iv3 extractor from the cache" in caplog.text
    np.testing.assert_array_equal(again(views), built(views))
    assert not marker.exists()


def test_the_key_follows_the_code_that_builds_the_model(tmp_path):
    """An entry built before a change to mlsp's model code is never used after it, whatever
    the version string says: the key holds a hash of the package's code, not its version."""
    import shutil

    from mlsp.backbone import forward_cache
    from mlsp.extraction.job import ExtractConfig

    same, changed = tmp_path / "same" / "mlsp", tmp_path / "changed" / "mlsp"
    for copy in (same, changed):
        shutil.copytree(forward_cache.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert forward_cache.code_sha256(str(same)) == forward_cache.code_sha256()
    with open(changed / "backbones.py", "a") as handle:
        handle.write("\n# one more line in a backbone's module\n")
    assert forward_cache.code_sha256(str(changed)) != forward_cache.code_sha256()
    key = forward_cache.cache_key(ExtractConfig(net="iv3", weights="random:0"), "random:0")
    assert key["code"] == forward_cache.code_sha256() and "mlsp" not in key


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_cache_folder_that_cannot_be_written_means_no_cache(small_disk, monkeypatch, extractors, fault):
    """KERAS_HOME on read-only media or a full disk (a real tmpfs): saving keeps nothing and
    raises nothing, loading finds nothing; the run goes on as without a cache."""
    from helpers import remount
    from mlsp.backbone import forward_cache
    from mlsp.extraction.job import ExtractConfig

    disk = small_disk("256k")
    home = disk / "keras"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    if fault == "read-only":
        remount(disk, "ro")
    config = ExtractConfig(net="iv3", weights="random:0")
    built = extractors(net="iv3")
    key = forward_cache.cache_key(config, "random:0")
    assert forward_cache.save(key, built._forward.compiled, built.model.variables, built.weights_record) is None
    assert forward_cache.load(key) is None
    left = [os.path.join(d, f) for d, _, fs in os.walk(home) for f in fs]
    assert [p for p in left if not p.endswith((".trusted.json", ".lock"))] == []
    assert not forward_cache.trust_index().trusted(os.path.basename(forward_cache.entry_path(key)))


def test_tensorflow_start_up_lines_stay_off_the_console_unless_verbose():
    """TensorFlow prints absl's and oneDNN's start-up lines from C++ whatever TF_CPP_MIN_LOG_LEVEL
    says; the CLI keeps them off stderr, and -v lets them through (so the check sees real lines)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    run = [sys.executable, "-c", "import cli; cli.main()"]
    quiet = subprocess.run(run + ["info"], capture_output=True, text=True, env=env, timeout=120)
    loud = subprocess.run(run + ["-v", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "tensorflow" in quiet.stdout.lower()  # info imported TensorFlow and described it
    chatter = ("InitializeLog", "oneDNN custom operations", "cpu_feature_guard")
    assert not [c for c in chatter if c in quiet.stderr], quiet.stderr[-2000:]
    assert [c for c in chatter if c in loud.stderr], loud.stderr[-2000:]
