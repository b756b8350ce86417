"""Recipes under torchrun (2 CPU processes, gloo) as a user launches them, and `tune run` typed from the repo root
with no PYTHONPATH: the model built on the meta device and filled from rank 0 trains like one process on the same
global batch, validation split across ranks gives the single-process figures, a run resumed under torchrun ends
with the uninterrupted run's weights (every rank's RNG restored), and every recipe resolves `recipes` to this
project's folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcap import cli
from medcap.data.demo_builder import build_demo

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    build_demo(root / "datasets" / "demo", seed=0, n_train=16, n_val=8, n_test=8)
    return root


def medcap(workdir, *args, env=None):
    proc = subprocess.run([str(BIN / "medcap"), *args], capture_output=True, text=True, cwd=workdir,
                          env=ENV | (env or {}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def history(out):
    return json.loads((out / "train_summary.json").read_text())["history"]


def test_two_ranks_on_the_meta_device_train_and_validate_as_one_process(workdir):
    common = ["--config", "tiny/finetune", "max_steps=4", "save_every=4", "eval_every=2",
              "model.lora.decoder.dropout=0.0", "val_generation.batch_size=4"]
    medcap(workdir, "run", "finetune", *common, "batch_size=8", "output_dir=one")
    log = medcap(workdir, "run", "finetune", "--nproc_per_node", "2", *common, "batch_size=4", "output_dir=two")
    assert "2 process(es)" in log
    one, two = history(workdir / "one"), history(workdir / "two")
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    for key in ("val_loss", "val_score"):  # each rank scored its share; together the single-process figures
        assert [h[key] for h in two if key in h] == pytest.approx([h[key] for h in one if key in h], rel=1e-5)
    a = load_file(workdir / "one/checkpoints/step_000004/model.safetensors")
    b = load_file(workdir / "two/checkpoints/step_000004/model.safetensors")
    assert a.keys() == b.keys() and any(".lora_a." in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # compile=true: each rank compiles its layers before FSDP2 shards them (AOTAutograd's graphs, no C++ build)
    medcap(workdir, "run", "finetune", "--nproc_per_node", "2", *common, "batch_size=4", "output_dir=compiled",
           "compile=true", env={"TORCH_COMPILE_BACKEND": "aot_eager"})
    assert [h["loss"] for h in history(workdir / "compiled")] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    c = load_file(workdir / "compiled/checkpoints/step_000004/model.safetensors")
    assert c.keys() == a.keys() and all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)


def test_a_run_resumed_under_torchrun_ends_with_the_uninterrupted_weights(workdir):
    # LoRA dropout 0.1 draws from each rank's own RNG (torchtune seeds rank r with seed + r): restoring rank 0's
    # state on both ranks would change rank 1's dropout masks after the resume
    args = ["run", "finetune", "--nproc_per_node", "2", "--config", "tiny/finetune", "max_steps=6", "save_every=3",
            "val_dataset=null", "resume_from=auto"]
    medcap(workdir, *args, "output_dir=whole")
    killed = workdir / "killed" / "checkpoints"
    killed.mkdir(parents=True)  # as if killed after step 3: only that checkpoint was written
    shutil.copytree(workdir / "whole/checkpoints/step_000003", killed / "step_000003")
    (killed / "step_000004.tmp").mkdir()  # a save the kill interrupted
    log = medcap(workdir, *args, "output_dir=killed")
    assert "killed/checkpoints/step_000003 (step 3)" in log
    final = load_file(workdir / "whole/checkpoints/step_000006/model.safetensors")
    resumed = load_file(killed / "step_000006/model.safetensors")
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    state = torch.load(killed / "step_000006/training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_tune_run_as_typed_from_the_repo_root(workdir, tmp_path):
    data = workdir / "datasets/demo/test.jsonl"
    for extra in ([], ["--nproc_per_node", "2"]):
        out = tmp_path / f"gen{len(extra)}"
        proc = subprocess.run([str(BIN / "tune"), "run", *extra, "recipes/generate.py", "--config",
                               "configs/tiny/generate.yaml", "checkpoint=null", f"dataset.manifest={data}",
                               f"output_dir={out}", "max_new_tokens=3"],
                              capture_output=True, text=True, cwd=ROOT, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len((out / "predictions.csv").read_text().splitlines()) == 9


def test_the_finetune_vision_alias_runs_under_torchrun(workdir):
    log = medcap(workdir, "run", "finetune_vision", "--config", "tiny/finetune_vision", "--nproc_per_node", "2",
                 "max_steps=2", "save_every=2", "val_dataset=null", "output_dir=alias")
    assert "2 process(es)" in log and (workdir / "alias/checkpoints/step_000002/model.safetensors").is_file()


def test_bf16_batchnorm_encoder_trains_on_two_ranks_as_one_process_accumulating_the_halves(workdir):
    # the EfficientNet encoder trained in full keeps its BatchNorm in fp32 under FSDP2's bf16 policy, as autocast
    # runs it in one process; BatchNorm normalises per rank, so the oracle accumulates the ranks' halves
    common = ["--config", "tiny/finetune_vision", "dtype=bf16", "max_steps=3", "save_every=3", "val_dataset=null",
              "batch_size=4"]
    medcap(workdir, "run", "finetune", *common, "gradient_accumulation_steps=2", "output_dir=bn1")
    medcap(workdir, "run", "finetune", "--nproc_per_node", "2", *common, "output_dir=bn2")
    one, two = history(workdir / "bn1"), history(workdir / "bn2")
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-3)  # bf16 convolutions
    saved = load_file(workdir / "bn2/checkpoints/step_000003/model.safetensors")
    batchnorm = [k for k in saved if ".bn1." in k and "num_batches" not in k]
    assert batchnorm and all(saved[k].dtype == torch.float32 for k in batchnorm)


def test_every_recipe_imports_as_torchrun_starts_it():
    # torchrun runs a recipe file as a script: its folder first on sys.path, the repo root nowhere on it
    code = ("import runpy, sys\n"
            f"sys.path[0] = {str(ROOT / 'recipes')!r}\n"
            f"for name in {cli.recipe_names()!r}:\n"
            f"    runpy.run_path({str(ROOT / 'recipes')!r} + '/' + name + '.py', run_name='not_main')\n"
            "import recipes\nprint(recipes.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == ROOT / "recipes" / "__init__.py"


def test_qlora_on_two_ranks_quantises_after_sharding_and_trains_as_one_process(workdir):
    # a Llama-3.1-shaped decoder (scaled RoPE rebuilt after the meta build) with NF4 base weights
    from tests.test_tokenizers import LLAMA3_MODEL

    common = ["--config", "tiny/finetune", "max_steps=3", "save_every=3", "val_dataset=null",
              "model.lora.decoder.dropout=0.0", "model.trainable.decoder=qlora",
              "model._component_=medcap.models.builders.tiny_llama3_biomedclip", "model.embed_dim=256",
              "model.projector=pooled_mlp", "tokenizer._component_=medcap.text.llama3_tokenizer",
              f"tokenizer.path={LLAMA3_MODEL}"]
    medcap(workdir, "run", "finetune", *common, "batch_size=8", "output_dir=q1")
    medcap(workdir, "run", "finetune", "--nproc_per_node", "2", *common, "batch_size=4", "output_dir=q2")
    one, two = history(workdir / "q1"), history(workdir / "q2")
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    a = load_file(workdir / "q1/checkpoints/step_000003/model.safetensors")
    b = load_file(workdir / "q2/checkpoints/step_000003/model.safetensors")
    assert a.keys() == b.keys() and any(".lora_b." in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
