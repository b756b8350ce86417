"""benchmarks/vs_transformers.py on a tiny random model: the script a GPU session runs on the 8B shape, run here
through the same code (transformers' Llama built from our weights in memory is the oracle for tokens and loss);
the other benchmarks' measuring functions on tiny models, on the CPU."""

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_vs_transformers_runs_a_model_shape_given_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "benchmarks/vs_transformers.py", "--model", "tiny_llama3_biomedclip", "--reps", "1",
         "--decode-shapes", "3x4", "--train-shapes", "2x20", "--compiled-peer", "--only", "greedy", "beam",
         "train_medcap"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in proc.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| work")}
    assert set(table) == {"greedy 3x4", "beam 3 (R2GenGPT) 3x4", "train medcap 2x20"}
    assert table["greedy 3x4"][4] == "tokens identical" and table["beam 3 (R2GenGPT) 3x4"][4] == "tokens identical"
    assert "new tokens/s; transformers static cache" in table["greedy 3x4"][5]
    assert "tokens identical)" in table["greedy 3x4"][5]
    first = table["train medcap 2x20"][4].removeprefix("first loss ").split(" vs ")
    assert first[0] == first[1]  # the same weights, the same batch: the same loss before any step
    assert "TFLOP per step; medcap" in table["train medcap 2x20"][5]


def test_vs_transformers_times_the_compiled_training_step():
    def train_row(*extra):
        proc = subprocess.run(
            [sys.executable, "benchmarks/vs_transformers.py", "--model", "tiny_llama3_biomedclip", "--reps", "1",
             "--train-shapes", "2x20", "--only", "train_medcap", *extra], capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TORCH_COMPILE_BACKEND": "aot_eager"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("(training steps compiled in both engines" in proc.stdout) == bool(extra)
        return next(line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| train medcap"))

    eager, compiled = train_row(), train_row("--compile")
    first = compiled[4].removeprefix("first loss ").split(" vs ")
    assert first[0] == first[1] == eager[4].removeprefix("first loss ").split(" vs ")[0]
    flops = [row[5].split(" TFLOP per step")[0] for row in (eager, compiled)]
    assert flops[0] == flops[1] and float(flops[0]) > 0  # counted eagerly either way


def test_depthwise_backward_benchmark_times_both_and_gets_the_same_image_gradient():
    proc = subprocess.run([sys.executable, "benchmarks/depthwise_backward.py", "--batch", "1", "--reps", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["medcap", "timm (bf16 depthwise backward)"]
    assert lines[3].strip().startswith("medcap vs timm: ") and lines[3].endswith("image gradients identical")


def test_vs_transformers_refuses_the_cpu_clock_on_a_gpu():
    proc = subprocess.run([sys.executable, "benchmarks/vs_transformers.py", "--clock", "cpu", "--device", "cuda"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=600)
    assert proc.returncode == 2 and "use it only with --device cpu --threads 1" in proc.stderr


def test_cuda_check_trains_the_demo_step_on_a_cpu():
    from benchmarks.cuda_check import demo_architecture_step

    result = demo_architecture_step("tiny_demo", "cpu", batch=2, seq=12, steps=2, warmup=1)
    assert result["image_tokens"] == 4 and result["timed_steps"] == 1
    assert result["median_step_s"] > 0 and result["peak_memory_mb"] > 0 and math.isfinite(result["first_loss"])


def test_loss_memory_peer_and_medcap_compute_the_same_loss():
    from benchmarks import loss_memory

    losses = [loss_memory.measure(argparse.Namespace(one=variant, dtype="fp32", batch=1, length=24, labelled=8,
                                                     dim=64))["loss"] for variant in loss_memory.VARIANTS]
    assert max(losses) - min(losses) < 1e-5


def test_train_methods_times_a_method_and_refuses_a_single_step():
    from benchmarks import train_methods

    row = train_methods.measure(argparse.Namespace(one="medcap", model="tiny_demo", device="cpu", dtype="fp32",
                                                   batch=1, text=4, steps=2, activation_checkpointing=False))
    assert row["step_s"] > 0 and row["peak_mb"] > 0 and row["tokens"] == 8
    proc = subprocess.run([sys.executable, "benchmarks/train_methods.py", "--steps", "1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "--steps must be at least 2" in proc.stderr
