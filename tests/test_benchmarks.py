"""benchmarks/vs_transformers.py on a tiny random model: the script a GPU session runs on the 8B shape, run here
through the same code (transformers' Llama built from our weights in memory is the oracle for tokens and loss)."""

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
        assert ("(medcap's training step compiled)" in proc.stdout) == bool(extra)
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
