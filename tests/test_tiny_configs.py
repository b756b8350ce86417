"""Every recipe has a tiny config, and the tiny configs run as written, one after the other (each reads what the
ones before it wrote), in a folder holding a small demo data set: the user's smoke check, with no overrides."""

import csv
import json

import pytest
from safetensors.torch import load_file

from medcap import cli
from medcap.data.demo_builder import build_demo
from medcap.data.demo_vqa import build_demo_vqa

CHAIN = ["finetune_vision", "generate", "evaluate", "finetune", "merge", "build_index", "nearest_caption",
         "knn_fewshot", "synthesize", "train_fuser", "fuse", "prepare_data", "vqa"]


def test_every_recipe_has_a_tiny_config_in_the_chain():
    configs = cli.config_recipes()
    assert {r for r in cli.recipe_names() if f"tiny/{r}" in configs.get(r, [])} == set(cli.recipe_names())
    assert sorted(CHAIN) == cli.recipe_names()


def _ids(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [row["ID"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_chain")
    build_demo(root / "datasets" / "demo", seed=0, n_train=16, n_val=8, n_test=8)
    build_demo_vqa(root / "datasets" / "demo", split="test")
    return root


def test_the_tiny_configs_run_as_written_one_after_the_other(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the configs' relative paths (datasets/demo, outputs/tiny) resolve here
    for recipe in CHAIN:
        cli.run_recipe(recipe, f"tiny/{recipe}", [])  # a non-zero exit raises SystemExit

    out = workdir / "outputs" / "tiny"
    test_ids = [json.loads(line)["id"] for line in (workdir / "datasets/demo/test.jsonl").read_text().splitlines()]
    assert {k.split(".")[0] for k in load_file(out / "train/checkpoints/step_000008/model.safetensors")} == {
        "encoder", "projector"}
    for run in ("generate", "nearest_caption", "knn_fewshot", "synthesize", "fuse"):
        assert _ids(out / run / "predictions.csv") == test_ids, run
    assert 0.0 <= json.loads((out / "evaluate/metrics.json").read_text())["BLEU-4"] <= 1.0

    adapters = load_file(out / "finetune/checkpoints/step_000008/model.safetensors")
    assert any(".lora_a." in k for k in adapters) and not any(k.startswith("encoder.") for k in adapters)
    merged = json.loads((out / "merged/config.json").read_text())
    assert merged["architectures"] == ["LlamaForCausalLM"] and (out / "merged/model.safetensors").is_file()

    with open(out / "knn_fewshot/neighbours.csv", newline="", encoding="utf-8") as f:
        ranked = [row for row in csv.DictReader(f) if row["rank"] != "0"]  # rank 0: an image without examples
    assert {row["ID"] for row in ranked} == set(test_ids)  # every image had examples
    assert (out / "fuser/checkpoints/step_000006/model.safetensors").is_file()
    vqa = json.loads((out / "vqa/metrics.json").read_text())
    assert 0.0 <= vqa["accuracy"] <= 1.0
