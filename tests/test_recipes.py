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

    import recipes.finetune  # finetune_vision runs recipes.finetune.main, which calls the name imported there

    monkeypatch.setattr(recipes.finetune, "train", spy)
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


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(data, tmp_path):
    """A run killed with SIGKILL mid-training and restarted with resume_from=auto ends with the weights of an
    uninterrupted run: same data order, optimizer, scheduler and RNG (LoRA dropout draws from it)."""
    import signal
    import time

    def args(out):
        return ["run", "finetune_vision", "--config", "tiny/finetune_vision", f"dataset.manifest={data / 'train.jsonl'}",
                f"output_dir={out}", "max_steps=30", "save_every=3", "val_dataset=null", "~log_every",
                "model.trainable.decoder=lora", "resume_from=auto"]

    run_medcap(*args(tmp_path / "uninterrupted"))
    final = load_file(tmp_path / "uninterrupted" / "checkpoints" / "step_000030" / "model.safetensors")
    assert any(".lora_a." in k for k in final)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "medcap.cli", *args(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000006" / "model.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    assert "step_000030" not in done
    resumed_from = done[-1]
    proc = run_medcap(*args(out))
    assert f"from {out / 'checkpoints' / resumed_from} (step" in proc.stderr + proc.stdout
    resumed = load_file(out / "checkpoints" / "step_000030" / "model.safetensors")
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_resume_refuses_a_run_on_other_samples(data, tmp_path):
    from medcap import cli
    from medcap.checkpoint import CheckpointError

    def args(split, *extra):
        return ["run", "finetune_vision", "--config", "tiny/finetune_vision", f"dataset.manifest={data / split}",
                f"output_dir={tmp_path}", "save_every=2", "val_dataset=null", *extra]

    cli.main(args("train.jsonl", "max_steps=2"))
    state = torch.load(tmp_path / "checkpoints" / "step_000002" / "training_state.pt", weights_only=True)
    with pytest.raises(CheckpointError, match=rf"its run trained on other samples \({state['data']}; this run has "
                                              rf"\d+ samples, sha256 [0-9a-f]{{16}}\)"):
        cli.main(args("val.jsonl", "max_steps=4", "resume_from=auto"))
    assert state["data"].startswith(f"{len((data / 'train.jsonl').read_text().splitlines())} samples, sha256 ")
    cli.main(args("train.jsonl", "max_steps=4", "resume_from=auto"))  # the same samples: resumed
    assert (tmp_path / "checkpoints" / "step_000004").is_dir()


def test_validation_generation_keeps_the_best_checkpoint_and_stops_early(data, tmp_path):
    out = tmp_path / "train"
    run_medcap("run", "finetune", "--config", "tiny/finetune_vision", *data_overrides(data), f"output_dir={out}",
               "max_steps=12", "eval_every=2", "save_every=100", "val_generation.num_samples=4",
               "val_generation.max_new_tokens=4", "select_metric=val_loss", "select_mode=max", "patience=2")
    summary = json.loads((out / "train_summary.json").read_text())
    evaluations = [h for h in summary["history"] if "val_loss" in h]
    assert all({"val_score", "val_BLEU-4", "val_CIDEr"} <= h.keys() for h in evaluations)
    for h in evaluations:
        assert h["val_score"] == pytest.approx(0.5 * h["val_BLEU-4"] + 0.5 * h["val_CIDEr"])
    # select_mode=max on a falling validation loss: the first evaluation stays best, two more end the run
    losses = [h["val_loss"] for h in evaluations]
    best = max(range(len(losses)), key=losses.__getitem__)
    assert summary["stopped_early"] and summary["steps"] < 12
    assert summary["best"] == {"val_loss": losses[best]}
    assert len(evaluations) - 1 - best == 2  # patience
    saved_best = torch.load(out / "checkpoints" / "best" / "training_state.pt", weights_only=True)
    assert saved_best["step"] == evaluations[best]["step"]
    assert (out / "checkpoints" / f"step_{summary['steps']:06d}" / "model.safetensors").is_file()


def test_validation_decoding_takes_beam_keys_and_refuses_sampling_before_training(data, tmp_path):
    from omegaconf import OmegaConf

    from medcap.validation import validation_decoding

    node = OmegaConf.create({"num_samples": 4, "weights": {"CIDEr": 1.0}, "num_beams": 3, "repetition_penalty": 2.0,
                             "penalize_prompt": False, "length_normalization": "hf_4_30", "temperature": 0.0})
    assert validation_decoding(node) == {"num_beams": 3, "repetition_penalty": 2.0, "penalize_prompt": False,
                                         "length_normalization": "hf_4_30"}
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "finetune_vision.yaml")
    config.val_generation.temperature = 0.7  # was silently ignored: validation captions came out greedy
    OmegaConf.save(config, tmp_path / "sampled.yaml")
    out = tmp_path / "train"
    with pytest.raises(ValueError, match=r"val_generation sets \['temperature'\]: .*not sampled; remove temperature"):
        cli.run_recipe("finetune_vision", str(tmp_path / "sampled.yaml"),
                       data_overrides(data) + [f"output_dir={out}", "max_steps=2"])
    assert not (out / "checkpoints").exists()

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


@pytest.mark.parametrize("extra", [["dtype=bf16"], ["optimizer_in_bwd=true", "clip_grad_norm=null"]],
                         ids=["bf16", "optimizer_in_bwd"])
def test_a_run_resumed_from_a_checkpoint_continues_exactly(data, tmp_path, extra):
    """bf16: the fp32 trained weights were loaded into the bf16 model before being cast back, so rounded to bf16;
    optimizer_in_bwd: after loading, the scheduler set learning rates that no inner optimizer read."""
    common = data_overrides(data) + ["max_steps=6", "save_every=3", "eval_every=3", "val_generation.weights=null",
                                     *extra]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cli.run_recipe("finetune", "tiny/finetune", common + [f"output_dir={whole}"])
    cli.run_recipe("finetune", "tiny/finetune", common + [f"output_dir={resumed}",
                                                           f"resume_from={whole / 'checkpoints' / 'step_000003'}"])
    a = load_file(whole / "checkpoints" / "step_000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((out / "train_summary.json").read_text())["history"] for out in (whole, resumed)]
    logged = [[(h["step"], h["loss"], h["lr"]) for h in run] for run in history]
    assert logged[0] == logged[1]
    assert history[0][0]["lr"] == 0.0  # tiny/finetune warms up from 0: step 1 logs the rate it trained with


def test_lr_per_part_names_parts_and_optimizer_in_bwd_refuses_l2(data, tmp_path, caplog):
    base = data_overrides(data) + ["max_steps=1", f"output_dir={tmp_path / 'x'}", "overwrite=true"]
    with pytest.raises(ValueError, match=r"lr_per_part: \['projecter'\] not among the model's parts"):
        cli.run_recipe("finetune", "tiny/finetune", base + ["lr_per_part={projecter: 1e-5}"])
    with caplog.at_level("WARNING"):
        cli.run_recipe("finetune", "tiny/finetune", base + ["lr_per_part={encoder: 1e-5}"])  # its encoder is frozen
    assert "lr_per_part.encoder is not used: the encoder is frozen" in caplog.text
    with pytest.raises(ValueError, match="no l2_lambda"):
        cli.run_recipe("finetune", "tiny/megpt", base + ["optimizer_in_bwd=true", "clip_grad_norm=null"])  # L2 on


def test_finetune_says_how_many_captions_are_cut_to_fit(data, tmp_path, caplog):
    from medcap.models.builders import tiny_demo
    from medcap.text import smollm2_tokenizer

    tokenizer, per_image = smollm2_tokenizer(), tiny_demo().tokens_per_image
    prompt = len(tokenizer.prompt_ids("Write the report for this image.", per_image))
    lengths = {split: [len(tokenizer.answer_ids(json.loads(line)["caption"]))
                       for line in (data / f"{split}.jsonl").read_text().splitlines()] for split in ("train", "val")}
    room = sorted(lengths["train"])[len(lengths["train"]) // 2]  # about half the training captions are longer
    expected = {split: sum(n > room for n in ns) for split, ns in lengths.items()}
    assert 0 < expected["train"] < len(lengths["train"])
    with caplog.at_level("WARNING"):
        cli.run_recipe("finetune", "tiny/finetune", data_overrides(data) + [
            "max_steps=1", f"dataset.max_seq_len={prompt + room}", f"output_dir={tmp_path}", "val_generation=null"])
    assert f"training set: {expected['train']} of 16 captions are cut to fit max_seq_len={prompt + room}" in caplog.text
    assert (f"validation set: {expected['val']} of 8 captions" in caplog.text) == (expected["val"] > 0)


def test_master_dtype_below_dtype_is_refused_before_any_weights_are_read(data, tmp_path, monkeypatch):
    import medcap.runtime

    monkeypatch.setattr(medcap.runtime.config, "instantiate", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="master_dtype=bf16 is less precise than dtype=fp32"):
        cli.run_recipe("finetune", "tiny/finetune", data_overrides(data) + [
            "max_steps=1", f"output_dir={tmp_path}", "master_dtype=bf16"])
