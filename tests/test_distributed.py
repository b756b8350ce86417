"""FSDP2 data parallelism on 2 CPU processes (gloo) against one process on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_train_identical_weights_equal_to_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "fsdp_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path)], check=True, env=env, cwd=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", worker, str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single, rank0, rank1 = (load_file(tmp_path / f"{n}.safetensors") for n in
                            ("world1_rank0", "world2_rank0", "world2_rank1"))
    initial = load_file(tmp_path / "world2_initial.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the ranks hold the same weights
    changed = {k for k in initial if not torch.equal(initial[k], rank0[k])}
    assert any(k.startswith("encoders.image.encoder.") for k in changed)  # the encoder's gradients were reduced
    assert all(k.startswith(("encoders.image.", )) or ".lora_" in k for k in changed)  # frozen LLM untouched
    for k in single:
        assert torch.allclose(single[k], rank0[k], atol=2e-5), k
    losses = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("world1_rank0", "world2_rank0")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_two_ranks_keep_batchnorm_statistics_identical_and_train_bf16_as_the_halves_in_one_process(tmp_path):
    # BatchNorm normalises each rank's half on its own; after every step its running statistics are the halves'
    # mean on every rank. In bf16 the fp32 BatchNorm runs in fp32 under FSDP2 as under autocast in one process.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "fsdp_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path), "bn"], check=True, env=env, cwd=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", worker, str(tmp_path),
                           "bn"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, tol in (("fp32", 1e-6), ("bf16", 1e-6)):
        oracle, rank0, rank1 = (load_file(tmp_path / f"bn_{name}_{n}.safetensors") for n in
                                ("world1_rank0", "world2_rank0", "world2_rank1"))
        stats = [k for k in rank0 if "running_" in k]
        assert stats and oracle.keys() == rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name  # parameters and buffers
        for k in oracle:
            assert torch.allclose(oracle[k].float(), rank0[k].float(), atol=tol), (name, k)
        losses = [json.loads((tmp_path / f"bn_{name}_{n}.json").read_text()) for n in ("world1_rank0", "world2_rank0")]
        assert losses[1] == pytest.approx(losses[0], rel=tol)
