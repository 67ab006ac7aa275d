"""Peak RSS of the real command (`cli.py extract`), in fresh processes, as the number of images grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))


CLI_CHILD = """
import json, sys, time
sys.path[:0] = [{root!r}, {here!r}]
import cli, common
marks = []


def progress(total=None, desc="", unit="", **kwargs):
    # the command's progress bar, replaced by one that notes the RSS at each step
    marks.append((desc + ":open", time.perf_counter(), common.rss_mib()))

    class Bar:
        def update(self, n=1):
            marks.append((desc, time.perf_counter(), common.rss_mib()))

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            marks.append((desc + ":close", time.perf_counter(), common.rss_mib()))

    return Bar()

cli.console_progress = progress
try:
    cli.main(sys.argv[2:], standalone_mode=False)
finally:
    # VmHWM: the peak RSS of this process image since exec (ru_maxrss would also count the
    # parent's memory that the child shared between fork and exec)
    hwm = None
    try:
        with open("/proc/self/status") as handle:
            hwm = next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        pass
    with open(sys.argv[1], "w") as handle:
        json.dump(dict(marks=marks, vm_hwm_mib=hwm), handle)
"""


def run_cli_rss(paths, net, pooling, precision, store) -> dict:
    """The real command, ``cli.py extract FILES... --weights random:0``, in a fresh process (its
    progress bar swapped for one that samples the RSS after every image). Peak RSS: the child's
    VmHWM at exit (its peak since exec; wait4's ru_maxrss is not used as the peak, since on Linux
    it also counts the parent's pages the child shared between fork and exec), and the RSS
    during the extraction loop."""
    marks_path = store + ".marks.json"
    code = CLI_CHILD.format(root=common.ROOT, here=HERE)
    cmd = [sys.executable, "-c", code, marks_path, "extract", *paths, "--net", net,
           "--wide" if pooling == "wide" else "--narrow", "--weights", "random:0", "--precision", precision,
           "--out", store]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=common.ROOT)
    # read the pipes in threads and reap the child with wait4, whose rusage is that child's alone
    stdout_data: list = []
    stderr_data: list = []

    def drain(stream, sink):
        for line in iter(stream.readline, b""):
            sink.append(line)

    threads = [threading.Thread(target=drain, args=(proc.stdout, stdout_data), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, stderr_data), daemon=True)]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in threads:
        th.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"cli.py extract ... failed ({proc.returncode}):\n"
                           + b"".join(stderr_data[-20:]).decode(errors="replace"))
    maxrss = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 1024
    out = {"images": len(paths), "peak_rss_mib": None, "wall_s": round(wall, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "ru_maxrss_wait4_mib": round(maxrss, 1)}
    try:
        with open(marks_path) as handle:
            data = json.load(handle)
        os.remove(marks_path)
        marks = data["marks"]
        if data.get("vm_hwm_mib") is not None:
            out["peak_rss_mib"] = round(data["vm_hwm_mib"], 1)
        loop = [m[2] for m in marks if m[0] == "extract"]
        merge = [m[2] for m in marks if m[0].startswith("write store")]
        out.update(rss_first_image_mib=round(loop[0], 1), rss_loop_max_mib=round(max(loop), 1),
                   rss_loop_end_mib=round(loop[-1], 1), rss_merge_max_mib=round(max(merge), 1) if merge else None,
                   rss_per_image_mib=[round(v, 1) for v in loop])
    except (OSError, ValueError, IndexError, KeyError):
        pass
    if out["peak_rss_mib"] is None:  # no /proc (macOS): the best there is
        out["peak_rss_mib"] = round(maxrss, 1)
    return out
