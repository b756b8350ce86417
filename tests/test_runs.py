"""Nothing silent: a new run never mixes with another run's checkpoints, resume takes the newest complete
checkpoint and says why it skipped others, a changed config is refused, `best` never disappears, CUDA asked for
and missing is an error, and errors stop in one line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from medcap import cli, runs
from medcap.checkpoint import (CheckpointError, describe, read_metadata, resolve_checkpoint, save_checkpoint,
                               step_folders)
from medcap.command import check_override_types
from medcap.runtime import device_and_dtype
from medcap.training import save_best
from tests.tiny_vlm import tiny_vlm

ROOT = Path(__file__).resolve().parent.parent


def cfg(**extra):
    return OmegaConf.create({"seed": 0, "batch_size": 4, "gradient_accumulation_steps": 1, "shuffle": True,
                             "model": {"_component_": "tests.tiny_vlm.tiny_vlm"},
                             "dataset": {"manifest": "/data/train.jsonl"}, **extra})


def write(folder: Path, step: int, config, run_id="run-a", world=1, prefix="step"):
    model = tiny_vlm()
    state = {"step": step, "optimizer": {}, "scheduler": {}, "rng": [{}], "history": "[]", "world_size": world}
    save_checkpoint(model, folder / f"{prefix}_{step:06d}", config, state, run_id=run_id, step=step)
    return folder / f"{prefix}_{step:06d}"


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    write(tmp_path / "checkpoints", 2, cfg())
    with pytest.raises(CheckpointError, match=r"checkpoints holds another run's checkpoints \(step_000002\).*"
                                              r"resume_from=auto.*overwrite=true"):
        runs.start(cfg(resume_from=None), tmp_path)
    run_id, resume = runs.start(cfg(resume_from="auto"), tmp_path)
    assert run_id == "run-a" and resume == tmp_path / "checkpoints" / "step_000002"
    run_id, resume = runs.start(cfg(resume_from=None, overwrite=True), tmp_path)
    assert resume is None and run_id != "run-a" and not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_records_its_run_and_step(tmp_path):
    folder = write(tmp_path, 7, cfg(), run_id="20261201-abc")
    assert read_metadata(folder)["run_id"] == "20261201-abc" and read_metadata(folder)["step"] == 7
    assert describe(folder) == f"{folder} (run 20261201-abc, step 7)"


def test_resume_skips_incomplete_and_corrupt_checkpoints_and_says_why(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    write(ck, 2, cfg())
    newest = write(ck, 4, cfg())
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated by a full disk
    (ck / "step_000006").mkdir()  # a folder without weights
    (ck / "step_000008.tmp").mkdir()  # a save interrupted by a kill
    _, resume = runs.start(cfg(resume_from="auto"), tmp_path)
    assert resume == ck / "step_000002"
    log = caplog.text
    assert "skipping" in log and "step_000006: no model.safetensors" in log
    assert "step_000004: model.safetensors:" in log and "header describes" in log
    assert "step_000008" not in log


def test_resume_auto_with_only_broken_checkpoints_refuses_instead_of_starting_over(tmp_path):
    (tmp_path / "checkpoints" / "step_000003").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoints"):
        runs.start(cfg(resume_from="auto"), tmp_path)
    # an interrupted first save alone is no checkpoint: a new run starts
    (tmp_path / "checkpoints" / "step_000003").rmdir()
    (tmp_path / "checkpoints" / "step_000001.tmp").mkdir()
    assert runs.start(cfg(resume_from="auto"), tmp_path)[1] is None


@pytest.mark.parametrize("change, named", [({"batch_size": 8}, "batch_size: 4 -> 8"), ({"seed": 1}, "seed: 0 -> 1"),
                                           ({"model": {"_component_": "x.y"}}, "model._component_"),
                                           ({"tokenizer": {"max_seq_len": 64}}, "tokenizer: None -> "),
                                           ({"dynamic_prompts": {"k": 8}}, "dynamic_prompts: None -> ")])
def test_resume_refuses_a_config_that_changes_the_data_order_or_the_model(tmp_path, change, named):
    write(tmp_path / "checkpoints", 2, cfg())
    with pytest.raises(CheckpointError, match=f"cannot resume .*{named}"):
        runs.start(cfg(resume_from="auto", **change), tmp_path)
    # a moved data folder is not a change of the data order
    runs.start(cfg(resume_from="auto", dataset={"manifest": "/mnt/elsewhere/train.jsonl"}), tmp_path)


def test_best_is_replaced_atomically_and_always_names_a_complete_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    model = tiny_vlm()
    writer = lambda path, step: save_checkpoint(model, path, step=step)  # noqa: E731
    save_best(ck, 3, writer)
    assert (ck / "best").is_symlink() and (ck / "best" / "model.safetensors").is_file()
    save_best(ck, 6, writer)
    assert os.readlink(ck / "best") == "best_step_000006" and read_metadata(ck / "best")["step"] == 6
    assert sorted(p.name for p in ck.iterdir()) == ["best", "best_step_000006"]


def test_cuda_asked_for_and_missing_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="device=cuda but torch sees no working CUDA device.*device=cpu"):
        device_and_dtype(OmegaConf.create({"device": "cuda", "dtype": "fp32"}))


def test_a_wrong_typed_override_stops_in_one_line_before_anything_is_built():
    config = ROOT / "configs" / "tiny" / "finetune.yaml"
    with pytest.raises(SystemExit, match=r"batch_size=abc: batch_size must be an integer \(the config finetune.yaml "
                                         r"has 4\)"):
        check_override_types(["--config", str(config), "batch_size=abc"])
    with pytest.raises(SystemExit, match="enable_activation_checkpointing must be true or false"):
        check_override_types(["--config", str(config), "enable_activation_checkpointing=maybe"])
    check_override_types(["--config", str(config), "batch_size=8", "optimizer.lr=1e-4", "resume_from=auto",
                          "max_steps=null", "clip_grad_norm=2"])


def command(*args, debug=False):
    env = {k: v for k, v in os.environ.items() if k not in ("MEDCAP_DEBUG", "PYTHONPATH")}
    if debug:
        env["MEDCAP_DEBUG"] = "1"
    return subprocess.run([str(Path(sys.executable).parent / "medcap"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_errors_stop_in_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["run", "generate", "--config", "tiny/generate", f"dataset.manifest={tmp_path / 'none.jsonl'}",
            "checkpoint=null", f"output_dir={tmp_path / 'out'}"]
    proc = command(*args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medcap: error:")]
    assert len(errors) == 1 and "none.jsonl" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "Traceback" in command(*args, debug=True).stderr
    typed = command("run", "finetune", "--config", "tiny/finetune", "batch_size=abc")
    assert typed.returncode == 1 and "batch_size must be an integer" in typed.stderr and "Traceback" not in typed.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_steps_below_one_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=f"max_steps must be at least 1, got {value}"):
        cli.run_recipe("finetune", "tiny/finetune", [f"max_steps={value}", f"output_dir={tmp_path}"])


def test_a_shared_index_cannot_make_medcap_run_code(tmp_path):
    from medcap.retrieval import embedder_from_source

    marker = tmp_path / "pwned"
    source = {"encoder": {"_component_": "subprocess.call", "args": [["touch", str(marker)]]}, "checkpoint": None}
    with pytest.raises(ValueError, match=r"meta.json: encoder._component_ = 'subprocess.call' is not allowed"):
        embedder_from_source(source, torch.device("cpu"), torch.float32, read_from=tmp_path / "meta.json")
    # a path that starts like a builder module but leaves it is refused too
    source["encoder"]["_component_"] = "medcap.models.builders.os.system"
    with pytest.raises(ValueError, match="is not allowed"):
        embedder_from_source(source, torch.device("cpu"), torch.float32, read_from=tmp_path / "meta.json")
    assert not marker.exists()


def test_merge_never_builds_what_a_checkpoint_config_names(tmp_path):
    from tests.test_merge import adapted
    from medcap.models import builders

    marker = tmp_path / "pwned"
    model = adapted(builders.tiny_llama2_swin)
    evil = OmegaConf.create({"model": {"_component_": "subprocess.call", "args": [["touch", str(marker)]]}})
    save_checkpoint(model, tmp_path / "run" / "step_000001", evil)
    with pytest.raises(ValueError, match=r"config.yaml records another model than this config builds: "
                                         r"model._component_: 'subprocess.call'"):
        cli.run_recipe("merge", "demo/merge", [f"checkpoint={tmp_path / 'run'}", f"output_dir={tmp_path / 'out'}",
                                               "model._component_=medcap.models.builders.tiny_llama2_swin",
                                               "~model.projector", "~model.max_seq_len", "~model.image_grid"])
    assert not marker.exists()


def test_generate_loads_a_lora_run_without_overrides(tmp_path):
    from tests.test_merge import adapted
    from medcap.models import builders
    from medcap.runtime import setup_model_and_tokenizer

    model = adapted(builders.tiny_demo)  # decoder LoRA r4 on q/k/v/w2, as a run of tiny/finetune would save
    save_checkpoint(model, tmp_path / "ck", OmegaConf.create({}))
    cfg = OmegaConf.load(ROOT / "configs" / "tiny" / "generate.yaml")  # no trainable, no lora
    torch.manual_seed(0)  # the tiny model is random: the same base weights as the run's
    loaded, _ = setup_model_and_tokenizer(cfg, torch.device("cpu"), torch.float32, checkpoint=tmp_path / "ck")
    tokens = torch.randint(2, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(tokens), model(tokens), atol=1e-5)
    # a config that sets another mode for that part is told which override to use
    cfg.model.trainable = {"decoder": "full"}
    with pytest.raises(ValueError, match=r"model.trainable.decoder=lora model.lora.decoder.rank=4"):
        setup_model_and_tokenizer(cfg, torch.device("cpu"), torch.float32, checkpoint=tmp_path / "ck")


def header_only(header) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b"\xff" * 8 + b[8:], r"header size 18446744073709551615 exceeds the file \(\d+ bytes\)"),
    (lambda b: b[:5], r"5 bytes, too short for a safetensors file"),
    (lambda b: header_only([1, 2]), r"the header is not a JSON object"),
    (lambda b: header_only({"x": [1, 2]}), r"header entry 'x' has no data_offsets \[begin, end\]"),
    (lambda b: header_only({"x": {"dtype": "F32", "data_offsets": [0, "8"]}}), r"header entry 'x' has no data_"),
    (lambda b: header_only({"x": {"dtype": "F32", "data_offsets": [0, 8, 9]}}), r"header entry 'x' has no data_"),
])
def test_resume_skips_a_checkpoint_whose_weights_header_is_damaged(tmp_path, caplog, damage, problem):
    ck = tmp_path / "checkpoints"
    write(ck, 2, cfg())
    weights = write(ck, 4, cfg()) / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _, resume = runs.start(cfg(resume_from="auto"), tmp_path)
    assert resume == ck / "step_000002"
    assert re.search(rf"skipping {re.escape(str(ck))}/step_000004: model.safetensors: {problem}", caplog.text)


def test_resume_auto_with_only_a_best_checkpoint_names_the_override_that_resumes_it(tmp_path):
    ck = tmp_path / "checkpoints"
    best = write(ck, 50, cfg(), prefix="best_step")
    (ck / "best").symlink_to(best.name)
    with pytest.raises(CheckpointError) as refused:
        runs.start(cfg(resume_from="auto"), tmp_path)
    message = str(refused.value)
    assert message.startswith(f"resume_from=auto: {ck} holds no step_* checkpoint to resume (it holds best, "
                              f"best_step_000050)")
    assert f"pass resume_from={best} to resume from the best one" in message and "resume_from=auto to" not in message
    run_id, resume = runs.start(cfg(resume_from=str(best)), tmp_path)  # the advice works
    assert resume == best and run_id == "run-a"
    run_id, resume = runs.start(cfg(resume_from="auto", overwrite=True), tmp_path)  # and so does the other one
    assert resume is None and run_id != "run-a" and not ck.exists()


def test_resume_auto_with_only_incomplete_checkpoints_honours_overwrite(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "step_000100").mkdir(parents=True)
    best = write(ck, 50, cfg(), prefix="best_step")
    with pytest.raises(CheckpointError, match=rf"resume_from=auto: no complete checkpoint in {ck} \(see the "
                                              rf"warnings\); pass resume_from={best} to resume from the best one, "
                                              rf"overwrite=true to start a new run there"):
        runs.start(cfg(resume_from="auto"), tmp_path)
    assert (ck / "step_000100").is_dir()
    run_id, resume = runs.start(cfg(resume_from="auto", overwrite=True), tmp_path)
    assert resume is None and run_id != "run-a" and not ck.exists()


def test_checkpoints_are_ordered_by_step_past_999999(tmp_path):
    ck = tmp_path / "checkpoints"
    write(ck, 999999, cfg())
    write(ck, 1000000, cfg())
    (ck / "step_latest").mkdir()  # not a step number: not a checkpoint of a run
    assert [p.name for p in step_folders(ck)] == ["step_999999", "step_1000000"]
    assert runs.start(cfg(resume_from="auto"), tmp_path)[1] == ck / "step_1000000"
    assert resolve_checkpoint(ck) == ck / "step_1000000"


@pytest.mark.parametrize("meta, field, problem", [
    ({"step": "12a"}, "step", "is not an integer: '12a'"),
    ({"trainable": "{encoder: full"}, "trainable", "is not valid JSON"),
    ({"trainable": '["encoder"]'}, "trainable", "must map each part to its mode"),
    ({"trainable": '{"encoder": 1}'}, "trainable", "must map each part to its mode"),
    ({"lora": "nope"}, "lora", "is not valid JSON"),
    ({"lora": '{"decoder": 4}'}, "lora", "must map each part to its settings"),
])
def test_bad_checkpoint_metadata_is_an_error_naming_the_file_and_the_field(tmp_path, meta, field, problem):
    weights = tmp_path / "model.safetensors"
    save_file({"encoder.w": torch.zeros(1)}, weights, metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: metadata field {field!r} {problem}")):
        read_metadata(tmp_path)
    assert describe(tmp_path) == str(tmp_path)


def test_resolve_checkpoint_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    oldest = write(tmp_path, 100, cfg())
    newest = write(tmp_path, 200, cfg())
    for folder in (newest, oldest):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])  # lost on a power failure
        if folder == newest:
            assert resolve_checkpoint(tmp_path) == oldest
            assert f"skipping {newest}: model.safetensors: " in caplog.text and "header describes" in caplog.text
    with pytest.raises(CheckpointError, match=rf"no complete checkpoint in {tmp_path}: step_000200: model.safetensors: "
                                              rf"\d+ bytes, its header describes \d+; step_000100: "):
        resolve_checkpoint(tmp_path)
