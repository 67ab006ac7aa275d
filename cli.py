"""The `mlsp` command line: a thin click layer over the library functions.

Library code logs and raises :class:`mlsp.errors.MLSPError`; this module owns the console:
it sets up logging, turns errors into one-line messages, and prints summaries.

Exit codes: 0 done; 1 an error with a one-line message (a bad or damaged file, a store of
another configuration, a full disk or read-only target, ...; README, Troubleshooting);
2 a usage error (an unknown option, a missing argument; click's own); 130 interrupted (Ctrl-C
or SIGTERM; finished work is kept).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from inspect import signature

import click

# TensorFlow's and oneDNN's C++ messages stay off the console unless -v (or the variable is set): 3
# hides their ERROR level too, where oneDNN on an AVX2 CPU says once per process that it leaves
# float16 ops to Eigen (mlsp.runtime.backend.prefer_onednn); what fails reaches mlsp as a Python exception.
TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mlsp.runtime.backend import prepare_process  # noqa: E402

prepare_process()  # before anything imports TensorFlow: oneDNN on AVX2, none of it next to PyTorch

from heads.columns import SUMMARY as SCORES_CSV  # noqa: E402
from heads.report import saliency  # noqa: E402
from heads.report import build as reporting  # noqa: E402
from heads.train.config import TrainConfig  # noqa: E402
from heads.finetune.config import FINETUNE_TARGETS, OPTIMIZERS, SGD_MOMENTUM, FinetuneConfig  # noqa: E402
from heads.finetune.nets import NETS as FINETUNE_NETS  # noqa: E402
from heads.score.keras2 import LAYER_NAMES as KERAS2_HEADS  # noqa: E402
from heads.personal import AUTO, RATING_SCALE, method_names  # noqa: E402
from heads.personal.adapt import FALLBACK_SE, NESTED_SE  # noqa: E402
from heads.personal.methods import FEATURE_SPACE, HEAD_SPACE, METHODS  # noqa: E402
from heads.personal.protocol import COLUMNS as EVAL_COLUMNS, KS as EVAL_KS, REPEATS as EVAL_REPEATS  # noqa: E402
from heads.personal.ratings import MIN_RATINGS  # noqa: E402
from heads.score.catalogue import CATALOGUE_ENV  # noqa: E402
from heads.registry import HEADS, options_help, parse_options  # noqa: E402
from heads.train.schedule import FULL_EPOCH_STEPS, MAX_AUTO_LR, MIN_EPOCH_STEPS, PAPER, fmt_lr  # noqa: E402
from heads.targets import TARGETS  # noqa: E402
from mlsp import api  # noqa: E402
from mlsp.backbone.nets import BACKBONES, FLOPS_SIZE, PAPER_BACKBONES  # noqa: E402
from mlsp.runtime import backend  # noqa: E402
from mlsp.runtime.backend import BACKENDS  # noqa: E402
from mlsp.errors import IdentityConflict, MLSPError, NoUsableImages, RunInterrupted  # noqa: E402
from mlsp.extraction import job as extraction  # noqa: E402
from mlsp.extraction.job import ExtractConfig  # noqa: E402
from mlsp.images.decode import CROP_FRACTION, VIEW_NAMES  # noqa: E402
from mlsp.backbone.native import DEFAULT_ENGINE, ENGINES  # noqa: E402
from mlsp.runtime.precision import CHOICES as PRECISION_CHOICES  # noqa: E402
from mlsp.runtime.progress import console_progress  # noqa: E402
from mlsp.store.format import WIDE_GRID, pooling_of  # noqa: E402

log = logging.getLogger("cli")


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def default_of(function, parameter):
    """The default of a library function's parameter, so that the CLI never repeats it."""
    return signature(function).parameters[parameter].default


EXTRACT_DEFAULTS = ExtractConfig()


def handle_errors(func):
    """Run a command, turning MLSP errors, and any OSError the library did not name (a full disk,
    a read-only folder), into one line and exit code 1. A closed output pipe (``mlsp inspect S |
    head``) is left to click, which exits quietly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MLSPError as exc:
            raise click.ClickException(str(exc)) from exc
        except BrokenPipeError:
            raise
        except OSError as exc:
            from mlsp.runtime.atomic import describe_os_error

            where = exc.filename or "a file"
            raise click.ClickException(f"{where}: {describe_os_error(exc)}") from exc

    return wrapper


def _check_head(ctx, param, value):
    """--head names a registered head; a misspelt one is a usage error (exit 2), as for --net."""
    if value is not None and value not in HEADS:
        raise click.BadParameter(f"unknown head {value!r}; registered heads: {', '.join(HEADS)}")
    return value


def _select_backend(ctx, param, value):
    """--backend sets KERAS_BACKEND before anything imports Keras (an eager option)."""
    if value:
        from mlsp.runtime.backend import select

        try:
            select(value)
        except MLSPError as exc:
            raise click.BadParameter(str(exc)) from exc
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: info from every module, -vv: debug).")
@click.option("--backend", type=click.Choice(BACKENDS), is_eager=True, expose_value=False, callback=_select_backend,
              help="Keras backend for this command (sets KERAS_BACKEND). Default: $KERAS_BACKEND, else "
                   "~/.keras/keras.json, else tensorflow. torch runs without TensorFlow in the process; "
                   "features agree to float32 rounding, so a store may be extended from either (README).")
@click.version_option(package_name="mlsp")
def main(verbose):
    """mlsp: aesthetic quality (MOS 1-10) of photographs with MLSP features.

    \b
    The two stages:
      mlsp extract --images DIR --net irv2 --wide   once per dataset: images -> feature store
      mlsp train --head pool3fc                     many times: feature store -> trained head
    Then `mlsp evaluate`, `mlsp score`, `mlsp inspect`. `mlsp sample` builds a small dataset
    from photographs shipped with scikit-image, to try everything end to end. `mlsp models`
    lists the pretrained models the MLSP authors released.

    Exit codes: 0 done, 1 an error (one line; README, Troubleshooting), 2 a usage error,
    130 interrupted (finished work is kept).
    """
    if verbose and not TF_LOG_LEVEL_GIVEN:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # read when TensorFlow is first imported, after this
    elif not verbose:
        backend.quiet_tensorflow_start()
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter(verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("mlsp", "heads", "cli"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    # log lines and progress bars share stderr: print logs above the bars
    from tqdm.contrib.logging import logging_redirect_tqdm

    ctx = click.get_current_context()
    ctx.with_resource(logging_redirect_tqdm(loggers=[root]))


class _ConsoleFormatter(logging.Formatter):
    """Plain messages for info; the level in front of warnings and errors; module names with -v."""

    def __init__(self, verbose):
        super().__init__()
        self.verbose = verbose

    def format(self, record):
        message = record.getMessage()
        if record.exc_info and self.verbose:
            message += "\n" + self.formatException(record.exc_info)
        prefix = f"{record.name}: " if self.verbose else ""
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {prefix}{message}"
        return prefix + message


def echo_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


def _sigterm_as_interrupt():
    """Treat `kill` (SIGTERM) like Ctrl-C, so partial results are flushed before exiting."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _interrupted(message: str):
    """End an interrupted command at once with exit code 130, after saying what was kept.

    A decoding thread may still be stuck in a read that never returns (a stalled network
    share); Python would wait for it at exit, so the process then ends without that wait (what
    matters is on disk already: the library completed its files before raising)."""
    import threading

    click.echo(f"\ninterrupted: {message}", err=True)
    stuck = [t for t in threading.enumerate() if t.name.startswith("mlsp-decode") and t.is_alive()]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


_WORKERS_HELP = ("Threads decoding images ahead of the model (0: decode in the main thread); with --ray, each "
                 "Ray worker's.")


def engine_option(func):
    """--engine, shared by extract and score."""
    return click.option("--engine", type=click.Choice(ENGINES), default=DEFAULT_ENGINE, show_default=True,
                        help="What runs the backbone: keras (the Keras model on its backend), native (mlsp's own "
                             "PyTorch forward of the same model and weights: channels-last, views of mixed sizes "
                             "in one call on a GPU; needs --backend torch, runs on CPU too), auto (native with "
                             "--backend torch on a CUDA device, keras otherwise). Features agree to float32 "
                             "rounding; the engine is recorded in the store (docs/extraction.md).")(func)


def ray_options(func):
    """--ray and the workers' resources, shared by extract and score."""
    func = click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0),
                        help="GPUs each Ray worker reserves. Default: 1 where the cluster has GPUs "
                             "(one worker per GPU), else 0.")(func)
    func = click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
                        help="CPUs each Ray worker reserves (and TensorFlow's threads on a CPU worker). "
                             "Default: local:N, the cores / N; with GPUs, a machine's CPUs per GPU; "
                             "else all CPUs of a machine (one worker per machine).")(func)
    return click.option("--ray", "ray_address", metavar="ADDRESS",
                        help="Spread the images over a Ray cluster (needs the extra: "
                             'pip install -e ".[ray]"; README, Many machines). ADDRESS: auto (the cluster '
                             "`ray start` made on this machine, or RAY_ADDRESS), ray://HOST:PORT, HOST:PORT, "
                             "or local:N (Ray on this machine with N workers). Image paths must be readable "
                             "by every worker.")(func)


def shown(name: str) -> str:
    """A file name for the console: one that is not UTF-8 (Python's surrogate escapes) with its
    odd bytes written as ``\\xff``, as ``ls -b`` would, rather than failing to print."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _echo_errors(errors, limit=10):
    if not errors:
        return
    click.echo(f"{len(errors)} inputs could not be used:", err=True)
    for e in errors[:limit]:
        click.echo(f"  {shown(e['path'])}: {e['reason']}", err=True)
    if len(errors) > limit:
        click.echo(f"  ... and {len(errors) - limit} more (all of them: mlsp inspect --errors STORE)", err=True)


@main.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="Folder of images, searched recursively: JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF and AVIF "
                   "(any case); other files, links to folders already searched and anything that is "
                   "not a regular file are listed, not read.")
@click.option("--net", type=click.Choice(sorted(BACKBONES)), default=EXTRACT_DEFAULTS.net, show_default=True,
              help="Backbone (`mlsp backbones` describes each). The paper's: irv2 = InceptionResNet-v2 "
                   "(43 blocks, 16,928 channels) and iv3 = Inception-v3 (11 blocks, 10,048 channels).")
@click.option("--wide/--narrow", default=pooling_of(EXTRACT_DEFAULTS.pooling).wide, show_default=True,
              help=f"Wide: each block pooled to {WIDE_GRID}x{WIDE_GRID} (area interpolation), for pool3fc. "
                   "Narrow: global average per block (1x1), for the single/multi heads.")
@click.option("--augment/--no-augment", default=EXTRACT_DEFAULTS.augment, show_default=True,
              help=f"Store {len(VIEW_NAMES)} views (4 corner crops of {CROP_FRACTION:.1%} and their mirror images) "
                   "or 1 (the whole image).")
@click.option("--weights", default=EXTRACT_DEFAULTS.weights, show_default=True,
              help="'imagenet' (Keras' download and cache in ~/.keras/models), a path to a Keras "
                   "weights file (e.g. the notop .h5 copied by hand), or 'random[:SEED]' "
                   "(seeded random backbone: for tests and benchmarks, meaningless for aesthetics).")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True),
              help="AVA.txt (vote counts) or a CSV with an image id column and a MOS column "
                   "(optionally 10 vote-count columns). Images without labels are still extracted.")
@click.option("--test-list", type=click.Path(dir_okay=False, exists=True),
              help="Ids of the test split, one per line (AVA: generic_test.jpgl).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True),
              default=default_of(extraction.extract, "test_fraction"), show_default=True,
              help="Without --test-list: share of labelled images drawn for the test split, each by a hash of "
                   "its id and --seed, so an image keeps its split when images are added (with a handful of "
                   "images, at least one). 0: no test split. Recorded in the store.")
@click.option("--val-fraction", type=float, default=default_of(extraction.extract, "val_fraction"), show_default=True,
              help="Share of labelled non-test images drawn at random for validation.")
@click.option("--seed", type=int, default=default_of(extraction.extract, "seed"), show_default=True,
              help="Seed of the random test and train/val splits.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Store file. Default: features/<dataset>/<net>_<narrow|wide>[_noaug][_<precision>].h5, "
                   f"the precision named unless it is {EXTRACT_DEFAULTS.precision}.")
@click.option("--dataset", help="Dataset name for the default --out. Default: the images folder's name.")
@click.option("--max-side", type=int, default=EXTRACT_DEFAULTS.max_side, show_default=True,
              help="Images with a longer side are resized down to it (INTER_AREA) before cropping, "
                   "which bounds memory on large photos (a JPEG at least twice as large is decoded "
                   "at 1/2, 1/4 or 1/8 of its size first); AVA (max 800 px) is untouched. 0: never.")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=EXTRACT_DEFAULTS.precision,
              show_default=True,
              help="Compute precision of the backbone; pooling runs in float32 and storage is float16 "
                   "anyway. float32 keeps features comparable with the paper's; bfloat16 is about 2x "
                   "faster on CPUs with AVX-512 BF16/AMX and on recent GPUs, with features within a "
                   "few percent (README). auto: bfloat16 where the hardware has it, else float32. "
                   "Part of the store's configuration: a store is never extended at another precision.")
@click.option("--workers", type=int, default=default_of(extraction.extract, "workers"), show_default=True,
              help=_WORKERS_HELP)
@click.option("--threads", type=(int, int), default=(0, 0), show_default=True, metavar="INTRA INTER",
              help="The backend's CPU threads inside one op and ops side by side; 0 keeps the "
                   "backend's default (the number of cores for both), the fastest setting measured (README).")
@click.option("--batch-views", type=click.IntRange(min=0),
              help="Views per model call: the views of several images of the same size are run together "
                   "up to this many (a GPU is underfed by one photo's 8 views). The store is the same. "
                   "Default: 64 on a GPU, one image per call on a CPU.")
@click.option("--batch-window", type=click.IntRange(min=1), default=default_of(extraction.extract, "batch_window"),
              show_default=True,
              help="With --batch-views: decoded images held at most while waiting for images of the same size.")
@click.option("--checkpoint-every", type=int, default=default_of(api.extract, "checkpoint_every"), show_default=True,
              help=f"Write finished images to disk every N images (and at least every "
                   f"{default_of(extraction.extract, 'flush_seconds'):g} s); an "
                   "interruption loses at most the images since the last write.")
@engine_option
@ray_options
@handle_errors
def extract(files, images_dir, net, wide, augment, weights, labels, test_list, test_fraction, val_fraction, seed, out,
            dataset, max_side, precision, workers, threads, batch_views, batch_window,
            checkpoint_every, engine, ray_address, ray_cpus_per_worker,
            ray_gpus_per_worker):
    """Extract MLSP features of images into a feature store (stage 1, once per dataset).

    Give a folder with --images, or image files as arguments. Interrupted runs (Ctrl-C, kill,
    power loss) keep what was finished: run the same command again to resume. Files that cannot
    be used (broken, empty, too small, not images) are listed in the store and the summary.
    """
    if bool(files) == bool(images_dir):
        raise click.UsageError("give either --images DIR or image files, not both and not neither")
    if test_list and click.get_current_context().get_parameter_source("test_fraction").name == "COMMANDLINE":
        raise click.UsageError("give --test-list or --test-fraction, not both")
    _sigterm_as_interrupt()
    try:
        result = api.extract(images_dir or list(files), out, net=net, wide=wide, augment=augment, weights=weights,
                             labels=labels, test_list=test_list, max_side=max_side, precision=precision,
                             threads=threads, progress=console_progress, val_fraction=val_fraction,
                             test_fraction=test_fraction, seed=seed,
                             dataset=dataset, workers=workers, checkpoint_every=max(1, checkpoint_every),
                             batch_views=batch_views, batch_window=batch_window, ray=ray_address, engine=engine,
                             ray_cpus_per_worker=ray_cpus_per_worker, ray_gpus_per_worker=ray_gpus_per_worker)
    except KeyboardInterrupt:
        _interrupted("finished images are kept; run the same command again to resume.")
    except NoUsableImages as exc:
        _echo_errors(exc.errors)
        raise
    except IdentityConflict as exc:  # the other images are extracted: say so, list the conflicts, exit 1
        if exc.result is not None:
            _extract_summary(exc.result)
            click.echo(f"{len(exc.conflicts)} files not extracted (a store never replaces an image):", err=True)
            for path, key, was, now in exc.conflicts[:10]:
                click.echo(f"  {shown(path)}: {IdentityConflict.reason(exc.store, key, was, now)}", err=True)
            if len(exc.conflicts) > 10:
                click.echo(f"  ... and {len(exc.conflicts) - 10} more", err=True)
        raise
    _extract_summary(result)


def _extract_summary(result):
    """What an extraction did: the inputs it could not use, the store's rows and splits."""
    _echo_errors(result.errors)
    rep = result.labels_report
    splits = ", ".join(f"{k} {v}" for k, v in rep.get("counts", {}).items())
    click.echo(f"{result.store}: {result.images} images ({result.new} new, {result.skipped_existing} already "
               f"there), {len(result.errors)} unusable, {result.seconds:.1f} s")
    if splits:
        click.echo(f"splits: {splits}")
    if rep.get("labels_without_images"):
        click.echo(f"{rep['labels_without_images']} labelled ids have no image")


@main.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def info_command(as_json):
    """What mlsp runs on here: Keras backend, devices, what --precision auto would choose and why,
    and where ImageNet weights are cached."""
    from mlsp import api

    found = api.info()
    if as_json:
        echo_json(found)
        return
    click.echo(f"backend: {found['backend']} {found['backend_version']} (Keras {found['keras']}); "
               "choose with --backend or KERAS_BACKEND")
    click.echo(f"devices: {', '.join(found['devices'])}")
    click.echo(f"precision auto: {found['precision_auto']} ({found['precision_auto_why']})")
    cached = ", ".join(f"{net} {'cached' if ok else 'not downloaded yet'}" for net, ok in found["weights_cached"].items())
    click.echo(f"ImageNet weights: {found['weights_cache']} ({cached})")


@main.command()
@click.argument("store_path", metavar="STORE.h5", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--errors", "show_errors", is_flag=True, help="List every input that could not be used.")
@click.option("--quick", is_flag=True, help="Skip reading every feature value to check it (one read of the "
              "whole store); labels and the file's structure are checked anyway.")
@handle_errors
def inspect(store_path, as_json, show_errors, quick):
    """Show what a feature store holds: configuration, sizes, labels, splits, errors.

    Also checks the store: labels (MOS in 1..10), dataset lengths and the HDF5 structure, and,
    unless --quick, every feature value (finite; one read of the whole store). A damaged store
    ends with a one-line error naming the image and exit code 1."""
    info = api.inspect(store_path, check_features=not quick, progress=False if as_json else console_progress)
    if as_json:
        echo_json(info)
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            click.echo(f"{key:<{width}}  {value}")
    if show_errors:
        for e in api.unusable_inputs(store_path):
            click.echo(f"{shown(e['path'])}\t{e['reason']}")
    if info.get("features_check", "ok") != "ok":
        raise click.ClickException(info["features_check"])


@main.command()
@click.option("--dir", "root", default=default_of(api.sample, "root"), show_default=True,
              type=click.Path(file_okay=False), help="Where the sample images, AVA.txt and test list are written.")
@click.option("--images", "n_images", type=int, default=default_of(api.sample, "n_images"), show_default=True,
              help="How many images to make.")
@click.option("--net", type=click.Choice(sorted(BACKBONES)), default=default_of(api.sample, "net"), show_default=True,
              help="Backbone for the sample's features.")
@click.option("--wide/--narrow", default=default_of(api.sample, "wide"), show_default=True,
              help="Pooling of the sample's features.")
@click.option("--weights", default=default_of(api.sample, "weights"), show_default=True,
              help="auto: ImageNet weights when Keras can load them, else a random backbone, said "
                   "plainly; or imagenet, random[:SEED], or a weights file as for `mlsp extract`.")
@click.option("--out", type=click.Path(dir_okay=False), help="Store file. Default: features/sample/<net>_<pooling>.h5")
@click.option("--head", default=default_of(api.sample, "head"), show_default=True, callback=_check_head,
              help="Head trained on the sample's store (`mlsp heads`); pool3fc needs --wide.")
@click.option("--train/--no-train", "do_train", default=default_of(api.sample, "train_head"), show_default=True,
              help="Also train and evaluate the head on the sample's store.")
@click.option("--seed", type=int, default=default_of(api.sample, "seed"), show_default=True,
              help="Seed of the images, votes, split and training.")
@click.option("--users", "n_users", type=click.IntRange(min=0), default=default_of(api.sample, "users"),
              show_default=True,
              help="Also write ratings.csv: N synthetic raters (scores 1..5) with planted personal taste (a few "
                   "shared directions in the feature space, each rater's own mix, noise; the last rater is pure "
                   "noise), and test_users.txt, for `mlsp personalize` (docs/personal.md).")
@handle_errors
def sample(root, n_images, net, wide, weights, out, head, do_train, seed, n_users):
    """Build the sample dataset and run the pipeline on it, end to end.

    The images are crops of public-domain photographs that ship with scikit-image, degraded
    in controlled ways (blur, noise, JPEG, contrast) and rated by synthetic voters, written as
    an AVA.txt with a test list, in every format the extractor reads. They are extracted into a
    store exactly as AVA would be; then a head is trained and evaluated on it, with the same
    defaults as `mlsp train` (which adapt the schedule to the store's size).
    """
    _sigterm_as_interrupt()
    try:
        made = api.sample(root, n_images=n_images, net=net, wide=wide, weights=weights, out=out, head=head,
                          train_head=do_train, seed=seed, users=n_users, progress=console_progress)
    except KeyboardInterrupt:
        _interrupted("finished images are kept; run the same command again to resume.")
    info, result = made.info, made.extraction
    click.echo(f"sample: {info.n_images} images in {info.images_dir}, votes in {info.labels_path}")
    _echo_errors(result.errors)
    splits = ", ".join(f"{k} {v}" for k, v in result.labels_report.get("counts", {}).items())
    click.echo(f"store: {result.store}: {result.images} images ({splits})")
    if made.ratings:
        click.echo(f"ratings: {made.ratings} ({n_users} synthetic raters), test raters: {made.test_users}")
    if made.training is None:
        return
    _echo_metrics(made.training.metrics)
    click.echo(f"run: {made.training.run_dir} (plots: predictions.png, loss.png)")
    if made.weights.startswith("random"):
        click.echo("note: features of a RANDOM backbone; these figures say nothing about aesthetics.")


_MEMORY_HELP = ("Features up to this size (e.g. 8GB) are loaded into memory, larger ones are read "
                "from the store batch by batch. Default: half the memory available to the process "
                "(RAM, cgroup limit, ulimit -v). 0 always streams.")


_TRAIN_HELP = f"""Train a head on a feature store; evaluate it on val and test.

    Stage 2 reads only the store. The schedule is the paper's: MSE, Adam, batch {PAPER.batch_size}, LR
    {fmt_lr(PAPER.lr)} divided by {1 / PAPER.lr_factor:g} every {PAPER.lr_epochs} epochs or after {PAPER.patience} epochs without
    validation improvement, down to {fmt_lr(PAPER.min_lr)}, reloading the best weights at each change; the
    best weights on validation loss are the result. Each epoch draws one random stored view per
    image; validation and test use the mean prediction over all stored views.

    With --target distribution the head predicts each image's histogram of votes (EMD loss,
    validation EMD for the schedule); its MOS is the histogram's mean, so the MOS metrics stay
    comparable, and metrics.json adds EMD (r = 1, 2) and the correlation of the predicted
    opinion std with the true one. Images without votes are left out.

    \b
    The paper's values are sized for AVA (1,749 batches per epoch); on a smaller store the
    defaults adapt: an epoch is at least {MIN_EPOCH_STEPS} batches and the LR grows as epochs get
    shorter (up to {fmt_lr(MAX_AUTO_LR)}). One log line says what was chosen and why; config.json
    records it; every flag overrides its value.

    The run folder gets model.keras, config.json, history.csv, metrics.json, predictions.csv
    and plots (predictions.png, loss.png).
    """


HEAD_OPTION_ALIASES = ("width", "kernels")  # --width N is --head-option width=N (older spellings)


def head_option_flags(func):
    """``--head-option KEY=VALUE`` (repeatable; each head declares its own in the registry) and
    its aliases, which the command receives as ``alias_<key>``."""
    for key in reversed(HEAD_OPTION_ALIASES):
        func = click.option(f"--{key}", f"alias_{key}", type=click.IntRange(min=1), metavar="N",
                            help=f"Short for --head-option {key}=N.")(func)
    return click.option("--head-option", multiple=True, metavar="KEY=VALUE",
                        help=f"An option of the head, repeatable: {options_help()}. Defaults follow the "
                             "features' width (`mlsp heads --net NAME` shows them per backbone).")(func)


def _head_options(pairs, aliases) -> dict:
    given = [f"{key[len('alias_'):]}={value}" for key, value in aliases.items() if value is not None]
    return parse_options([*pairs, *given])


@main.command("train", help=_TRAIN_HELP)
@click.option("--store", "store_path", type=click.Path(dir_okay=False),
              help="Feature store (.h5). Default: the newest store under features/.")
@click.option("--head", required=True, callback=_check_head,
              help=f"The head: {', '.join(HEADS)} (`mlsp heads` describes each).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Run folder. Default: runs/<store>-<head>-<timestamp>.")
@click.option("--target", type=click.Choice(list(TARGETS)), default=TrainConfig.target, show_default=True,
              help="What the head predicts: mos (the paper's: MSE on the MOS) or distribution (a softmax over "
                   "the scores 1..10 trained with the EMD, r = 2, on each image's vote histogram; needs labels "
                   "with vote counts; adds the predicted opinion std, p1..p10 and EMD metrics).")
@click.option("--epochs", type=click.IntRange(min=1),
              help="At most this many epochs. Default: until the LR schedule ends "
                   "(--lr-epochs per LR stage, three stages).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Initial learning rate (Adam). Default: chosen from the store's size: the paper's "
                   f"{PAPER.lr:g} when an epoch has at least {FULL_EPOCH_STEPS:,} steps (AVA: 1,749), "
                   f"else {PAPER.lr:g} x {FULL_EPOCH_STEPS:,}/steps per epoch (at most 10x).")
@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True),
              help="Last learning rate; the LR is divided by 10 down to it. Default: LR/100 "
                   f"(the paper's {PAPER.lr:g} -> {PAPER.min_lr:g}).")
@click.option("--lr-epochs", type=click.IntRange(min=1), default=TrainConfig.lr_epochs, show_default=True,
              help="Epochs at one LR before it is divided by 10.")
@click.option("--patience", type=click.IntRange(min=1), default=TrainConfig.patience, show_default=True,
              help="Epochs without validation improvement before the LR is divided by 10 (or, at the "
                   "last LR, training stops).")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, show_default=True,
              help="Images per training batch.")
@click.option("--steps-per-epoch", type=click.IntRange(min=0),
              help="Batches per epoch. Default: one pass over the training images (the paper's epoch), "
                   f"but at least {MIN_EPOCH_STEPS}: a shorter pass is repeated, each time with new random "
                   "views. 0: one pass, however short.")
@click.option("--seed", type=click.IntRange(min=0), default=TrainConfig.seed, show_default=True,
              help="Seed of weights, dropout, shuffling and view draws: the same seed gives the same model.")
@head_option_flags
@click.option("--memory-budget", help=_MEMORY_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=TrainConfig.workers, show_default=True,
              help="Threads reading batches ahead.")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=TrainConfig.precision, show_default=True,
              help="Compute precision of the head while training (Keras mixed precision: float32 weights, "
                   "bfloat16/float16 arithmetic); the saved model and predictions are float32. auto: "
                   "bfloat16 where the hardware has it (`mlsp info`). Measured effect: README.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar per epoch.")
@handle_errors
def train_command(store_path, head, out, target, epochs, lr, min_lr, lr_epochs, patience, batch_size,
                  steps_per_epoch, seed, head_option, memory_budget, workers, precision,
                  progress, **aliases):
    """Train a head on a feature store; evaluate it on val and test (help: _TRAIN_HELP)."""
    _sigterm_as_interrupt()
    try:
        result = api.train(store_path, head=head, out=out, head_options=_head_options(head_option, aliases),
                           memory_budget=memory_budget,
                           progress=console_progress if progress else False, target=target, epochs=epochs, lr=lr,
                           min_lr=min_lr, lr_epochs=lr_epochs, patience=patience, batch_size=batch_size,
                           steps_per_epoch=steps_per_epoch, seed=seed, workers=workers, precision=precision)
    except RunInterrupted as stopped:
        _interrupted(f"{stopped.run_dir}: {stopped.kept}.")
    except KeyboardInterrupt:  # before the run folder was made
        _interrupted("training stopped before it started: nothing was written.")
    _echo_metrics(result.metrics)
    click.echo(f"run: {result.run_dir}")
    if result.config["status"] == "interrupted":
        click.echo(f"interrupted: {result.run_dir} keeps the best weights so far (epoch "
                   f"{result.config['best_epoch']}); `mlsp score` and `mlsp export` use it with --allow-unfinished",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)


def _echo_metrics(metrics):
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = ("srcc", "plcc", "accuracy", "balanced_accuracy", "n")
    keys += tuple(k for k in ("emd1", "emd2", "std_srcc", "std_plcc") if any(k in m for m in metrics.values()))
    click.echo(f"{'':6}" + "".join(f"{k:>19}" for k in keys))
    for split, m in metrics.items():
        click.echo(f"{split:6}" + "".join(f"{fmt(m.get(k)):>19}" for k in keys))


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--store", "store_path", type=click.Path(exists=True, dir_okay=False),
              help="Evaluate on this store (same backbone, pooling and blocks). Default: the run's own.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where metrics.json, predictions.csv and predictions.png go. Default: the run folder "
                   "for its own store, RUN_DIR/eval-<store>-<fingerprint> for another.")
@click.option("--memory-budget", help=_MEMORY_HELP)
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="A fine-tuned run (mlsp finetune): evaluate on the images of this folder. Default: its own.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@handle_errors
def evaluate_command(run_dir, store_path, out, memory_budget, images_dir, as_json):
    """Recompute a run's metrics (SRCC, PLCC, accuracy at MOS 5, balanced accuracy) on val and test."""
    metrics = api.evaluate(run_dir, store_path, out=out, memory_budget=memory_budget, images=images_dir)
    if as_json:
        echo_json(metrics)
    else:
        _echo_metrics(metrics)


@main.command("backbones")
@click.argument("names", nargs=-1, type=click.Choice(sorted(BACKBONES)))
@click.option("--flops-at", type=(int, int), default=FLOPS_SIZE, show_default=True, metavar="HEIGHT WIDTH",
              help="Image size at which to count each forward pass's FLOPs (every net is built once, "
                   "with random weights: about a minute for all).")
@click.option("--no-flops", is_flag=True, help="Do not build the nets; list without FLOPs.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def backbones_command(names, flops_at, no_flops, as_json):
    """List the registered backbones (all, or NAMES): blocks tapped, channels in all, the least
    input side, GFLOPs of one forward pass up to the last tap, and the ImageNet weights file
    `--weights imagenet` loads (Keras' download and cache in ~/.keras/models)."""
    rows = api.backbones(list(names) or None, flops_at=None if no_flops else tuple(flops_at))
    if as_json:
        echo_json(rows)
        return
    flops_head = f"GFLOP {flops_at[1]}x{flops_at[0]}"
    click.echo(f"{'net':<18}{'blocks':>6}{'channels':>9}{'min side':>9}{flops_head:>16}  weights file")
    for row in rows:
        gflops = f"{row['gflops']:.1f}" if "gflops" in row else "-"
        paper = "  (the paper's)" if row["paper"] else ""
        click.echo(f"{row['name']:<18}{row['blocks']:>6}{row['channels']:>9,}{row['min_side']:>9}{gflops:>16}  "
                   f"{row['weights_file']}{paper}")
    click.echo("Taps: every block's output; `mlsp backbones --json` says why for each net. FLOPs: "
               "convolutions and dense layers, 2 per multiply-add, at one view of WIDTHxHEIGHT.")


@main.command("heads")
@click.option("--net", "nets", multiple=True, type=click.Choice(sorted(BACKBONES)),
              help="Show the parameter counts on this backbone's features (repeatable). "
                   f"Default: the paper's, {' and '.join(PAPER_BACKBONES)}.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def heads_command(nets, as_json):
    """List the registered heads with their default options and parameter counts on each
    backbone's features (the defaults follow the feature width; see `mlsp train --width`)."""
    nets = list(nets or PAPER_BACKBONES)
    rows = api.heads(nets)
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'head':<11}{'features':<9}" + "".join(f"{'params ' + n:>{max(16, len(n) + 9)}}" for n in nets)
               + "  description")
    for row in rows:
        features = row["features"].split(" ")[0]  # "narrow (or wide: grid mean)" -> narrow
        params = "".join(f"{row['params'][n]:>{max(16, len(n) + 9)},}" for n in nets)
        click.echo(f"{row['name']:<11}{features:<9}{params}  {row['description']}")
        for n in nets:
            if row["options"][n]:
                options = ", ".join(f"{k}={v}" for k, v in row["options"][n].items())
                click.echo(f"{'':<20}defaults on {n}: {options}")
    click.echo("Narrow heads also train on a wide store: each view's 5x5 grid is averaged, which equals the "
               "narrow feature.")


@main.command("models")
@click.argument("names", nargs=-1)
@click.option("--catalogue", "catalogues", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help=f"A catalogue file of your own (.json or .toml, the same fields as the built-in entries) "
                   f"whose models are added: a mirror, your team's heads (repeatable; ${CATALOGUE_ENV} names "
                   f"such files too, joined with '{os.pathsep}'; docs/pretrained.md).")
@click.option("--fetch", is_flag=True,
              help="Download the NAMES given into the cache now (size and sha256 checked, mirrors tried in "
                   "order, a broken download resumed), e.g. before going offline.")
@click.option("--check", "check", is_flag=True,
              help="Check this install: score the photo of each model that has a published prediction (or of "
                   "NAMES) as `mlsp score --model` does and compare with the published score; exit 1 when a "
                   "difference exceeds the entry's tolerance (docs/pretrained.md).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def models_command(names, catalogues, fetch, check, as_json):
    """List the pretrained predictors (all, or NAMES): a backbone, its pooling and a head the
    MLSP authors trained on AVA, ready to score photos. One line each: backbone, pooling, head,
    views at test time, file size, whether the file is on this machine (yes: its sha256 checked,
    bad: another file is there), the paper's AVA test figures for its configuration, sha256 and
    where it comes from.

    Files are fetched once into $KERAS_HOME/mlsp/models (default ~/.keras/mlsp/models) and used
    only while their sha256 is the catalogue's."""
    if fetch and check:
        raise click.UsageError("--check fetches what it needs itself; give --fetch or --check")
    if check:
        _check_models(names, catalogues, as_json)
        return
    if fetch:
        if not names:
            raise click.UsageError("--fetch downloads the models named: give NAMES (`mlsp models` lists them)")
        _sigterm_as_interrupt()
        try:
            for name in names:
                click.echo(f"{name}: {api.fetch_model(name, catalogues=catalogues, progress=console_progress)}")
        except KeyboardInterrupt as exc:
            _interrupted(f"{getattr(exc, 'kept', 'nothing was downloaded yet')}.")
        return
    rows = api.models(list(names) or None, catalogues=catalogues)
    if as_json:
        echo_json(rows)
        return
    _echo_models(rows)


def _here(row) -> str:
    """The 'here' column: the pinned file is in the cache (yes), is not (no), or another is (bad)."""
    return "yes" if row["cached"] else "bad" if row["cache_problem"] else "no"


def _check_models(names, catalogues, as_json):
    """`mlsp models --check`: a line per model; the ones out of tolerance end in one error line."""
    _sigterm_as_interrupt()
    try:
        results = api.check_models(list(names) or None, catalogues=catalogues, progress=console_progress)
    except KeyboardInterrupt as exc:
        kept = getattr(exc, "kept", None)  # while a file downloaded: what that kept
        _interrupted(f"{kept}." if kept else "the files downloaded so far are kept; run the same command again.")
    if as_json:
        echo_json([result.as_dict() for result in results])
    else:
        for result in results:
            if result.passed:
                click.echo(result.summary())
    failed = [r.summary() for r in results if not r.passed]
    if failed:
        raise click.ClickException(" | ".join(failed))


def _echo_models(rows):
    def paper(figures):
        shown = [f"{k.upper()} {figures[k]:.3f}" for k in ("srcc", "plcc") if k in figures]
        if "accuracy" in figures:
            shown.append(f"acc {figures['accuracy']:.2%}")
        return " ".join(shown) or "-"

    width = max(len(r["name"]) for r in rows) + 2 if rows else 10
    click.echo(f"{'name':<{width}}{'net':<7}{'pooling':<8}{'head':<11}{'views':<12}{'bytes':>12}  {'here':<5}"
               f"{'paper (AVA test)':<34}{'sha256':<66}source")
    for r in rows:
        views = f"{r['views_count']} {r['views']}"
        click.echo(f"{r['name']:<{width}}{r['net']:<7}{r['pooling']:<8}{r['head']:<11}{views:<12}{r['size']:>12,}  "
                   f"{_here(r):<5}{paper(r['paper']):<34}{r['sha256']:<66}{r['source']}")
    for r in rows:
        if r["cache_problem"]:
            click.echo(f"{r['name']}: bad file in the cache: {r['cache_problem']} (`mlsp models --fetch "
                       f"{r['name']}` moves it aside and downloads it again)")
    backbones = {(r["net"], r["backbone_weights_file"]): r["backbone_weights_cached"] for r in rows
                 if r["backbone_weights_cached"] is not None}
    for (net, file), here in backbones.items():
        click.echo(f"backbone {net}: ImageNet weights {file} "
                   f"{'on this machine' if here else 'not on this machine yet (Keras downloads them on first use)'}")
    if rows:
        click.echo(f"Files: {os.path.dirname(os.path.dirname(rows[0]['path']))}/<name>/ (`--fetch NAMES` downloads "
                   "them now); `--json` lists the URLs. More models: --catalogue FILE or "
                   f"${CATALOGUE_ENV} (docs/pretrained.md).")
    checked = [r["name"] for r in rows if r.get("check")]
    if checked:
        click.echo(f"A published prediction to check this install against (`mlsp models --check`): {', '.join(checked)}")


_UNFINISHED_HELP = ("Also use a run whose training did not finish: interrupted (Ctrl-C, kill) or diverged; "
                    "its model holds the best weights on validation loss up to then.")


_MODEL_HELP = ("A released model in place of RUN_DIR: a name of the catalogue (`mlsp models`; its file is "
               "fetched and checked once) or the path of that file downloaded by hand (recognised by its "
               "sha256). Scored with the model's own test-time views (docs/pretrained-scoring.md).")


def _run_or_model(run_dir, model, files=()):
    """RUN_DIR or --model (then a first argument is an image file): ``(run_dir, files)``."""
    if model and run_dir:
        return None, (run_dir, *files)
    if not model and not run_dir:
        raise click.UsageError("give a run folder (RUN_DIR) or --model NAME|PATH")
    if run_dir and not os.path.isdir(run_dir):
        raise click.UsageError(f"RUN_DIR {run_dir!r} is not a folder (for a released model: --model NAME|PATH)")
    return run_dir, files


@main.command("score")
@click.argument("run_dir", required=False)
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--model", help=_MODEL_HELP)
@click.option("--store", "store_path", type=click.Path(exists=True, dir_okay=False),
              help="Score every image of this store (same net, pooling and channel layout as the run's; for "
                   "--model, also the model's views).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="Score the images in this folder (recursively), running the run's backbone on them.")
@click.option("--out", type=click.Path(dir_okay=False),
              help=f"CSV to write ({SCORES_CSV}). "
              "Default: print the scores.")
@click.option("--weights", help="The backbone's weights file, when the run's was moved (checked by hash).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              help="Backbone precision for --images (auto: as for extract). Default: the one the run's store "
                   f"was extracted at (--model: {EXTRACT_DEFAULTS.precision}, as the authors').")
@click.option("--workers", type=int, default=default_of(api.score, "workers"), show_default=True,
              help=_WORKERS_HELP)
@click.option("--allow-unfinished", is_flag=True, help=_UNFINISHED_HELP)
@click.option("--user", "user_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A personal model folder of this run (`mlsp personalize`; repeatable), with --store: adds the "
                   "column pred_<user>, on that person's scale; the features are read once for all.")
@engine_option
@ray_options
@handle_errors
def score_command(run_dir, files, model, store_path, images_dir, out, weights, precision, workers, allow_unfinished,
                  user_dirs, engine, ray_address, ray_cpus_per_worker, ray_gpus_per_worker):
    """Score images with a trained run or a released model: a whole store, or image files.

    \b
    mlsp score RUN_DIR --store STORE.h5 --out scores.csv   from stored features
    mlsp score RUN_DIR --images DIR --out scores.csv       new files, backbone + head
    mlsp score RUN_DIR a.jpg b.png                          a few files
    mlsp score --model ava-mlsp-irv2-wide --images DIR      the authors' released model

    pred is the mean prediction over the views (a run's: 4 corner crops and their mirror images,
    as in training; a released model's: its own), pred_std their spread. A run of --target
    distribution adds pred_opinion_std (how much people would disagree) and p1..p10 (the
    predicted share of each score). Files that cannot be used are listed, and kept in the CSV
    with their reason in the column `error`. With --out, images are scored into OUT.partial as
    they come: an interrupted run resumes when run again.
    """
    run_dir, files = _run_or_model(run_dir, model, files)
    if sum(map(bool, (store_path, images_dir, files))) != 1:
        raise click.UsageError("give one of --store, --images or image files")
    if not store_path:
        _sigterm_as_interrupt()
    try:
        frame = api.score(run_dir, model=model, store=store_path,
                          images=None if store_path else images_dir or list(files), out=out, weights=weights,
                          precision=precision, workers=workers, progress=console_progress,
                          allow_unfinished=allow_unfinished, ray=ray_address, ray_cpus_per_worker=ray_cpus_per_worker,
                          ray_gpus_per_worker=ray_gpus_per_worker, users=user_dirs, engine=engine)
    except KeyboardInterrupt as exc:
        if hasattr(exc, "kept"):  # while the model was downloaded: what that kept
            _interrupted(f"downloading the model: {exc.kept}.")
        kept = f"scored images are kept in {out}.partial; run the same command again to resume."
        _interrupted(kept if out and not store_path else "nothing was written; run the same command again.")
    errors = frame.attrs.get("errors", [])
    _echo_errors(errors)
    if out:
        click.echo(f"{out}: {len(frame)} images scored" + (f", {len(errors)} skipped" if errors else ""))
    else:
        click.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


@main.command("import-weights")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", type=click.Choice(list(KERAS2_HEADS)), required=True,
              help="The head the file holds: single3fc (the authors' fc_layers on narrow features) or pool3fc "
                   "(their inception_block, then fc_layers, on wide features). Its sizes are read off the file.")
@click.option("--store", "store_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A store of the features the head was trained on (net, pooling, views, backbone weights); "
                   "the run scores, evaluates and exports with this configuration.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Run folder to write. Default: runs/<store>-<head>-<timestamp>.")
@handle_errors
def import_weights_command(file, head, store_path, out):
    """Import a Keras 2 head (an .h5 weights file written by the authors' kutils notebooks) as a run.

    Every tensor is placed by its layer's name and checked for shape; a file with a missing,
    extra or misshapen tensor is refused, naming them, and so is one whose tensors are links (to
    elsewhere in it or to another file), not floating-point, NaN or infinite (docs/faults.md).
    The run folder then works as a trained one: `mlsp score RUN`, `mlsp evaluate RUN`,
    `mlsp export RUN`. A killed import leaves no run; the same command then imports again.
    """
    click.echo(f"run: {api.import_weights(file, head=head, store=store_path, out=out)}")


_PERSONALIZE_HELP = f"""Adapt a run's head to one person's taste, or evaluate personalisation.

    \b
    mlsp personalize --run RUN --store STORE --ratings FILE --user ID --out DIR
    mlsp personalize --evaluate --run RUN --store STORE --ratings FILE [--users FILE] --k 10 --k 100 --out DIR

    FILE: FLICKR-AES's FLICKR-AES_image_labeled_by_each_worker.csv (worker, imagePair, score) or a
    CSV user,image,score; images are matched to the store's ids as labels are, and ratings of
    images not in the store are counted and left out. A person needs at least {MIN_RATINGS} ratings
    of stored images. The person's scale (--scale) is mapped onto the generic MOS scale and back,
    so the personal model predicts on the person's own scale.

    \b
    Methods (--method; auto chooses by cross-validation on the person's ratings, first among the
    methods in the head's last hidden layer, then among those in the store's features, and keeps
    a space's best only when it beats the choice so far (at first the generic prediction) by more
    than {FALLBACK_SE:g} standard errors, and so does the choice cross-validated again within each
    fold, by {NESTED_SE[HEAD_SPACE]:g} and {NESTED_SE[FEATURE_SPACE]:g} standard errors in the two spaces):
    {(chr(10) + "    ").join(f"{s.name}: {s.description}" for s in METHODS.specs())}

    DIR gets personal.json and personal.npz: the fitted part, the scale, the method, and the
    generic model's run and SHA-256 (`mlsp score RUN --store S --user DIR` refuses another run's);
    for content and content_taste also the SHA-256 of the store's basis, saved once beside the
    run's model (in RUN/personal-basis; with --model, in DIR) and used only when its arrays hash to it.

    With --evaluate (the literature's protocol), for each test person, each k and each repeat, k
    rated images are drawn for adaptation and the SRCC of the generic and the personal model is
    computed on the person's other images; DIR gets evaluation.csv ({", ".join(EVAL_COLUMNS)}; method:
    the one chosen for the draw), summary.json and gain_per_person.png.
    """


@main.command("personalize", help=_PERSONALIZE_HELP)
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="The training run whose head is the generic model (a run of --target mos).")
@click.option("--model", help="Or a released model as the generic one: a name of `mlsp models` or the path of its "
                              "file (the store then holds its features: its net, pooling and views).")
@click.option("--store", "store_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Feature store holding the rated images (same net, pooling and blocks as the run's).")
@click.option("--ratings", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Ratings per person: FLICKR-AES's per-worker CSV or a CSV user,image,score.")
@click.option("--user", help="The person to adapt to (a value of the user or worker column).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder of the personal model (or, with --evaluate, of the evaluation).")
@click.option("--method", type=click.Choice(method_names()), default=AUTO, show_default=True,
              help="Adaptation method; auto: chosen by cross-validation on the person's ratings.")
@click.option("--scale", type=(float, float), default=RATING_SCALE, show_default=True, metavar="LOW HIGH",
              help="The scale people rated on; a rating outside it is an error.")
@click.option("--seed", type=int, default=default_of(api.personalize, "seed"), show_default=True,
              help="Seed of the folds, the draws of --evaluate and fine-tuning.")
@click.option("--evaluate", "do_evaluate", is_flag=True,
              help="Run the evaluation protocol over the test raters instead of adapting one person.")
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False),
              help="With --evaluate: the test raters, one per line; the file's other raters are training raters "
                   "(the taste method learns from them). Default: every rater is tested, none trains; FLICKR-AES's "
                   "file needs it (its split of test workers is not shipped).")
@click.option("--k", "ks", type=click.IntRange(min=2), multiple=True,
              help=f"With --evaluate: images drawn per person for adaptation (repeatable). "
                   f"Default: {' and '.join(map(str, EVAL_KS))}, as in the literature.")
@click.option("--repeats", type=click.IntRange(min=1), default=EVAL_REPEATS, show_default=True,
              help="With --evaluate: draws per person and k.")
@click.option("--allow-unfinished", is_flag=True, help=_UNFINISHED_HELP)
@handle_errors
def personalize_command(run_dir, model, store_path, ratings, user, out, method, scale, seed, do_evaluate, users_file,
                        ks, repeats, allow_unfinished):
    """Personal models (help: _PERSONALIZE_HELP)."""
    if not do_evaluate and ks:
        raise click.UsageError("--k is a setting of --evaluate")
    _sigterm_as_interrupt()
    try:
        result = api.personalize(run_dir, model=model, store=store_path, ratings=ratings, user=user, out=out,
                                 method=method, scale=scale, seed=seed, evaluate=do_evaluate, users=users_file, ks=ks or None,
                                 repeats=repeats, progress=console_progress, allow_unfinished=allow_unfinished)
    except KeyboardInterrupt:
        _interrupted("finished draws are kept in evaluation.csv.partial; run the same command again to go on."
                     if do_evaluate else "nothing was written.")
    if not do_evaluate:
        click.echo(f"{out}: personal model of {result.user} ({result.method}"
                   + "".join(f", {k} {v:g}" for k, v in result.params.items()) + f", {result.n_ratings} ratings)")
        return
    for k, s in result.items():
        click.echo(f"k = {k}: mean SRCC gain {s['mean']:+.3f} (std {s['std']:.3f} over {s['people']} people, "
                   f"range {s['min']:+.3f} .. {s['max']:+.3f}; {s['std_over_repeats']:.3f} over repeats); "
                   f"SRCC generic {s['srcc_generic']:.3f} -> personal {s['srcc_personal']:.3f}")
    click.echo(f"{out}: evaluation.csv, summary.json, gain_per_person.png")


@main.command("export")
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--model", help=_MODEL_HELP)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Default: RUN_DIR/scoring_model.keras; for --model, NAME.keras here.")
@click.option("--weights", help="The backbone's weights file, when the run's was moved (checked by hash).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              help="Backbone precision (auto: as for extract). Default: the one the run's store was extracted at "
                   f"(--model: {EXTRACT_DEFAULTS.precision}).")
@click.option("--allow-unfinished", is_flag=True, help=_UNFINISHED_HELP)
@handle_errors
def export_command(run_dir, model, out, weights, precision, allow_unfinished):
    """Save views + backbone + pooling + head as one Keras model: image batch in, MOS out.

    The model takes RGB images of one size with values 0..255 and returns the mean prediction
    over the run's views (a released model's: its own test-time views); for a run of --target
    distribution, a dict of mos, opinion_std and distribution (the 10 probabilities). Load it
    with keras.saving.load_model(path, safe_mode=True) after `import mlsp, heads` (which
    register its layers), or with `heads.score.export.load_exported(path)`.
    """
    run_dir, _ = _run_or_model(run_dir, model)
    path = api.export(run_dir, out, model=model, weights=weights, precision=precision,
                      allow_unfinished=allow_unfinished, progress=console_progress)
    click.echo(f"exported: {path}")


@main.command("report")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False),
              help="The HTML file to write. Default: SOURCE.html beside a scores file, SOURCE/report.html "
                   "in a run or evaluation folder.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="The folder of the photos, found by id as extraction and scoring name them: for a run "
                   "(the folder its store was extracted from), a scores file of --store, or one whose photos moved.")
@click.option("--saliency", "saliency_dir", type=click.Path(exists=True, file_okay=False),
              help=f"A folder of `mlsp explain` overlays (<id>{saliency.OVERLAY_FILE}), shown beside each photo. "
                   "Default for a run: RUN/saliency when it exists.")
@click.option("--max-photos", type=click.IntRange(min=1), default=reporting.MAX_PHOTOS, show_default=True,
              help=f"Thumbnails made (the best and worst by score; long side {reporting.THUMB_SIDE} px) and photos "
                   "per page of the gallery; further rows are listed without a picture.")
@handle_errors
def report_command(source, out, images_dir, saliency_dir, max_photos):
    """Write one self-contained HTML page (opens offline, from disk) of SOURCE.

    \b
    SOURCE is one of:
      scores.csv        `mlsp score --out`: photos ranked by score, a histogram, best and worst 24
      RUN_DIR           a run: metrics, predicted vs true, loss and LR, largest misses, configuration
      EVAL_DIR          a personalisation evaluation (evaluation.csv): gain per person

    The gallery sorts best or worst first and filters by file name; a click shows the full photo
    (and its saliency overlay, when there is one).
    """
    try:
        path = api.report(source, out, images=images_dir, saliency=saliency_dir, max_photos=max_photos,
                          progress=console_progress)
    except KeyboardInterrupt:
        _interrupted("no report was written (it is written whole at the end).")
    click.echo(f"report: {path}")


@main.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="The trained run whose score is explained (backbone, pooling and head, as `mlsp export` "
                   "builds them).")
@click.option("--model", help="Or a released model whose score is explained: a name of `mlsp models` or the "
                              "path of its file (fetched and checked as for `mlsp score --model`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help=f"Folder for <id>{saliency.OVERLAY_FILE} (the photo under its saliency map) and "
                   f"<id>{saliency.MAP_FILE} (the map, float32, the photo's height x width, max 1); never taken "
                   "for photos, so it may be the photos' own folder.")
@click.option("--samples", type=click.IntRange(min=1), default=saliency.SAMPLES, show_default=True,
              help="Noisy copies averaged (SmoothGrad's paper: 50). Each runs the whole model forward and back "
                   "over the photo's views: on a CPU some 3 CPU-seconds per sample for a 565x394 photo with iv3 "
                   "(docs/report.md); "
                   f"memory stays bounded ({saliency.PIXELS_PER_CALL / 1e6:g} million view pixels per call, "
                   "about 2 GB with iv3).")
@click.option("--noise", type=click.FloatRange(min=0), default=saliency.NOISE, show_default=True,
              help="Standard deviation of the noise as a share of the image's value range (the paper: 0.1-0.2).")
@click.option("--weights", help="The backbone's weights file, when the run's was moved (checked by hash).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              help="Backbone precision (auto: as for extract). Default: the one the run's store was extracted at.")
@click.option("--allow-unfinished", is_flag=True, help=_UNFINISHED_HELP)
@handle_errors
def explain_command(images, run_dir, model, out, samples, noise, weights, precision, allow_unfinished):
    """SmoothGrad saliency: which pixels of each photo drive its predicted score.

    IMAGES are image files, or one folder (searched recursively); the model is a trained run (--run) or a
    released one (--model). The gradient of the score runs through the whole image-to-score model, at each
    photo's own resolution; `mlsp report` shows the
    overlays beside the photos (--saliency OUT). Files that cannot be used are listed.
    """
    inputs = images[0] if len(images) == 1 and os.path.isdir(images[0]) else list(images)
    _sigterm_as_interrupt()
    try:
        explained, errors = api.explain(inputs, out, run=run_dir, model=model, samples=samples, noise=noise,
                                        weights=weights, precision=precision, allow_unfinished=allow_unfinished,
                                        progress=console_progress)
    except KeyboardInterrupt:
        _interrupted(f"the maps finished so far are in {out}, each written whole.")
    _echo_errors(errors)
    click.echo(f"{out}: {len(explained)} saliency maps" + (f", {len(errors)} files skipped" if errors else ""))


FINETUNE = FinetuneConfig  # the defaults of `mlsp finetune`'s options are the fields' defaults


@main.command("finetune")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The photos (a folder, searched recursively), named by id as extraction names them.")
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="AVA.txt or a CSV of ratings (id, mos, optional votes_1..votes_10), as for extract.")
@click.option("--test-list", type=click.Path(exists=True, dir_okay=False),
              help="Ids of the test images, as for extract. Without: --test-fraction of the labelled images, "
                   "drawn by id with --seed: the test split of the store extracted with the same options.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder. The same command on an interrupted run's folder resumes it.")
@click.option("--net", type=click.Choice(list(FINETUNE_NETS)), default=FINETUNE.net, show_default=True,
              help="The network (docs/finetune.md): " + "; ".join(f"{n.name}: {n.literature}" for n in
                                                                 FINETUNE_NETS.specs()) + ".")
@click.option("--target", type=click.Choice(list(FINETUNE_TARGETS)), default=FINETUNE.target, show_default=True,
              help="; ".join(f"{t.name}: {t.description}" for t in FINETUNE_TARGETS.specs()) + ".")
@click.option("--weights", default=FINETUNE.weights, show_default=True,
              help="The backbone's starting weights: imagenet, random:SEED (tests) or a weights file.")
@click.option("--size", type=click.IntRange(min=32), default=FINETUNE.size, show_default=True,
              help="Input side: images are resized to SIZE*256/224 and randomly cropped to SIZE (and flipped) for "
                   "training, resized to SIZE for validation, test and scoring.")
@click.option("--delta", type=click.FloatRange(0, 4.5, max_open=True), default=FINETUNE.delta, show_default=True,
              help="Binary target: images with MOS in (5-DELTA, 5+DELTA) are left out of training and of the "
                   "binary metrics.")
@click.option("--fc", default=",".join(map(str, FINETUNE.fc)), show_default=True, metavar="N[,N...]",
              help="Dense layers (ReLU) between the pooled features and the output: the reduced fc6/fc7 "
                   "(e.g. 256,256). Empty: none (NIMA).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=FINETUNE.dropout,
              show_default=True, help="Dropout before the output layer (NIMA's 0.75; 0: none).")
@click.option("--head-epochs", type=click.IntRange(min=0), default=FINETUNE.head_epochs, show_default=True,
              help="Phase 1: epochs of the new head with the backbone frozen.")
@click.option("--epochs", type=click.IntRange(min=0), default=FINETUNE.epochs, show_default=True,
              help="Phase 2: at most this many epochs of the head and the unfrozen backbone.")
@click.option("--unfreeze", default=FINETUNE.unfreeze, show_default=True, metavar="all|N",
              help="What phase 2 trains of the backbone: all of it, or its top N blocks (0: no phase 2).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=FINETUNE.optimizer, show_default=True,
              help=f"One per part (head, backbone): SGD with momentum {SGD_MOMENTUM} (the fine-tuned "
                   "classifiers') or Adam (NIMA's).")
@click.option("--head-lr", type=click.FloatRange(min=0, min_open=True), default=FINETUNE.head_lr,
              show_default=True, help="The new head's learning rate (the classifiers' 0.001 for the new layer).")
@click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), default=FINETUNE.backbone_lr,
              show_default=True, help="The unfrozen backbone's learning rate in phase 2 (the classifiers' 0.0001; "
                                      "NIMA's 0.00003).")
@click.option("--phase2-head-lr", type=click.FloatRange(min=0, min_open=True),
              help="The head's learning rate in phase 2. Default: --head-lr (NIMA: the backbone's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=FINETUNE.batch_size, show_default=True,
              help="Images per training batch.")
@click.option("--patience", type=click.IntRange(min=1), default=FINETUNE.patience, show_default=True,
              help="Epochs without validation improvement that end a phase; the best weights are kept.")
@click.option("--steps-per-epoch", type=click.IntRange(min=0), default=FINETUNE.steps_per_epoch,
              show_default=True, help="At most this many batches per epoch (0: one pass over the training images).")
@click.option("--val-fraction", type=float, default=FINETUNE.val_fraction, show_default=True,
              help="Share of the labelled non-test images drawn for validation (as extract).")
@click.option("--test-fraction", type=float, default=FINETUNE.test_fraction, show_default=True,
              help="Without --test-list: share of the labelled images drawn for test (as extract).")
@click.option("--seed", type=click.IntRange(min=0), default=FINETUNE.seed, show_default=True,
              help="Seed of the splits, the head's weights, the batches, crops, flips and dropout.")
@click.option("--workers", type=click.IntRange(min=0), default=FINETUNE.workers, show_default=True,
              help=_WORKERS_HELP)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=FINETUNE.precision, show_default=True,
              help="Compute precision while training (float32 or bfloat16 mixed precision; auto: bfloat16 where "
                   "the hardware has it). The saved model is float32.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar per epoch.")
@handle_errors
def finetune_command(images_dir, labels, out, fc, progress, **options):
    """Fine-tune an ImageNet network end to end on rated photos: NIMA, the fine-tuned classifiers.

    \b
    Phase 1 trains a new head with the backbone frozen; phase 2 also the unfrozen top of the
    backbone, at its own lower rate. Early stopping on validation loss keeps the best weights; a
    checkpoint after every epoch lets the same command resume a run that was stopped or killed.
    The run folder is a run like `mlsp train`'s: `mlsp score RUN --images`, `mlsp evaluate`,
    `mlsp export` and `mlsp compare` take it (docs/finetune.md).
    """
    _sigterm_as_interrupt()
    widths = tuple(int(w) for w in fc.split(",") if w.strip()) if fc else ()
    try:
        result = api.finetune(images_dir, labels=labels, out=out, fc=widths,
                              progress=console_progress if progress else False, **options)
    except RunInterrupted as stopped:
        _interrupted(f"{stopped.run_dir}: {stopped.kept}.")
    except KeyboardInterrupt:
        _interrupted("fine-tuning stopped before it started: nothing was written.")
    _echo_compared([{"run": split, **m} for split, m in result.metrics.items()])
    click.echo(f"run: {result.run_dir}")


def _echo_compared(rows):
    keys = ("srcc", "plcc", "accuracy", "balanced_accuracy", "auc", "emd2", "n")
    keys = tuple(k for k in keys if any(r.get(k) is not None for r in rows))
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
    click.echo(f"{'':8}" + "".join(f"{k:>19}" for k in keys))
    for row in rows:
        click.echo(f"{shown(str(row['run'])):8}" + "".join(f"{fmt(row.get(k)):>19}" for k in keys))


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the comparison as an HTML page.")
@click.option("--delta", type=click.FloatRange(0, 4.5, max_open=True), default=default_of(api.compare, "delta"),
              show_default=True, help="Accuracy, balanced accuracy and AUC on the test images at least DELTA "
                                      "from MOS 5.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@handle_errors
def compare_command(runs, out, delta, as_json):
    """Test metrics of RUNS (MLSP heads, fine-tuned networks) side by side, on their one test split.

    Runs whose test splits differ are refused, naming the difference. Also shown: parameters
    trained, training time and images/s (an MLSP run's: its head's, after the extraction).
    """
    rows = api.compare(list(runs), out=out, delta=delta)
    if as_json:
        echo_json(rows)
        return
    for k, row in enumerate(rows, start=1):
        click.echo(f"run{k}: {shown(row['run'])} ({row['method']}: {row['model']}; {row['params_trained'] or 0:,} "
                   f"parameters trained, {row['train_seconds'] or 0:.0f} s)")
    _echo_compared([{**row, "run": f"run{k}"} for k, row in enumerate(rows, start=1)])
    if out:
        click.echo(f"page: {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
