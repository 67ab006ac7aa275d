"""A run folder: what ``mlsp train`` writes, and what evaluation, scoring and export read.

:class:`Run` owns the folder's layout (``config.json``, ``model.keras``, ``history.csv``), its
status (``running``, ``finished``, ``interrupted``, ``diverged``, ``failed``), loading the model
and finding again the extraction that made the run's store. A ``config.json`` that is missing,
is not valid JSON or is not a run's is a one-line :class:`mlsp.errors.ConfigError`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os

from mlsp.runtime.atomic import atomic_path, describe_os_error, write_json
from mlsp.errors import ConfigError, StoreConfigMismatch, WriteError
from mlsp.runtime import backend
from mlsp.extraction.job import ExtractConfig, random_weights_advice
from mlsp.store.read import FeatureStore
from mlsp.store.format import FEATURES_ROOT
from mlsp.store.config import from_attrs

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"

log = logging.getLogger(__name__)
STATUSES = ("running", "finished", "interrupted", "diverged", "failed")
#: Statuses whose saved model can still be used when the user says so (``allow_unfinished``).
UNFINISHED_USABLE = {
    "interrupted": "training was stopped (Ctrl-C or kill) and its model holds the best weights up to then",
    "diverged": "training diverged and its model holds the best weights before it",
}
ALLOW_UNFINISHED_FLAG = "--allow-unfinished"
RUNS_ROOT = "runs"


@dataclasses.dataclass
class Run:
    """One training run's folder and its ``config.json``."""

    path: str
    config: dict

    @classmethod
    def open(cls, run_dir: str, *, finished: bool = True, allow_unfinished: bool = False) -> "Run":
        """The run in ``run_dir``; with ``finished`` (scoring, export) only a run whose training
        finished, without (evaluation) any run that saved a model. ``allow_unfinished`` also takes
        an interrupted or diverged run (its saved model: the best weights so far), with a warning."""
        what = "a finished training run" if finished else "a finished run"
        for need in (CONFIG_FILE, MODEL_FILE):
            if not os.path.isfile(os.path.join(run_dir, need)):
                raise ConfigError(f"{run_dir} is not {what}: {need} is missing")
        run = cls(run_dir, read_config(os.path.join(run_dir, CONFIG_FILE)))
        if finished and run.status != "finished":
            why = UNFINISHED_USABLE.get(run.status)
            if why is None:
                raise ConfigError(f"{run_dir}: the run did not finish (status {run.status!r})")
            if not allow_unfinished:
                raise ConfigError(f"{run_dir}: the run did not finish ({run.status}: {why}); pass "
                                  f"{ALLOW_UNFINISHED_FLAG} to use it anyway")
            log.warning("%s: using an unfinished run (%s: %s)", run_dir, run.status, why)
        return run

    @staticmethod
    def refuse_existing(run_dir: str):
        """A folder that already holds a run is never trained into again."""
        if os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
            raise ConfigError(f"{run_dir} already holds a run; choose another --out")

    @classmethod
    def create(cls, run_dir: str, record: dict) -> "Run":
        """A new run folder with ``record`` as its ``config.json``."""
        cls.refuse_existing(run_dir)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as exc:  # read-only media, a full disk: nothing of the run exists yet
            raise WriteError(run_dir, describe_os_error(exc), "nothing was written; the store is unchanged") from exc
        run = cls(run_dir, record)
        run.save_config()
        return run

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config_path(self) -> str:
        return self.file(CONFIG_FILE)

    @property
    def model_path(self) -> str:
        return self.file(MODEL_FILE)

    @property
    def history_path(self) -> str:
        return self.file(HISTORY_FILE)

    @property
    def status(self):
        return self.config.get("status")

    def history(self) -> list:
        """``history.csv`` as one dict per epoch (``[]`` before the first epoch ends)."""
        if not os.path.isfile(self.history_path):
            return []
        with open(self.history_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v != ""} for r in rows]

    def save_config(self, **updates):
        """Apply ``updates`` to the config and write ``config.json`` atomically."""
        self.config.update(updates)
        write_json(self.config_path, self.config)

    def save_model(self, model, kept: str | None = None):
        """Write ``model`` (a Keras model) to ``model.keras`` atomically: complete or not at all.
        ``kept``: what the folder holds should it fail (default: a training run's files)."""
        kept = kept or f"{self.path} holds the run's config.json and history.csv, not its model"
        with atomic_path(self.model_path, keep_extension=True, kept=kept) as tmp:
            model.save(tmp)

    @property
    def store_info(self) -> dict:
        return self.config["store"]

    def load_model(self):
        """The head (``model.keras``), loaded with safe_mode."""
        import keras

        return keras.saving.load_model(self.model_path, compile=False, safe_mode=True)

    def extract_config(self, weights: str | None = None, precision: str | None = None) -> ExtractConfig:
        """The extraction that made the run's store, with the weights file found again; ``precision``
        (``auto``: resolved by :class:`ExtractConfig`) replaces the store's."""
        cfg = self.store_info["config"]
        stored = from_attrs({**cfg, "net": self.store_info["net"], "pooling": self.store_info["pooling"],
                             "views": self.store_info.get("views") or cfg.get("views")})
        if precision:
            stored["precision"] = precision
        source = cfg["weights_source"]
        if weights is None:
            if source == "imagenet" or source.startswith("random"):
                weights = source
            else:
                recorded = self.store_attr("weights_path") or ""
                if not os.path.isfile(recorded):
                    raise ConfigError(
                        f"the run's features came from the weights file {source!r}"
                        + (f" (was at {recorded})" if recorded else "")
                        + ", which is not there now: pass it with --weights PATH"
                    )
                weights = recorded
        return ExtractConfig(weights=weights, **stored)

    def store_attr(self, key):
        """An attribute of the run's original store, if that file is still there."""
        path = self.store_info.get("path")
        if not path or not os.path.isfile(path):
            return None
        with FeatureStore(path) as store:
            return store.attrs.get(key)

    def check_weights(self, record: dict):
        """The backbone's weights (``record``, as the extractor reports them) are the run's."""
        want = self.store_info["config"]["weights_sha256"]
        if record["sha256"] != want:
            diff = {"weights_sha256": (want, record["sha256"])}
            seeded = random_weights_advice(diff, record["source"], self.store_attr("backend"),
                                           backend.name())
            raise StoreConfigMismatch(
                self.path, diff,
                advice=seeded or "Pass the backbone's weights file the run was trained with: --weights PATH.")


def store_record(store_path: str, store: FeatureStore) -> dict:
    """A run's ``store`` entry: the store's path, fingerprint, layout and configuration, which
    scoring, evaluation and export check features against."""
    return {"path": os.path.abspath(store_path), "fingerprint": store.fingerprint(), "net": store.net,
            "pooling": store.pooling, "block_names": store.block_names, "block_channels": store.block_channels,
            "views": store.views, "n_images": store.n_images, "config": store.config()}


def default_run_dir(store_path: str, head: str, root: str = RUNS_ROOT) -> str:
    """``runs/<dataset>-<store>-<head>-<timestamp>``, numbered on when taken."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(store_path)))
    stem = os.path.splitext(os.path.basename(store_path))[0]
    name = f"{stem}" if parent in ("", FEATURES_ROOT) else f"{parent}-{stem}"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{name}-{head}-{stamp}")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(root, f"{name}-{head}-{stamp}-{k}")
    return path


def read_config(path: str) -> dict:
    """A run's ``config.json``; a file that is not valid JSON is a one-line error."""
    try:
        with open(path) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                          "the run folder is damaged") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(config, dict) or "store" not in config:
        raise ConfigError(f"{path} is not a training run's config (no 'store' entry)")
    return config
