"""Shared pieces of the mlsp benchmarks: machine and version records, CPU contention and memory
probes, the dense matmul reference rate, FLOP counts of Keras models, and the results file.

Every benchmark (``bench_extract.py`` now, ``bench_train.py`` later) writes one JSON file per run
under ``bench/results/`` with the same top level::

    {"schema": "mlsp-bench/1", "kind": "extract" | "train", "started": ..., "seconds": ...,
     "args": {...}, "machine": {...}, "versions": {...}, "device": {...},
     "reference": {"matmul": {...}}, "figures": {...}, "targets": [...], "notes": [...]}

``targets`` is a list of ``{"name", "value", "target", "met", "unit", "why"}`` so that
``bench/report.py`` can render any kind of run into ``bench/RESULTS.md`` the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SCHEMA = "mlsp-bench/1"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

# Public figures used only for the on-paper GPU extrapolation (dense, no sparsity).
GPU_SPECS = {
    "H100 SXM": {
        "bfloat16_tflops": 989.0,  # dense BF16 tensor core
        "tf32_tflops": 494.5,  # dense TF32 tensor core (TensorFlow's default for float32 matmul/conv)
        "float32_tflops": 66.9,  # FP32 on CUDA cores, no tensor cores
        "source": "NVIDIA H100 datasheet (SXM5), dense figures",
    }
}

# The dataset the paper trains on (docs/paper.md, "Data: AVA" and "Stage 1: features"): image count and mean size.
AVA = {"images": 255530, "mean_height": 497, "mean_width": 629, "max_side": 800}


# ------------------------------------------------------------------------------------------
# Machine, versions, device
# ------------------------------------------------------------------------------------------


#: The instruction-set levels a CPU benchmark reports beside its efficiency, widest first.
ISA_LEVELS = (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def isa_of(flags) -> str:
    """The widest of :data:`ISA_LEVELS` in a CPU's /proc/cpuinfo flags (``"other"`` if none)."""
    return next((label for flag, label in ISA_LEVELS if flag in flags), "other")


def cpu_info() -> dict:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    interesting = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_int8"]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count()
    mem_gib = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": mem_gib,
        "flags": {f: f in flags for f in interesting},
        "bf16_hardware": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "isa": isa_of(flags),
        "platform": platform.platform(),
        # tells runs on one machine apart without recording its name
        "host_id": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name, module in [("tensorflow", "tensorflow"), ("keras", "keras"), ("numpy", "numpy"), ("h5py", "h5py"),
                         ("opencv", "cv2"), ("psutil", "psutil"), ("mlsp", "mlsp")]:
        try:
            mod = __import__(module)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "mlsp", "heads", "cli.py"],
                               capture_output=True, text=True, timeout=10).stdout.rstrip("\n")
        out["mlsp_code_modified"] = bool(dirty)
        if dirty:  # identify the uncommitted state: a hash of the diff and of untracked files
            diff = subprocess.run(["git", "-C", ROOT, "diff", "HEAD", "--", "mlsp", "heads", "cli.py"],
                                  capture_output=True, timeout=10).stdout
            digest = hashlib.sha256(diff)
            for line in dirty.splitlines():
                if line.startswith("??"):
                    path = os.path.join(ROOT, line[3:].strip())
                    for name in sorted(os.listdir(path)) if os.path.isdir(path) else [path]:
                        full = os.path.join(path, name) if os.path.isdir(path) else name
                        if os.path.isfile(full):
                            with open(full, "rb") as handle:
                                digest.update(handle.read())
            out["mlsp_uncommitted_sha256"] = digest.hexdigest()[:12]
            out["mlsp_uncommitted_files"] = [line[3:] for line in dirty.splitlines()]
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def device_info() -> dict:
    """The device TensorFlow computes on: the first GPU if there is one, else the CPU."""
    import tensorflow as tf

    info = {
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 CPU builds)"),
        "build": {k: v for k, v in tf.sysconfig.get_build_info().items() if k in ("is_cuda_build", "cuda_version",
                                                                                  "cudnn_version")},
    }
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        info.update(kind="gpu", name=details.get("device_name", gpus[0].name), count=len(gpus),
                    compute_capability=details.get("compute_capability"),
                    tf32_enabled=bool(tf.config.experimental.tensor_float_32_execution_enabled()))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = out.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info.update(kind="cpu", name=cpu_info()["cpu_model"], count=1)
    return info


# ------------------------------------------------------------------------------------------
# CPU contention and memory
# ------------------------------------------------------------------------------------------


def proc_stat():
    """(busy seconds, steal seconds) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            parts = handle.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) for v in parts]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def wait_quiet(max_wait: float = 90.0, threshold: float = 0.15, window: float = 0.5, needed: int = 3) -> float:
    """Wait until the rest of the machine has used less than ``threshold`` CPU cores for
    ``needed`` windows in a row (at most ``max_wait`` seconds). Call it while this process is
    idle. Returns the seconds waited (``max_wait`` or more: gave up, the machine stayed busy)."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < max_wait:
        a, cpu0, t0 = proc_stat(), own_cpu_seconds(), time.perf_counter()
        if a is None:
            return 0.0
        time.sleep(window)
        b, cpu1, t1 = proc_stat(), own_cpu_seconds(), time.perf_counter()
        others = (b[0] - a[0] - (cpu1 - cpu0)) / (t1 - t0)
        quiet = quiet + 1 if others < threshold else 0
        if quiet >= needed:
            return time.perf_counter() - start
    return time.perf_counter() - start


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phase:
    """Times a block of work: wall seconds, this process's CPU seconds, and the CPU that other
    processes on the machine used meanwhile (in cores), which tells a clean measurement from
    one disturbed by other work on a shared machine.

    >>> with Phase() as p:
    ...     work()
    >>> p.record()  # {"wall_s", "cpu_s", "cpu_util", "other_cores", "steal_cores", "load1"}
    """

    def __enter__(self):
        self._stat0 = proc_stat()
        self._cpu0 = own_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t0
        self.cpu = own_cpu_seconds() - self._cpu0
        stat1 = proc_stat()
        self.other_cores = self.steal_cores = None
        if self._stat0 and stat1 and self.wall > 0:
            busy = stat1[0] - self._stat0[0]
            self.other_cores = max(0.0, (busy - self.cpu) / self.wall)
            self.steal_cores = (stat1[1] - self._stat0[1]) / self.wall
        return False

    def record(self) -> dict:
        try:
            load1 = float(open("/proc/loadavg").read().split()[0])
        except (OSError, ValueError):
            load1 = None
        return {
            "wall_s": round(self.wall, 4),
            "cpu_s": round(self.cpu, 3),
            "cpu_util": round(self.cpu / self.wall, 3) if self.wall else None,
            "other_cores": None if self.other_cores is None else round(self.other_cores, 3),
            "steal_cores": None if self.steal_cores is None else round(self.steal_cores, 3),
            "load1_end": load1,
        }


class Probe:
    """A cheap per-step version of :class:`Phase`: ``start()``, then ``stop()`` returns
    ``(wall seconds, CPU cores other processes used meanwhile)``."""

    def start(self):
        self._s, self._c, self._t = proc_stat(), own_cpu_seconds(), time.perf_counter()
        return self

    def stop(self) -> tuple:
        wall = time.perf_counter() - self._t
        s = proc_stat()
        if self._s is None or s is None or wall <= 0:
            return wall, None
        return wall, max(0.0, (s[0] - self._s[0] - (own_cpu_seconds() - self._c)) / wall)


def corrected(rows: list, time_key: str, gflop_key: str = "gflop", load_key: str = "other_cores",
              threshold: float = 0.15, min_clean: int = 2) -> dict:
    """Undo the disturbance of other processes step by step: the steps (images) during which
    other processes used at most ``threshold`` cores give the clean rate (GFLOP per second of
    ``time_key``); every disturbed step's time is replaced by its FLOPs at that rate. Each row
    gets ``<time_key>_corr``. With fewer than ``min_clean`` clean steps nothing is corrected."""
    clean = [r for r in rows if r.get(load_key) is not None and r[load_key] <= threshold]
    raw = sum(r[time_key] for r in rows)
    if len(clean) < min(min_clean, len(rows)) or not clean:
        for r in rows:
            r[time_key + "_corr"] = r[time_key]
        return {"clean_steps": len(clean), "steps": len(rows), "raw_s": raw, "corrected_s": raw, "applied": False}
    rate = sum(r[gflop_key] for r in clean) / sum(r[time_key] for r in clean)
    for r in rows:
        ok = r.get(load_key) is not None and r[load_key] <= threshold
        r[time_key + "_corr"] = r[time_key] if ok else r[gflop_key] / rate
    total = sum(r[time_key + "_corr"] for r in rows)
    return {"clean_steps": len(clean), "steps": len(rows), "raw_s": raw, "corrected_s": total, "applied": True,
            "clean_gflops": rate}


def rss_mib() -> float | None:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------
# Reference rate: dense matmul
# ------------------------------------------------------------------------------------------


def matmul_rate(dtype: str = "float32", n: int = 4096, reps: int = 7, warmup: int = 2) -> dict:
    """GFLOP/s of tf.matmul(n x n, n x n) in a tf.function on TensorFlow's default device, with
    TensorFlow's default thread settings (those the extractor runs with): median of ``reps``
    timed runs after ``warmup`` untimed ones; 2 n^3 FLOPs per product."""
    import tensorflow as tf

    tf_dtype = getattr(tf, dtype)
    gen = tf.random.Generator.from_seed(0)
    a = tf.cast(gen.normal((n, n)), tf_dtype)
    b = tf.cast(gen.normal((n, n)), tf_dtype)
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    # on a GPU one product takes well under a millisecond: time a chain of them
    chain = 20 if on_gpu else 1

    @tf.function
    def product(a, b):
        c = a
        for _ in range(chain):
            c = tf.matmul(c, b)
            if chain > 1:
                c = c * tf.constant(1e-3, tf_dtype)  # keep values finite; negligible work
        return tf.reduce_sum(tf.cast(c[:1, :1], tf.float32))

    for _ in range(warmup):
        product(a, b).numpy()
    times, loads = [], []
    with Phase() as phase:
        for _ in range(reps):
            probe = Probe().start()
            product(a, b).numpy()
            t, other = probe.stop()
            times.append(t)
            loads.append(other)
    flops = 2.0 * n**3 * chain
    rates = [flops / t / 1e9 for t in times]
    clean = [r for r, o in zip(rates, loads) if o is not None and o <= 0.15]
    return {
        "dtype": dtype,
        "n": n,
        "products_per_call": chain,
        # the median of the undisturbed repetitions (all of them if none was)
        "gflops_median": round(statistics.median(clean or rates), 1),
        "gflops_max": round(max(rates), 1),
        "gflops_all": [round(r, 1) for r in rates],
        "other_cores_all": [None if o is None else round(o, 3) for o in loads],
        "clean_reps": len(clean),
        "phase": phase.record(),
    }


# ------------------------------------------------------------------------------------------
# FLOPs of a Keras model at a given input size
# ------------------------------------------------------------------------------------------


# one count for the benchmarks and `mlsp backbones`: the library's (Conv2D, DepthwiseConv2D, Dense)
from mlsp.backbone.cost import FlopCounter  # noqa: E402,F401


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


def new_record(kind: str, args: dict) -> dict:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
        "machine": cpu_info(),
        "versions": versions(),
        "figures": {},
        "targets": [],
        "notes": [],
    }


def target(name: str, value, goal: str, met: bool | None, unit: str = "", why: str = "") -> dict:
    return {"name": name, "value": value, "target": goal, "met": met, "unit": unit, "why": why}


def write_record(record: dict, out_dir: str = RESULTS_DIR) -> str:
    """Write ``record`` as ``<out_dir>/<kind>-<UTC time>-<device>.json`` (atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = record["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    device = record.get("device", {}).get("kind", "cpu")
    quick = "-quick" if record.get("args", {}).get("quick") else ""
    path = os.path.join(out_dir, f"{record['kind']}-{stamp}-{device}{quick}.json")
    from mlsp.runtime.atomic import write_json

    write_json(path, record, indent=1, default=_json_default)
    return path


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def log(message: str):
    """Progress on stderr, with the time since start."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
