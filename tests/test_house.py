"""The house's rules, checked on the source: floors, private names, progress, registered layers."""

import ast
import json
import logging
import os
import subprocess
import sys

import pytest

from mlsp.runtime.progress import LogProgress, NullProgress, console_progress, null_progress, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mlsp", "heads")


def library_modules():
    """(module name, path) of every library module and cli.py."""
    found = [("cli", os.path.join(ROOT, "cli.py"))]
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if os.path.isfile(os.path.join(folder, d, "__init__.py")))
            dotted = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            for name in sorted(files):
                if name.endswith(".py"):
                    module = dotted if name == "__init__.py" else f"{dotted}.{name[:-3]}"
                    found.append((module, os.path.join(folder, name)))
    return found


def imports(module, path):
    """(imported module, [names]) for every import statement, relative ones resolved."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


#: The floors, lowest first: a module imports only from its own floor or those below it (function-local
#: imports included). ``mlsp`` and ``heads`` themselves (their ``__init__``) only register Keras layers.
FLOORS = (
    ("mlsp.errors", "mlsp.registry", "mlsp.version"),
    ("mlsp.runtime",),  # backends, precision, files, progress, downloads, trust
    ("mlsp.images",),  # decoding, views, identity, read-ahead
    ("mlsp.store",),  # the format, its attributes, writing, shards, reading, labels and splits
    ("mlsp.backbone",),  # the networks, their weights, folding, Keras' graph, cost, layers, forward cache
    ("mlsp.extraction", "mlsp.sample"),  # stage 1 as a job, on one machine or a Ray cluster
    ("heads",),  # stage 2's core: the head registry and models, targets, runs, data, metrics, plots
    ("heads.train",),
    ("heads.score",),  # scoring, export, released models
    ("heads.personal",),
    ("heads.report",),  # the HTML report and saliency
    ("mlsp.api",),  # the facade over both stages
    ("cli",),
)


def floor_of(module):
    matches = [(len(name), k) for k, names in enumerate(FLOORS) for name in names
               if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def import_graph():
    """module -> the library modules it imports (anywhere in it, function-local imports too)."""
    modules = dict(library_modules())
    graph = {}
    for module, path in modules.items():
        edges = set()
        for target, names in imports(module, path):
            found = next((c for c in [f"{target}.{n}" for n in names] + [target] if c in modules), None)
            if found and found != module:
                edges.add(found)
        graph[module] = edges
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_function_local_imports_included():
    assert cycles(import_graph()) == []
    # the checker finds a cycle where there is one (function-local imports count)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_lives_on_a_floor_and_imports_only_downwards():
    graph = import_graph()
    homeless = [m for m in graph if m not in ("mlsp", "heads") and floor_of(m) is None]
    assert homeless == [], "give these a floor in FLOORS (docs/architecture.md)"
    upwards = [f"{m} imports {t}" for m, targets in graph.items() if m not in ("mlsp", "heads")
               for t in targets if floor_of(t) is not None and floor_of(t) > floor_of(m)]
    assert upwards == [], "imports run downwards only (docs/architecture.md)"
    # the subpackages the floors name exist, each with modules of its own
    packages = {m.rpartition(".")[0] for m in graph if m.count(".") >= 2}
    assert {"mlsp.runtime", "mlsp.images", "mlsp.store", "mlsp.backbone", "mlsp.extraction", "heads.train",
            "heads.score", "heads.report", "heads.personal"} <= packages


def test_the_ground_floor_never_imports_stage_2():
    offenders = []
    for module, path in library_modules():
        if not module.startswith("mlsp") or module == "mlsp.api":
            continue
        for target, names in imports(module, path):
            if target == "heads" or target.startswith("heads."):
                offenders.append(f"{module} imports {target}")
    assert offenders == [], "only mlsp.api may import heads"


def test_the_graph_is_seen():
    """The checker itself finds the imports it must (so an empty list above means something)."""
    graph = {module: {f"{target}.{n}" for target, names in imports(module, path) for n in names}
             | {target for target, _ in imports(module, path)} for module, path in library_modules()}
    assert "heads.score.scoring" in graph["mlsp.api"] and "heads.run" in graph["heads.score.scoring"]
    assert "mlsp.store.read" in graph["heads.evaluation"] and "mlsp.api" in graph["cli"]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, path in library_modules():
        for target, names in imports(module, path):
            if target == "__future__":
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            offenders += [f"{module}: from {target} import {n}" for n in private]
    assert offenders == []


def test_tests_take_helpers_from_helpers_not_conftest():
    """Fixtures live in conftest.py, plain helpers in tests/helpers.py: no test imports conftest."""
    tests = os.path.join(ROOT, "tests")
    offenders = [f"tests/{name}" for name in sorted(os.listdir(tests)) if name.endswith(".py")
                 for target, _ in imports(name[:-3], os.path.join(tests, name)) if target == "conftest"]
    assert offenders == []
    from mlsp.store import read as store, write as store_write

    assert not hasattr(store_write, "write_store") and not hasattr(store, "write_store")  # tests/helpers.py's


def test_keras_internals_are_read_in_one_module():
    """Only mlsp/backbone/graph.py names Keras' private graph attributes (tests/test_keras_graph.py
    checks them against the installed Keras)."""
    private = ("_inbound_nodes", "_outbound_nodes", "_keras_history")
    offenders = []
    for module, path in library_modules():
        with open(path) as handle:
            text = handle.read()
        offenders += [f"{module}: {name}" for name in private if name in text and module != "mlsp.backbone.graph"]
    assert offenders == []
    with open(os.path.join(ROOT, "mlsp", "backbone", "graph.py")) as handle:
        text = handle.read()
    assert all(name in text for name in private)  # the check reads the right files


#: A library function longer than this is split into named steps (the issue's "about 80 lines").
MAX_FUNCTION_LINES = 80


def long_functions(path, limit):
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_no_library_function_is_too_long_to_name_its_steps():
    offenders = [f"{module}.{name}: {n} lines" for module, path in library_modules()
                 for name, n in long_functions(path, MAX_FUNCTION_LINES)]
    assert offenders == [], f"split these into named steps (at most {MAX_FUNCTION_LINES} lines)"
    # the check sees functions: this module's own longest one is over a tenth of the limit
    assert long_functions(__file__, MAX_FUNCTION_LINES // 10)


def test_null_progress_counts_and_shows_nothing():
    bar = null_progress(total=3, desc="x", unit="img", leave=True)
    assert isinstance(bar, NullProgress)
    bar.update(2)
    bar.set_postfix(errors=1, refresh=False)
    bar.close()
    assert bar.n == 2


def test_resolve():
    assert resolve(False) is null_progress and resolve(None) is null_progress
    assert resolve(True) is console_progress
    assert resolve(null_progress) is null_progress
    with pytest.raises(TypeError):
        resolve("yes")


def test_log_progress_logs_every_few_percent_or_seconds_never_per_update(caplog):
    now = [0]  # in 10 ms ticks
    bar = LogProgress(total=1000, desc="extract", unit="img", percent=10, interval=30, min_interval=3,
                      clock=lambda: now[0] / 100, dynamic_ncols=True, leave=True)
    with caplog.at_level(logging.INFO, logger="mlsp.runtime.progress"):
        for _ in range(1000):  # 1000 updates, 10 ms apart: 10 s in all
            now[0] += 1
            bar.update(1)
        fast = len(caplog.records)
        for _ in range(10):  # slow updates: one a minute, each logged
            now[0] += 6000
            bar.update(0)
        bar.set_postfix(errors=2)
        bar.close()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert fast == 3, lines  # at 3 s, 6 s and 9 s: 10% had passed, but never sooner than 3 s apart
    assert len(lines) == fast + 10 + 1
    assert lines[0].startswith("extract: 300/1000 img (30%), 100 img/s, 00:03, 00:07 left")
    assert lines[-1].startswith("extract: 1000/1000 img (100%)") and lines[-1].endswith("errors=2")


def test_console_progress_logs_when_stderr_is_not_a_terminal(monkeypatch):
    class Pipe:
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", Pipe())
    assert isinstance(console_progress(total=5, desc="x", unit="img"), LogProgress)


def registered_in_source():
    """``package>name`` of every class or function the library decorates with
    ``keras.saving.register_keras_serializable(package=...)``."""
    found = []
    for module, path in library_modules():
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("register_keras_serializable"):
                    package = next(k.value.value for k in deco.keywords if k.arg == "package")
                    found.append(f"{package}>{node.name}")
    return found


#: Imported by no command that needs no model: the backends, and scipy (scipy.stats alone took
#: 1.3 s of every command's start before it was imported lazily).
HEAVY = ("tensorflow", "keras", "torch", "jax", "scipy")

HYGIENE = r"""
import json, os, sys
order, commands, heavy, names = sys.argv[1], *map(json.loads, sys.argv[2:5])
out = {}
if order == "keras-first":
    import keras
env, finders = dict(os.environ), len(sys.meta_path)
import mlsp, heads
out["env_changed"] = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
out["new_finders"] = [type(f).__name__ for f in sys.meta_path][: len(sys.meta_path) - finders]
if order == "keras-last":
    import cli
    for args in commands:
        try:
            cli.main(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    out["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
    import keras
if order != "no-hook":
    out["missing"] = [n for n in names if keras.saving.get_registered_object(n) is None]
print(json.dumps(out))
"""


def test_import_hygiene_and_every_custom_layer_registered(tmp_path):
    """One process per order of imports: `import mlsp, heads` changes no environment variable
    and adds no import finder but wrapt's post-import hook (none with MLSP_KERAS_HOOK=0); the
    commands that need no model (--help, inspect) import no backend and no scipy; and whether Keras
    is imported before or after, every custom layer (and loss) is registered."""
    from synthetic import write_synthetic_store

    names = registered_in_source()
    assert {"mlsp>MultiLevelPooling", "mlsp>ViewCrops", "mlsp_heads>BlockSplit"} <= set(names)
    store = str(tmp_path / "s.h5")
    write_synthetic_store(store, 20, n_views=2, block_channels=(4,))
    commands = [["--help"], ["inspect", store], ["inspect", "--json", store]]
    commands += [[name, "--help"] for name in ("extract", "train", "evaluate", "score", "export", "sample", "heads",
                                               "personalize", "report", "explain", "models")]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "MLSP_KERAS_HOOK")}
    env.update(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    runs = {}
    for order in ("keras-last", "keras-first", "no-hook"):
        res = subprocess.run([sys.executable, "-c", HYGIENE, order, json.dumps(commands), json.dumps(HEAVY),
                              json.dumps(names)], capture_output=True, text=True, timeout=300,
                             env={**env, "MLSP_KERAS_HOOK": "0"} if order == "no-hook" else env)
        assert res.returncode == 0, (order, res.stderr[-2000:])
        runs[order] = json.loads(res.stdout.strip().splitlines()[-1])
    for order, out in runs.items():
        assert out["env_changed"] == [], (order, "import mlsp changes the environment")
    assert runs["keras-last"]["new_finders"] == ["ImportHookFinder"], runs["keras-last"]
    assert runs["no-hook"]["new_finders"] == [], "MLSP_KERAS_HOOK=0: no finder at all"
    assert runs["keras-last"]["heavy"] == [], "commands that need no model import no backend and no scipy"
    assert runs["keras-last"]["missing"] == [] and runs["keras-first"]["missing"] == []


def test_cli_defaults_and_choices_come_from_their_owners():
    """`mlsp train --help` and `mlsp extract --help` show the dataclasses' (and the library's) values."""
    import dataclasses
    import inspect

    from click.testing import CliRunner

    import cli
    from heads.train.config import TrainConfig
    from mlsp.extraction.job import ExtractConfig, extract
    from mlsp.runtime.precision import CHOICES

    def flat(args):
        return " ".join(CliRunner().invoke(cli.main, args).output.split())

    def defaults(command, *args):
        """What the command's function receives when only ``args`` are given."""
        with command.make_context(command.name, list(args)) as context:
            return dict(context.params)

    train = defaults(cli.train_command, "--head", "single1fc")
    checked = []
    for field in dataclasses.fields(TrainConfig):
        if field.name in train and field.default is not dataclasses.MISSING:
            assert train[field.name] == field.default, field.name
            checked.append(field.name)
    assert {"lr", "min_lr", "lr_epochs", "patience", "batch_size", "steps_per_epoch", "seed",
            "workers"} <= set(checked)
    shown = flat(["train", "--help"])
    from heads.train.schedule import MAX_AUTO_LR, MIN_EPOCH_STEPS, PAPER, fmt_lr

    assert f"batch {PAPER.batch_size}, LR {fmt_lr(PAPER.lr)} divided by 10 every {PAPER.lr_epochs} epochs" in shown
    assert f"at least {MIN_EPOCH_STEPS} batches" in shown and f"(up to {fmt_lr(MAX_AUTO_LR)})" in shown
    for name in ("lr_epochs", "patience", "batch_size", "seed", "workers"):
        value = getattr(TrainConfig, name)
        assert f"[default: {value};" in shown or f"[default: {value}]" in shown, name

    ext = defaults(cli.extract, "photo.jpg")
    config = ExtractConfig()
    for name in ("net", "augment", "weights", "max_side", "precision"):
        assert ext[name] == getattr(config, name), name
    assert ext["wide"] == (config.pooling == "wide")
    assert tuple(next(p for p in cli.extract.params if p.name == "precision").type.choices) == CHOICES
    signature = inspect.signature(extract).parameters
    for option, parameter in (("val_fraction", "val_fraction"), ("seed", "seed"), ("workers", "workers"),
                              ("checkpoint_every", "flush_images")):
        assert ext[option] == signature[parameter].default, option
    shown = flat(["extract", "--help"])
    for value in (config.net, config.weights, config.max_side, config.precision, signature["val_fraction"].default):
        assert f"[default: {value}]" in shown, value
    for command in (cli.train_command, cli.score_command, cli.export_command):  # auto everywhere
        assert tuple(next(p for p in command.params if p.name == "precision").type.choices) == CHOICES
    from mlsp.images.readahead import DECODE_WORKERS

    assert defaults(cli.score_command, ROOT)["workers"] == DECODE_WORKERS == signature["workers"].default
