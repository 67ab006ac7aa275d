"""bench/bench_gpu.py's CPU smoke run (``--device cpu --images 8``), so that the GPU benchmark,
which the suite cannot run on a GPU, cannot break unnoticed. It runs in a subprocess: the
benchmark runs Keras on PyTorch, which never shares a process with pytest's TensorFlow."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, torch_env


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_gpu_benchmark_smoke_run_writes_every_stage(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--device", "cpu",
                           "--images", "8", "--out", str(tmp_path)],
                          env=torch_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = list(tmp_path.glob("gpu-*-cpu.json"))
    record = json.loads(path.read_text())
    figures = record["figures"]
    assert figures["stages_done"] == ["matmul", "iv3:narrow:float32", "targets"]
    assert record["device"]["device"] == "cpu" and record["device"]["backend"] == "torch"
    assert figures["set"]["images"] == 8 and figures["set"]["distinct_sizes"] == 8
    (row,) = figures["extract"]
    for stage in ("keras_per_size", "native_per_size", "native_bucketed", "whole_process"):
        assert row[stage]["images"] >= 1 and np.isfinite(row[stage]["images_per_s"]) and row[stage]["images_per_s"] > 0
    assert row["whole_process"]["images"] == 8  # the whole process stores every image
    assert row["writer_alone"]["images"] == 8 and row["writer_alone"]["mb_per_s"] > 0
    assert row["model_one_size"]["tflops"] > 0 and row["mixed_cost"] > 0
    assert any("mixed sizes / one size" in t["name"] for t in record["targets"])
