"""The recipes run as a user runs them: `medcap run ...` (and `tune run`) on the tiny configs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medcap.training
from medcap import cli
from medcap.data.demo_builder import build_demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0, n_train=16, n_val=8, n_test=8)
    return out


def data_overrides(data, split="train"):
    if split == "test":
        return [f"dataset.manifest={data / 'test.jsonl'}"]
    return [f"dataset.manifest={data / 'train.jsonl'}", f"val_dataset.manifest={data / 'val.jsonl'}"]


def run_medcap(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_finetune_trains_only_the_vision_side(data, tmp_path, monkeypatch):
    snapshots = {}
    real_train = medcap.training.train

    def spy(model, *args, **kwargs):
        snapshots["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        result = real_train(model, *args, **kwargs)
        snapshots["after"] = model.state_dict()
        return result

    monkeypatch.setattr(medcap.training, "train", spy)
    out = tmp_path / "train"
    cli.run_recipe("finetune_vision", "tiny/finetune_vision",
                   data_overrides(data) + [f"output_dir={out}", "max_steps=10", "save_every=5", "eval_every=5"])

    before, after = snapshots["before"], snapshots["after"]
    decoder_keys = [k for k in before if k.startswith(("decoder.", "tok_embeddings."))]
    assert decoder_keys and all(torch.equal(before[k], after[k]) for k in decoder_keys)
    encoder_keys = [k for k in before if k.startswith("encoders.image.encoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in encoder_keys)

    summary = json.loads((out / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0]
    assert [h["step"] for h in summary["history"] if "val_loss" in h] == [5, 10]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005", "step_000010"]
    saved = load_file(out / "checkpoints" / "step_000010" / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"encoder", "projector"}
    assert (out / "checkpoints" / "step_000010" / "config.yaml").is_file()
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any((out / "logs").iterdir())


def test_resume_after_interruption_reproduces_the_uninterrupted_run(data, tmp_path):
    out = tmp_path / "train"
    args = ["run", "finetune_vision", "--config", "tiny/finetune_vision", f"dataset.manifest={data / 'train.jsonl'}",
            f"output_dir={out}", "max_steps=4", "save_every=2", "val_dataset=null", "~log_every"]
    run_medcap(*args)
    final = load_file(out / "checkpoints" / "step_000004" / "model.safetensors")
    # simulate a kill after step 2: the step-4 checkpoint never got written
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_000004")
    proc = run_medcap(*args, "resume_from=auto")
    assert "resuming from" in proc.stderr + proc.stdout
    resumed = load_file(out / "checkpoints" / "step_000004" / "model.safetensors")
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_generate_writes_predictions_in_manifest_order(data, tmp_path):
    out = tmp_path / "gen"
    run_medcap("run", "generate", "--config", "tiny/generate", "checkpoint=null", *data_overrides(data, "test"),
           f"output_dir={out}", "max_new_tokens=5")
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    manifest_ids = [json.loads(line)["id"] for line in (data / "test.jsonl").read_text().splitlines()]
    assert rows[0] == ["ID", "caption"]
    assert [r[0] for r in rows[1:]] == manifest_ids


def test_plain_tune_run_finds_our_recipes(data, tmp_path):
    out = tmp_path / "gen"
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [str(tune), "run", "recipes/generate.py", "--config", "configs/tiny/generate.yaml", "checkpoint=null",
         *data_overrides(data, "test"), f"output_dir={out}", "max_new_tokens=3"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "predictions.csv").is_file()
