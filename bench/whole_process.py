"""mlsp against the naive way as whole processes (issue 23): start, build, extract, write, exit.

    python bench/whole_process.py [--reps 3] [--config iv3:narrow] [--out bench/results/]

The set: 24 generated JPEGs of 12 AVA-like sizes (each size twice, as AVA repeats its common
sizes), random backbone weights (nothing is downloaded). Each repetition runs, one after the
other, in fresh processes, on a machine first waited quiet:

* ``naive``: ``naive_process.py`` (one ``model.predict`` per view, decode in the main thread)
  with TensorFlow's own ``TF_ENABLE_ONEDNN_OPTS`` default of this machine: what a user of plain
  TensorFlow gets;
* ``naive-onednn``: the same with ``TF_ENABLE_ONEDNN_OPTS=1`` (only where that is not already
  the default): how much of the difference is TensorFlow's switch, how much mlsp's extraction;
* ``mlsp``: the real command, ``cli.py extract``, with its forward cache warm (every run after
  the first on a machine);
* ``mlsp-first``: the same with the cache off (``MLSP_FORWARD_CACHE=0``): a first run.

Each process is timed by the wall clock around it, its CPU seconds come from ``RUSAGE_CHILDREN``
and the other processes' load from ``/proc/stat``. The ratio is the median over the repetitions of
naive / mlsp within one repetition (the machine's speed drifts over minutes).
Writes ``<out>/whole-<time>-cpu.json``; ``report.py`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from common import log  # noqa: E402
from pictures import write_set  # noqa: E402

#: 12 sizes (height, width) common in AVA: landscape and portrait 4:3 and 3:2, square, 640-wide.
AVA_SIZES = [(333, 500), (375, 500), (500, 375), (500, 333), (400, 600), (450, 600), (600, 400), (497, 629),
             (480, 640), (427, 640), (640, 480), (500, 500)]
TARGET = 1.8  # whole-process time of the naive way / mlsp's, same set, same precision (issue 23)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list, env: dict) -> dict:
    """Run one process; its wall and CPU seconds and the CPU other processes used meanwhile."""
    common.wait_quiet(60.0, 0.15)
    s0, c0, t0 = common.proc_stat(), children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu, s1 = time.perf_counter() - t0, children_cpu() - c0, common.proc_stat()
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    other = max(0.0, (s1[0] - s0[0] - cpu) / wall) if s0 and s1 else None
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "other_cores": None if other is None else round(other, 3),
            "stderr_tail": done.stderr.strip().splitlines()[-2:]}


def tf_default_onednn(python: str) -> str:
    """TensorFlow's own oneDNN default on this machine ('1' or '0'), asked of a process without mlsp."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = subprocess.run([python, "-c", "from tensorflow.python.util import _pywrap_util_port as p;"
                          "print(int(p.IsMklEnabled()))"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--config", default="iv3:narrow", help="net:pooling (default iv3:narrow, the issue's)")
    p.add_argument("--per-size", type=int, default=2, help="images of each of the 12 sizes (default 2: 24 images)")
    p.add_argument("--out", default=common.RESULTS_DIR)
    p.add_argument("--no-naive-onednn", action="store_true", help="skip the naive way with oneDNN forced on")
    args = p.parse_args(argv)
    net, pooling = args.config.split(":")
    python = sys.executable
    record = common.new_record("whole", vars(args))
    tmp = tempfile.mkdtemp(prefix="mlsp-whole-")
    try:
        folder = os.path.join(tmp, "images")
        write_set(folder, [hw for hw in AVA_SIZES for _ in range(args.per_size)], seed=0)
        default = tf_default_onednn(python)
        base = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "MLSP_FORWARD_CACHE")}
        base.update(KERAS_HOME=os.path.join(tmp, "keras"), TF_CPP_MIN_LOG_LEVEL="3")
        mlsp_cmd = [python, os.path.join(common.ROOT, "cli.py"), "extract", "--images", folder, "--net", net,
                    f"--{pooling}", "--weights", "random:0", "--test-fraction", "0", "--out"]
        naive_cmd = [python, os.path.join(HERE, "naive_process.py"), folder, "--net", net, "--pooling", pooling]
        ways = {
            "naive": (naive_cmd, {"TF_ENABLE_ONEDNN_OPTS": default}),
            "mlsp": (mlsp_cmd, {}),
            "mlsp-first": (mlsp_cmd, {"MLSP_FORWARD_CACHE": "0"}),
        }
        if default != "1" and not args.no_naive_onednn:
            ways["naive-onednn"] = (naive_cmd, {"TF_ENABLE_ONEDNN_OPTS": "1"})
        log(f"TensorFlow's oneDNN default here: {default}; warming mlsp's forward cache")
        timed(mlsp_cmd + [os.path.join(tmp, "warm.h5")], base)
        runs: dict = {name: [] for name in ways}
        for rep in range(args.reps):
            for name, (cmd, env) in ways.items():
                out = os.path.join(tmp, f"{name}-{rep}.h5")
                if name.startswith("naive"):
                    cmd = cmd[:3] + [out] + cmd[3:]
                else:
                    cmd = cmd + [out]
                res = timed(cmd, {**base, **env})
                os.remove(out)
                runs[name].append(res)
                log(f"rep {rep + 1}/{args.reps} {name}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, "
                    f"other processes {res['other_cores']} cores")
        summary = {}
        for name, rows in runs.items():
            walls = [r["wall_s"] for r in rows]
            summary[name] = {"wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
                             "wall_s_max": max(walls), "cpu_s_median": statistics.median(r["cpu_s"] for r in rows),
                             "max_other_cores": max((r["other_cores"] or 0) for r in rows)}
        # each repetition's naive run over the mlsp run next to it: the machine's speed drifts over
        # minutes (other virtual machines), and runs side by side see the same machine
        def paired(num: str, den: str) -> list:
            return [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(runs[num], runs[den])]

        pairs = {name: paired("naive", name) for name in runs if name.startswith("mlsp")}
        if "naive-onednn" in runs:
            pairs["mlsp_vs_naive_onednn"] = paired("naive-onednn", "mlsp")
        ratios = {name: statistics.median(values) for name, values in pairs.items()}
        record["figures"]["whole_process"] = {"images": len(AVA_SIZES) * args.per_size, "sizes": AVA_SIZES,
                                              "config": args.config, "tf_onednn_default": default, "runs": runs,
                                              "summary": summary, "paired_ratios": pairs, "ratios": ratios}
        record["targets"].append(common.target(
            "whole_process_vs_naive", ratios["mlsp"], f">= {TARGET}", ratios["mlsp"] >= TARGET, "x",
            "whole processes, naive with TensorFlow's default / mlsp extract (forward cache warm), wall, "
            f"median of the repetitions' pairs {pairs['mlsp']}"))
        record["seconds"] = round(time.perf_counter() - T0, 1)
        path = common.write_record(record, args.out)
        log(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
        log(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


T0 = time.perf_counter()

if __name__ == "__main__":
    main()
