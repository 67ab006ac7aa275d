"""Extraction and scoring spread over a Ray cluster (``--ray ADDRESS``).

Imported only when ``--ray`` is given; Ray is an extra (``pip install -e ".[ray]"``). The
driver (the process running ``mlsp extract`` or ``mlsp score``) keeps everything that must
happen once: the list of images, the configuration check, the crash-safe shards and the CSV.
Workers are Ray actors; each builds its model once (a *recipe*: a small frozen dataclass with
``build()``, e.g. :class:`mlsp.extraction.job.ExtractConfig`, giving a processor with ``info()``,
``configuration()``, ``load_views()`` and ``process()``) and turns chunks of image paths into
results. Results come back to the driver in whatever order chunks finish; the store and the
CSV are ordered by path when they are finished, so the order does not show.

Failures: a worker that dies (killed, out of memory, its node lost) is replaced by a new
actor and its unfinished chunks go back to the queue for any live worker; a chunk that kills
workers :data:`MAX_CHUNK_ATTEMPTS` times stops the job with a :class:`ClusterError` (finished
images are kept; a rerun resumes). Every chunk's result carries the identity of the model
that made it (the hash of its configuration -- for extraction the store's configuration keys,
blocks and weights' hash -- and the mlsp version), checked against the job's. Provenance (the
backend, its version, the device) is left out: workers on other GPUs or TensorFlow patch
versions make the same features; the store records the first worker's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections import deque
from typing import Iterable, Iterator

from ..version import __version__
from ..errors import ClusterError, ConfigError, ImageDecodeError
from ..backbone import native
from ..runtime.progress import Closing
from ..images.readahead import DECODE_WORKERS

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[ray]"'
ADDRESS_HELP = ("auto (the Ray cluster this machine belongs to: RAY_ADDRESS or the one `ray start` made), "
                "ray://HOST:PORT (Ray Client), HOST:PORT (the head's GCS), or local:N (start Ray on this "
                "machine with N workers)")
CHUNK_IMAGES = 8  # images per task: a worker killed mid-chunk costs at most this many again
TASKS_PER_WORKER = 2  # chunks queued on each worker, so none idles while the driver receives
MAX_CHUNK_ATTEMPTS = 3


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclasses.dataclass(frozen=True)
class Address:
    """A parsed ``--ray`` value: ``local`` with a number of workers, or an address for ray.init."""

    kind: str  # "local" | "connect"
    target: str = ""
    workers: int = 0

    @classmethod
    def parse(cls, text: str) -> "Address":
        text = str(text).strip()
        if text.startswith("local:"):
            count = text.partition(":")[2]
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"--ray {text!r}: local:N needs a number of workers N >= 1")
            return cls("local", workers=int(count))
        if text == "auto" or text.startswith("ray://") or (":" in text and text.rpartition(":")[2].isdigit()):
            return cls("connect", target=text)
        raise ConfigError(f"--ray {text!r}: expected {ADDRESS_HELP}")


def model_identity(configuration: dict) -> str:
    """A short hash of what a worker's model is: its ``configuration`` (with the mlsp version)."""
    return hashlib.sha256(json.dumps(configuration, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Worker:
    """One Ray actor: builds each recipe's model once and runs chunks of images through it, on the
    engine the driver chose (``--engine``: :func:`mlsp.backbone.native.engine_chosen`), which a
    worker's process would not otherwise know."""

    def __init__(self, threads: int, decode_threads: int):
        if threads:
            from ..runtime.backend import configure_threads

            configure_threads(threads, threads)
        self.decode_threads = decode_threads
        self.built = {}

    def _get(self, recipe, engine: str):
        if (recipe, engine) not in self.built:
            with native.engine_chosen(engine):
                processor = recipe.build()
            # the identity: configuration only; provenance (backend, its version, device) may differ
            configuration = {**processor.configuration(), "mlsp": __version__}
            self.built[recipe, engine] = (processor, processor.info(), configuration, model_identity(configuration))
        return self.built[recipe, engine]

    def info(self, recipe, engine: str = native.DEFAULT_ENGINE) -> dict:
        _, info, configuration, identity = self._get(recipe, engine)
        return {"info": info, "configuration": configuration, "identity": identity, "mlsp": __version__,
                "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, recipe, items: list, engine: str = native.DEFAULT_ENGINE) -> tuple[str, list]:
        """``items`` are (path, id); returns (identity, [("ok", result) or ("error", reason)])."""
        from ..images.readahead import LocalRunner

        processor, _, _, identity = self._get(recipe, engine)
        out = []
        for _, result in LocalRunner(processor, workers=self.decode_threads).map(items):
            out.append(("error", result.reason) if isinstance(result, ImageDecodeError) else ("ok", result))
        return identity, out


def plan(nodes: list[dict], address: Address, cpus: float | None, gpus: float | None) -> tuple[float, float, int]:
    """``(CPUs, GPUs, count)`` of the workers, for the alive machines' resources ``nodes`` (Ray's
    ``{"CPU": ..., "GPU": ...}``) and what was asked (``None``: :class:`Cluster`'s defaults). A
    :class:`ClusterError` where no worker fits: its actors would wait for resources forever."""
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpus is None:
        gpus = 1 if total_gpus else 0
    if gpus:
        # a worker's GPUs are on one machine; ones asked for that none has would never come
        most = max((n.get("GPU", 0) for n in nodes), default=0)
        if most < gpus:
            raise ClusterError(f"no machine of the Ray cluster has {gpus:g} GPUs for a worker (the most on one "
                               f"machine: {most:g}); lower --ray-gpus-per-worker (0: workers on CPUs)")
        if address.kind == "local" and total_gpus // gpus < address.workers:
            raise ClusterError(f"--ray local:{address.workers} with {gpus:g} GPUs per worker needs "
                               f"{address.workers * gpus:g} GPUs, this machine has {total_gpus:g}; lower N or "
                               "--ray-gpus-per-worker")
    if cpus is None:
        if address.kind == "local":
            cpus = max(1, int(sum(n.get("CPU", 0) for n in nodes)) // address.workers)
        elif gpus:
            cpus = max(1, min(int(n.get("CPU", 0) // n["GPU"]) for n in nodes if n.get("GPU", 0) >= gpus))
        else:
            cpus = max(1, min((int(n.get("CPU", 0)) for n in nodes if n.get("CPU")), default=1))
    if address.kind == "local":
        count = address.workers
    else:
        count = sum(min(int(n.get("CPU", 0) // cpus), int(n.get("GPU", 0) // gpus) if gpus else 1 << 30)
                    for n in nodes)
    if count < 1:
        raise ClusterError(f"no machine of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for a worker; "
                           "lower --ray-cpus-per-worker / --ray-gpus-per-worker")
    return float(cpus), float(gpus), count


class Cluster(Closing):
    """A connection to Ray and a pool of :class:`Worker` actors, reused by every job given to it.

    ``Cluster("local:2")`` starts Ray on this machine (stopped again by :meth:`close`);
    ``Cluster("auto")`` joins the running cluster. Each worker reserves ``cpus_per_worker``
    CPUs and ``gpus_per_worker`` GPUs. Defaults: with GPUs in the cluster one worker per GPU,
    with the CPUs of its share of the machine; without, one worker per machine with all its
    CPUs (one TensorFlow process uses every core best); ``local:N``: N workers sharing this
    machine's cores. ``decode_threads``: each worker's threads decoding images ahead of its
    model (``--workers``, as on one machine).
    """

    def __init__(self, address: str, cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                 decode_threads: int = DECODE_WORKERS):
        ray = import_ray()
        self.address = Address.parse(address)
        self.ray = ray
        self.started = False
        self.actors = []
        self.replaced = 0
        self.decode_threads = decode_threads
        if cpus_per_worker is not None and cpus_per_worker <= 0:
            raise ConfigError(f"--ray-cpus-per-worker must be > 0, received {cpus_per_worker!r}")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise ConfigError(f"--ray-gpus-per-worker must be >= 0, received {gpus_per_worker!r}")
        options = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": False}
        if ray.is_initialized():
            log.info("using the Ray instance this process is already connected to")
        elif self.address.kind == "local":
            cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // self.address.workers)
            # address "local": a new instance even where `ray start` left one (or its address file)
            ray.init(address="local", num_cpus=int(-(-cpus * self.address.workers // 1)), include_dashboard=False,
                     **options)
            self.started = True
        else:
            try:
                ray.init(address=self.address.target, **options)
            except (ConnectionError, RuntimeError) as exc:
                why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                if "auth" in str(exc).lower() or "auth" in str(exc.__cause__).lower():
                    why += ("; the cluster asks for a token: export RAY_AUTH_MODE=token, with the cluster's "
                            "token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
                raise ClusterError(f"--ray {self.address.target}: cannot join the Ray cluster ({why}); start one "
                                   "with `ray start --head` (README, Many machines)") from exc
            self.started = True
        # from here on a failure stops what was started: the caller gets no Cluster to close
        try:
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            self.cpus, self.gpus, self.n_workers = plan(nodes, self.address, cpus_per_worker, gpus_per_worker)
            log.info("Ray: %d workers of %g CPUs and %g GPUs each", self.n_workers, self.cpus, self.gpus)
            self.actor_class = ray.remote(Worker)
            for _ in range(self.n_workers):
                self.actors.append(self._new_actor())
        except BaseException:
            self.close()
            raise

    def _new_actor(self):
        threads = int(self.cpus) if not self.gpus else 0
        return self.actor_class.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(threads, self.decode_threads)

    def replace(self, index: int):
        """Start a new actor in place of a dead one (Ray schedules it wherever resources are free)."""
        try:
            self.ray.kill(self.actors[index])
        except Exception:  # noqa: BLE001  (already gone; Ray raises different types by version)
            pass
        self.actors[index] = self._new_actor()
        self.replaced += 1

    def runner(self, recipe, chunk_images: int = CHUNK_IMAGES) -> "ClusterRunner":
        return ClusterRunner(self, recipe, chunk_images)

    def close(self):
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


def _lost_errors(ray):
    e = ray.exceptions
    return tuple(getattr(e, name) for name in ("RayActorError", "WorkerCrashedError", "NodeDiedError",
                                               "ObjectLostError", "OwnerDiedError") if hasattr(e, name))


class ClusterRunner:
    """One job on a :class:`Cluster`: the same interface as :class:`mlsp.images.readahead.LocalRunner`
    (``info()``, ``map(items)``, ``postfix()``), with the recipe's model built on every worker."""

    def __init__(self, cluster: Cluster, recipe, chunk_images: int = CHUNK_IMAGES):
        self.cluster = cluster
        self.ray = cluster.ray
        self.recipe = recipe
        self.recipe_ref = self.ray.put(recipe)
        self.engine = native.chosen_engine()  # the driver's, for every worker
        self.chunk_images = max(1, int(chunk_images))
        self.lost = _lost_errors(self.ray)
        self.identity = None
        self.ready = set()  # indices of actors whose model is built and checked
        self.workers = {}  # index -> (host, pid) of the actors that built the model
        self.retried_chunks = 0
        self.deaths_in_a_row = 0  # workers lost since the last chunk that came back

    # -- building and checking the model on every worker --------------------------------------
    def _check(self, index: int, reply: dict):
        if reply["identity"] != self.identity:
            raise ClusterError(
                f"worker {reply['host']} (pid {reply['pid']}, mlsp {reply['mlsp']}) built another model than "
                f"the job's: {_differences(self._configuration, reply['configuration'])}; install the same mlsp "
                "and weights on every machine")
        self.ready.add(index)
        self.workers[index] = (reply["host"], reply["pid"])

    def _raise_task_error(self, exc, what: str):
        cause = getattr(exc, "cause", None) or exc
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise ClusterError(f"a Ray worker failed while {what}: {message}") from exc

    def info(self) -> dict:
        """The model's description (for extraction: the store's attributes), the same on every worker."""
        if self.identity is not None:
            return self._info
        pending = {self.cluster.actors[i].info.remote(self.recipe_ref, self.engine): i
                   for i in range(self.cluster.n_workers)}
        replies = {}
        deaths = 0
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                replies[index] = self.ray.get(ready[0])
            except self.lost as exc:
                deaths += 1
                if deaths > MAX_CHUNK_ATTEMPTS * self.cluster.n_workers:
                    raise ClusterError(f"Ray workers keep dying while building the model: {exc}") from exc
                log.warning("a Ray worker died while building the model; starting another")
                self.cluster.replace(index)
                pending[self.cluster.actors[index].info.remote(self.recipe_ref, self.engine)] = index
            except self.ray.exceptions.RayTaskError as exc:
                self._raise_task_error(exc, "building the model")
        first = replies[min(replies)]
        self._info, self._configuration, self.identity = first["info"], first["configuration"], first["identity"]
        for index, reply in replies.items():
            self._check(index, reply)
        hosts = sorted({r["host"] for r in replies.values()})
        log.info("%d Ray workers on %d machines (%s) built the model (identity %s)", len(replies), len(hosts),
                 ", ".join(hosts), self.identity)
        return self._info

    def postfix(self) -> dict:
        return {"workers": f"{len(self.ready)}/{self.cluster.n_workers}"}

    # -- the job ------------------------------------------------------------------------------
    def map(self, items: Iterable) -> Iterator:
        """Yield ``(item, result or ImageDecodeError)`` for every (path, id) item, in the order
        chunks finish. Memory on the driver: at most 2 chunks per worker in flight."""
        self.info()
        items = list(items)
        queue = deque((items[k:k + self.chunk_images], 0) for k in range(0, len(items), self.chunk_images))
        running = {}  # ref -> (actor index, chunk, attempts)
        starting = {}  # ref of info() on a replacement actor -> actor index
        load = {i: 0 for i in range(self.cluster.n_workers)}
        while queue or running:
            for index in sorted(self.ready, key=lambda i: load[i]):
                while queue and load[index] < TASKS_PER_WORKER:
                    chunk, attempts = queue.popleft()
                    ref = self.cluster.actors[index].run.remote(self.recipe_ref, chunk, self.engine)
                    running[ref] = (index, chunk, attempts)
                    load[index] += 1
            if not running and not starting:
                raise ClusterError("no Ray worker is left to run the job")
            done, _ = self.ray.wait(list(running) + list(starting), num_returns=1)
            ref = done[0]
            if ref in starting:
                index = starting.pop(ref)
                try:
                    self._check(index, self.ray.get(ref))
                except self.lost:
                    self._lose(index, running, starting, queue, load)
                except self.ray.exceptions.RayTaskError as exc:
                    self._raise_task_error(exc, "building the model")
                continue
            index, chunk, attempts = running.pop(ref)
            load[index] -= 1
            try:
                identity, results = self.ray.get(ref)
            except self.lost as exc:
                if attempts + 1 >= MAX_CHUNK_ATTEMPTS:
                    raise ClusterError(f"Ray workers died {attempts + 1} times on the chunk of {len(chunk)} images "
                                       f"starting with {chunk[0][0]} ({type(exc).__name__}); finished images "
                                       "are kept, rerun to resume") from exc
                queue.appendleft((chunk, attempts + 1))
                self.retried_chunks += 1
                host, pid = self.workers.get(index, ("?", "?"))
                log.warning("the Ray worker on %s (pid %s) died with %d images in hand; they go to another worker",
                            host, pid, len(chunk))
                if index in self.ready:
                    self._lose(index, running, starting, queue, load)
                continue
            except self.ray.exceptions.RayTaskError as exc:
                self._raise_task_error(exc, f"extracting {chunk[0][0]} ...")
            self.deaths_in_a_row = 0
            if identity != self.identity:
                raise ClusterError(f"a Ray worker's model changed during the job ({identity}, expected "
                                   f"{self.identity})")
            for item, (status, value) in zip(chunk, results):
                yield item, (ImageDecodeError(item[0], value) if status == "error" else value)

    def _lose(self, index, running, starting, queue, load):
        """Replace a dead actor and requeue the chunks it had."""
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > MAX_CHUNK_ATTEMPTS * self.cluster.n_workers:
            raise ClusterError(f"{self.deaths_in_a_row} Ray workers died without a chunk coming back in between; "
                               "finished images are kept, rerun to resume once the cluster is healthy")
        self.ready.discard(index)
        self.cluster.replace(index)
        starting[self.cluster.actors[index].info.remote(self.recipe_ref, self.engine)] = index
        # chunks already sent to the dead actor: requeued now, their refs dropped
        for ref, (i, chunk, attempts) in list(running.items()):
            if i == index:
                running.pop(ref)
                queue.appendleft((chunk, attempts + 1))
                self.retried_chunks += 1
        load[index] = 0


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} here, {b.get(k)!r} there" for k in keys) or "versions differ"
