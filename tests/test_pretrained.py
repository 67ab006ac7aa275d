"""The catalogue of pretrained predictors (heads.score.catalogue), its cache and `mlsp models`.

Downloads come from a local HTTP server (tests/http_files.py); nothing leaves this machine."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from heads.score import catalogue as pt
from heads.registry import HEADS
from mlsp.backbone.nets import BACKBONES, get_backbone
from mlsp.errors import ConfigError, IntegrityError
from mlsp.store.format import POOLINGS
from http_files import closed_port_url

# The released heads (subpic/ava-mlsp, Git LFS): folder, head, pooling, size, sha256, in this order.
RELEASED = {
    "ava-mlsp-irv2-wide": ("irnv2_mlsp_wide_orig", "pool3fc", "wide", 255_383_120,
                           "47f9a29caed163d9dea2ed15b75aada4477cdb76bc2eac9c55f21dd3573a7a90"),
    "ava-mlsp-irv2-narrow": ("irnv2_mlsp_narrow_orig", "single3fc", "narrow", 148_210_528,
                             "0121f3235245df3db37e82fc3e5a84e22aaa731f24b3ffd3ea63d421c2b60102"),
    "ava-mlsp-irv2-narrow-aug": ("irnv2_mlsp_narrow_orig_aug", "single3fc", "narrow", 148_210_608,
                                 "6e069d80b8c31a5e683129bc9ee242707773cec14ab91edaa36ababb94135636"),
}

MIRRORS = {"ava-mlsp-irv2-wide": ("https://www.dropbox.com/s/16k0vh1dn7ls0cd/model_best_weights.h5?dl=1",)}


def invoke(*args, env=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_the_built_in_catalogue_is_the_three_released_models_in_order():
    assert pt.PRETRAINED.names()[:3] == list(RELEASED)


@pytest.mark.parametrize("name", pt.PRETRAINED.names())
def test_every_catalogue_entry(name):
    spec = pt.PRETRAINED.get(name)
    pt.check(spec)
    assert spec.net in BACKBONES and spec.pooling in POOLINGS and spec.head in HEADS and spec.views in pt.VIEWS
    assert HEADS[spec.head].needs_wide == (spec.pooling == "wide")
    assert spec.weights_format in pt.WEIGHTS_FORMATS and spec.source
    assert set(spec.paper) <= set(pt.PAPER_METRICS) and all(0 < v < 1 for v in spec.paper.values())
    folder, head, pooling, size, sha256 = RELEASED[name]
    assert (spec.net, spec.head, spec.pooling, spec.size, spec.sha256) == ("irv2", head, pooling, size, sha256)
    assert spec.views == ("crops18" if name.endswith("-aug") else "full")
    assert pt.VIEWS.get(spec.views).n_views == (18 if name.endswith("-aug") else 1)
    path = f"models/{folder}/model_best_weights.h5"
    # the authors' Dropbox mirror of the wide head, which their predict_mlsp_wide.ipynb fetches
    mirrors = MIRRORS.get(name, ())
    assert spec.urls == (f"https://github.com/subpic/ava-mlsp/raw/master/{path}",
                         f"https://media.githubusercontent.com/media/subpic/ava-mlsp/master/{path}", *mirrors)
    assert all("Dropbox" in spec.source for _ in mirrors)
    assert "osf.io/ubps5" in spec.source and path in spec.source
    assert spec.backbone_weights == "imagenet"
    # the head options are the authors' (3FC of 2048; Pool-3FC's columns of 1024) and the head takes them
    assert spec.head_options == ({"width": 2048, "kernels": 1024} if pooling == "wide" else {"width": 2048})
    assert HEADS[head].resolve_options(spec.head_options, get_backbone("irv2").total_channels) == spec.head_options


def test_the_papers_figures_are_those_of_each_models_configuration():
    assert pt.PRETRAINED.get("ava-mlsp-irv2-wide").paper == {"srcc": 0.752, "plcc": 0.755, "accuracy": 0.8161}
    assert pt.PRETRAINED.get("ava-mlsp-irv2-narrow").paper == {}
    assert pt.PRETRAINED.get("ava-mlsp-irv2-narrow-aug").paper == {"srcc": 0.743, "plcc": 0.745, "accuracy": 0.8137}


# --------------------------------------------------------------------------------------------
# A user's catalogue, served by a local HTTP server
# --------------------------------------------------------------------------------------------


def head_file(seed=3, size=200_000):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return data, hashlib.sha256(data).hexdigest()


def entry(name, data, urls, **fields):
    return {"name": name, "net": "iv3", "pooling": "narrow", "head": "single3fc", "head_options": {"width": 64},
            "views": "full", "file_name": "head.h5", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "urls": list(urls), "source": "a test mirror on 127.0.0.1", "paper": {}, "backbone_weights": "random:0",
            **fields}


def write_toml(path, entries):
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    lines = []
    for e in entries:
        lines += ["[[models]]"] + [f"{k} = {value(v)}" for k, v in e.items()] + [""]
    path.write_text("\n".join(lines))
    return path


def test_a_user_catalogue_adds_a_model_that_is_fetched_once_checked_and_listed(tmp_path, model_home, server):
    data, sha = head_file()
    url = server.add("/team/head.h5", data, cut_after=70_000)
    catalogue = write_toml(tmp_path / "team.toml", [entry("team-fetch", data, [closed_port_url(), url])])
    spec, = pt.add_catalogue(catalogue)
    assert pt.get_pretrained("team-fetch") == spec and spec.urls[1] == url
    path = pt.fetch("team-fetch")
    assert path == str(model_home / "mlsp" / "models" / "team-fetch" / "head.h5") == pt.local_path(spec)
    assert open(path, "rb").read() == data
    assert server.ranges_asked("/team/head.h5") == [None, "bytes=70000-"]
    assert pt.fetch(spec) == path and len(server.requests) == 2  # once: then from the cache, checked
    row, = [r for r in json.loads(invoke("models", "--json").output) if r["name"] == "team-fetch"]
    assert row["cached"] is True and row["path"] == path and row["sha256"] == sha


def test_a_corrupt_file_in_the_cache_is_moved_aside_and_fetched_again(tmp_path, model_home, server):
    data, sha = head_file(seed=4)
    url = server.add("/head.h5", data)
    spec, = pt.add_catalogue(write_toml(tmp_path / "c.toml", [entry("team-corrupt", data, [url])]))
    dest = pt.local_path(spec)
    os.makedirs(os.path.dirname(dest))
    corrupt = bytearray(data)
    corrupt[10] ^= 1
    with open(dest, "wb") as handle:
        handle.write(corrupt)
    assert open(pt.fetch(spec), "rb").read() == data
    assert open(dest + ".rejected", "rb").read() == corrupt
    assert len(server.requests) == 1


def test_offline_a_catalogue_model_is_one_line_saying_what_to_put_where(tmp_path, model_home):
    data, sha = head_file(seed=5)
    urls = [closed_port_url("/a/head.h5"), closed_port_url("/b/head.h5")]
    catalogue = tmp_path / "offline.json"
    catalogue.write_text(json.dumps({"models": [entry("team-offline", data, urls)]}))
    res = invoke("models", "--catalogue", catalogue, "--fetch", "team-offline")
    assert res.exit_code == 1
    message, = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert message.startswith("Error: cannot download team-offline's head.h5 (")
    dest = str(model_home / "mlsp" / "models" / "team-offline" / "head.h5")
    assert sha in message and urls[0] in message and urls[1] in message and f"put it at {dest}" in message
    assert "--model" in message
    assert os.listdir(os.path.dirname(dest)) == []  # nothing kept of the failed downloads
    with open(dest, "wb") as handle:  # put there by hand: used, after its check
        handle.write(data)
    res = invoke("models", "--catalogue", catalogue, "--fetch", "team-offline")
    assert res.exit_code == 0 and res.output.strip() == f"team-offline: {dest}"


def test_resolve_model_takes_a_name_or_a_file_checked_against_the_catalogue(tmp_path, model_home, server):
    data, sha = head_file(seed=6)
    url = server.add("/head.h5", data)
    spec, = pt.add_catalogue(write_toml(tmp_path / "r.toml", [entry("team-resolve", data, [url])]))
    assert pt.resolve_model("team-resolve") == (spec, pt.local_path(spec))
    by_hand = tmp_path / "downloads" / "head.h5"
    by_hand.parent.mkdir()
    by_hand.write_bytes(data)
    assert pt.resolve_model(str(by_hand)) == (spec, str(by_hand))
    by_hand.write_bytes(data[:-5000])  # a truncated copy of a catalogue file: refused
    with pytest.raises(IntegrityError, match=r"195,000 bytes, sha256 [0-9a-f]{64}, expected one of .*team-resolve"):
        pt.resolve_model(str(by_hand))
    own = tmp_path / "own.h5"
    own.write_bytes(b"a head of someone's own")
    assert pt.resolve_model(str(own)) == (None, str(own))
    with pytest.raises(ConfigError, match="neither a pretrained model"):
        pt.resolve_model(str(tmp_path / "nothing.h5"))


# --------------------------------------------------------------------------------------------
# mlsp models
# --------------------------------------------------------------------------------------------


def test_mlsp_models_lists_the_three_with_sizes_and_sha256(model_home):
    res = invoke("models")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    for name, (folder, head, pooling, size, sha256) in RELEASED.items():
        line, = [x for x in lines if x.startswith(name + " ")]
        assert f"{size:,}" in line and sha256 in line and head in line and f" {pooling} " in line
        assert folder in line and " no " in line
    assert [x.split()[0] for x in lines[1:4]] == list(RELEASED)
    assert "SRCC 0.752 PLCC 0.755" in lines[1] and "SRCC 0.743" in lines[3]
    assert any("irv2" in x and "not on this machine" in x for x in lines)
    rows = json.loads(invoke("models", "--json").output)
    assert [(r["name"], r["size"], r["sha256"]) for r in rows[:3]] == [(n, v[3], v[4]) for n, v in RELEASED.items()]
    assert rows[0]["backbone_weights_cached"] is False and rows[0]["urls"][0].startswith("https://github.com/")
    res = invoke("models", "ava-mlsp-irv2-wid")
    assert res.exit_code == 1 and res.output.strip().startswith("Error: unknown pretrained model 'ava-mlsp-irv2-wid'")


def test_mlsp_models_says_when_the_backbone_weights_are_here(model_home):
    weights = model_home / "models" / BACKBONES["irv2"].weights_file
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"placed")
    rows = json.loads(invoke("models", "ava-mlsp-irv2-wide", "--json").output)
    assert [r["name"] for r in rows] == ["ava-mlsp-irv2-wide"] and rows[0]["backbone_weights_cached"] is True


def test_a_catalogue_file_adds_an_entry_through_the_cli_and_mlsp_models(tmp_path, model_home):
    data, sha = head_file(seed=8, size=1234)
    toml = write_toml(tmp_path / "team.toml", [entry("team-cli-toml", data, ["https://mirror.example/head.h5"],
                                                     paper={"srcc": 0.7})])
    res = invoke("models", "--catalogue", toml)
    assert res.exit_code == 0
    line, = [x for x in res.output.splitlines() if x.startswith("team-cli-toml ")]
    assert sha in line and "1,234" in line and "single3fc" in line and "SRCC 0.700" in line
    as_json = tmp_path / "env.json"
    as_json.write_text(json.dumps({"models": [entry("team-cli-env", data, [])]}))
    res = invoke("models", "--json", env={pt.CATALOGUE_ENV: str(as_json)})
    names = [r["name"] for r in json.loads(res.output)]
    assert names[:3] == list(RELEASED) and "team-cli-env" in names


@pytest.mark.parametrize("change, said", [
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"sha256": "abc"}, "sha256 must be 64 lowercase hex digits"),
    ({"head": "pool9fc"}, "head 'pool9fc' is not a registered head"),
    ({"head": "pool3fc"}, "head pool3fc needs wide features"),
    ({"net": "vgg"}, "net 'vgg' is not a registered backbone"),
    ({"views": "crops99"}, "views 'crops99' is not one of full, crops18"),
    ({"file_name": "../../evil.h5"}, "must be a plain file name"),
    ({"urls": ["ftp://x/h.h5"]}, "urls must be a list of http(s) URLs, received ['ftp://x/h.h5']"),
    ({"urls": "https://x/h.h5"}, "urls must be a list of http(s) URLs, received 'https://x/h.h5'"),
    ({"head_options": {"depth": 3}}, "does not take depth"),
    ({"size": "big"}, "size must be the file's size in bytes"),
    ({"paper": {"srcc": "high"}}, "paper must map"),
    ({"paper": {"srcc": float("nan")}}, "paper must map"),
    # fields of the wrong type: one line naming the field, never a traceback, never accepted
    ({"urls": None}, "urls must be a list of http(s) URLs, received None"),
    ({"urls": 0}, "urls must be a list of http(s) URLs, received 0"),
    ({"urls": ""}, "urls must be a list of http(s) URLs, received ''"),
    ({"urls": {}}, "urls must be a list of http(s) URLs, received {}"),
    ({"urls": ["https://x/a b.h5\n"]}, "urls must be a list of http(s) URLs, received ['https://x/a b.h5\\n']"),
    ({"net": ["iv3"]}, "net must be text, received ['iv3']"),
    ({"views": {"full": 1}}, "views must be text"),
    ({"head": None}, "head must be text, received None"),
    ({"source": 5}, "source must be text, received 5"),
    ({"file_name": "head\u0000.h5"}, "file_name 'head\\x00.h5' must be a plain file name"),
    ({"file_name": "a\\b.h5"}, "must be a plain file name"),
    ({"size": 10 ** 30}, "size must be the file's size in bytes (1 to 68,719,476,736), received 1000000000000000000"),
    ({"size": 1.5}, "size must be the file's size in bytes"),
    ({"head_options": []}, "head_options must be a table, received []"),
])
def test_a_bad_catalogue_entry_is_one_line_naming_the_file_the_entry_and_the_field(tmp_path, change, said):
    data, _ = head_file(seed=9, size=100)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"models": [entry("team-bad", data, []) | change]}))
    res = invoke("models", "--catalogue", path)
    assert res.exit_code == 1
    message = res.output.strip()
    assert "\n" not in message and f"{path}: model 1 ('team-bad')" in message and said in message
    assert "team-bad" not in pt.PRETRAINED


def test_a_catalogue_that_is_not_one_is_refused(tmp_path):
    for text, said in (("{not json", "not valid JSON"), ('{"model": []}', "one list 'models'"),
                       ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        path = tmp_path / "c.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=said):
            pt.load_catalogue(path)
    with pytest.raises(ConfigError, match=r"\.json or \.toml"):
        pt.load_catalogue(tmp_path / "c.yaml")


def test_a_name_taken_by_another_entry_is_refused_the_same_entry_again_is_not(tmp_path):
    data, _ = head_file(seed=10, size=100)
    first = tmp_path / "a.json"
    first.write_text(json.dumps({"models": [entry("team-twice", data, [])]}))
    copy = tmp_path / "b.json"
    copy.write_text(first.read_text())
    pt.add_catalogue(first)
    pt.add_catalogue(copy)
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"models": [entry("team-twice", data + b"!", [])]}))
    with pytest.raises(ConfigError, match="already in the catalogue with other values"):
        pt.add_catalogue(other)
    with pytest.raises(ConfigError, match="'ava-mlsp-irv2-wide' is already in the catalogue"):
        pt.add_catalogue(write_toml(tmp_path / "d.toml", [dataclasses.asdict(pt.PRETRAINED.get("ava-mlsp-irv2-wide"))
                                                          | {"net": "iv3"}]))


def test_listing_the_catalogue_never_imports_keras(model_home):
    code = ("import sys, cli\n"
            "cli.main(['models', '--json'], standalone_mode=False)\n"
            "print('heavy:', sorted(m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "heavy: []"
    assert "ava-mlsp-irv2-narrow-aug" in res.stdout
