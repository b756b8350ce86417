"""Real-weight configs as a user runs them: the config's own builder reading tiny local folders in the published
layouts (Hugging Face Llama, CLIP, Swin), only paths and sizes overridden. LLaVA stage 1 -> stage 2 through
init_from; MeGPT's dynamic prompts from training to generation after the Swin folder has moved."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medcap import cli
from tests.test_formats import write_llava
from tests.test_layouts import clip_dir, llama2_dir, llama3_2_dir, swin_dir  # noqa: F401 (fixtures)

CPU = ["device=cpu", "dtype=fp32", "num_workers=0"]


def projector(folder):
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("projector.")}


def test_llava_stage_2_starts_from_stage_1s_projector(tmp_path, llama3_2_dir, clip_dir):  # noqa: F811
    data = write_llava(tmp_path / "llava")
    common = [f"llm_dir={llama3_2_dir[0]}", f"vision_dir={clip_dir[0]}", f"data_dir={data}", *CPU, "batch_size=1",
              "gradient_accumulation_steps=1", "max_steps=2", "save_every=2", "eval_every=2"]
    cli.run_recipe("finetune", "llava/stage1_projector", [*common, f"output_dir={tmp_path / 'stage1'}"])
    stage1 = projector(tmp_path / "stage1" / "checkpoints" / "step_000002")
    cli.run_recipe("finetune", "llava/stage2_lora", [*common, f"output_dir={tmp_path / 'stage2'}",
                                                      f"init_from={tmp_path / 'stage1' / 'checkpoints'}"])
    folder = tmp_path / "stage2" / "checkpoints" / "step_000002"
    saved = load_file(folder / "model.safetensors")
    assert any(".lora_a." in k for k in saved if k.startswith("decoder."))
    stage2 = projector(folder)
    assert stage2.keys() == stage1.keys()
    # two steps at lr 2e-5 from stage 1's projector, not from a new initialisation
    assert all((stage2[k] - stage1[k]).abs().max() < 1e-3 for k in stage1)
    assert any(not torch.equal(stage2[k], stage1[k]) for k in stage1)


def write_iuxray(root, studies: int):
    """R2Gen's IU X-Ray layout with ``studies`` training studies of two views (dynamic prompts need 8 or more)."""
    reports = ["Heart size is normal. No pleural effusion.", "Mild cardiomegaly. Small left pleural effusion.",
               "Lungs are clear.", "Right lower lobe opacity, possible pneumonia."]
    splits = {"train": range(studies), "val": range(studies, studies + 2), "test": range(studies + 2, studies + 4)}
    annotation = {split: [{"id": f"CXR{n}", "report": reports[n % 4], "split": split,
                           "image_path": [f"CXR{n}/0.png", f"CXR{n}/1.png"]} for n in numbers]
                  for split, numbers in splits.items()}
    for items in annotation.values():
        for item in items:
            for i, path in enumerate(item["image_path"]):
                (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (24, 20), 20 * (int(item["id"][3:]) % 10) + 40 * i).save(root / "images" / path)
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


def test_megpt_dynamic_prompts_generate_after_the_swin_folder_moved(tmp_path, llama2_dir, swin_dir):  # noqa: F811
    data = write_iuxray(tmp_path / "iuxray", 12)
    swin = shutil.copytree(swin_dir[0], tmp_path / "swin")
    cli.run_recipe("finetune", "megpt/iuxray_prompt", [
        f"llm_dir={llama2_dir[0]}", f"vision_checkpoint={swin}", f"data_dir={data}", f"output_dir={tmp_path / 'run'}",
        *CPU, "batch_size=1", "max_steps=2", "eval_every=2", "save_every=2", "val_generation.batch_size=1",
        "val_generation.min_new_tokens=1", "val_generation.max_new_tokens=3"])
    clusters = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "prompt_clusters.json").read_text())
    assert clusters["source"]["encoder"]["checkpoint"] == str(swin)
    (tmp_path / "models").mkdir()
    moved = swin.rename(tmp_path / "models" / "swin")
    out = tmp_path / "generated"
    cli.run_recipe("generate", "megpt/generate_iuxray", [
        f"llm_dir={llama2_dir[0]}", f"vision_checkpoint={moved}", f"data_dir={data}",
        f"checkpoint={tmp_path / 'run' / 'checkpoints'}", f"output_dir={out}", *CPU, "batch_size=2",
        "min_new_tokens=1", "max_new_tokens=3", "model.fem=null"])
    with (out / "predictions.csv").open(newline="") as f:
        assert [row["ID"] for row in csv.DictReader(f)] == ["CXR14", "CXR15"]
    with pytest.raises(FileNotFoundError, match="vision checkpoint not found"):  # the recorded path is gone
        cli.run_recipe("generate", "megpt/generate_iuxray", [
            f"llm_dir={llama2_dir[0]}", f"vision_checkpoint={moved}", f"data_dir={data}",
            f"checkpoint={tmp_path / 'run' / 'checkpoints'}", f"output_dir={out}", *CPU, "model.fem=null",
            "feature_encoder=null", "max_new_tokens=2"])
