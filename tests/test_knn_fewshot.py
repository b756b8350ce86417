"""kNN few-shot prompts (neighbours as earlier chat turns with their images, or as captions in the prompt) and the
knn_fewshot recipe end to end on a tiny model."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

import medcap.generation
import medcap.retrieval
from medcap import cli
from medcap.data.dataset import image_transform
from medcap.data.images import load_image
from medcap.models.encoders import tiny_efficientnet
from medcap.retrieval import CaptionIndex, fewshot_prompt
from medcap.synthesis import read_neighbours
from medcap.text import IMAGE_PLACEHOLDER as IMG
from medcap.text import llama3_tokenizer, smollm2_tokenizer
from tests.test_retrieval import demo_data, tiny_build_index, trained_tiny_checkpoint  # noqa: F401 (demo_data)
from tests.test_synthesize import tiny_config
from tests.test_tokenizers import LLAMA3_MODEL

USER, END, ASSISTANT = "<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def runs_of(ids, token):
    """(start, length) of each run of ``token`` in ``ids``."""
    runs, start = [], None
    for i, t in enumerate(ids + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_turns_prompt_gives_each_neighbour_a_turn_with_its_image(smollm2):
    ids = fewshot_prompt(smollm2, "Describe.", ["Chest radiograph, normal.", "Head CT, a lesion."], [2, 2], 3,
                         mode="turns")
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        f"{USER}{IMG * 2}Describe.{END}\n{ASSISTANT}Chest radiograph, normal.{END}\n"
        f"{USER}{IMG * 2}Describe.{END}\n{ASSISTANT}Head CT, a lesion.{END}\n"
        f"{USER}{IMG * 3}Describe.{END}\n{ASSISTANT}")
    # placeholders right after each "<|im_start|>user\n" (2 tokens), in the order the images are given
    runs = runs_of(ids, smollm2.image_token_id)
    assert [n for _, n in runs] == [2, 2, 3]
    user = smollm2.encode("user")
    user_starts = [i for i, t in enumerate(ids) if t == smollm2.im_start_id and ids[i + 1:i + 2] == user]
    assert [start for start, _ in runs] == [i + 3 for i in user_starts]  # <|im_start|>, "user", "\n"
    assert ids == (smollm2.prompt_ids("Describe.", 2) + smollm2.answer_ids("Chest radiograph, normal.")
                   + smollm2.followup_ids("Describe.", 2) + smollm2.answer_ids("Head CT, a lesion.")
                   + smollm2.followup_ids("Describe.", 3))


def test_captions_prompt_lists_the_neighbours_captions_in_order(smollm2):
    ids = fewshot_prompt(smollm2, "Describe.", [" Chest radiograph, normal. ", "Head CT, a lesion."], [2, 2], 3,
                         mode="captions", system="Be brief.")
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        f"<|im_start|>system\nBe brief.{END}\n{USER}{IMG * 3}Similar images were described as:\n"
        f"1. Chest radiograph, normal.\n2. Head CT, a lesion.\nDescribe.{END}\n{ASSISTANT}")
    ids = fewshot_prompt(smollm2, "Describe.", ["A.", "B."], [2, 2], 1, mode="captions",
                         captions_template="Examples: {captions}. Now: {prompt}", caption_line="({rank}) {caption}")
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        f"{USER}{IMG}Examples: (1) A.\n(2) B.. Now: Describe.{END}\n{ASSISTANT}")


def test_without_neighbours_both_modes_give_the_plain_prompt(smollm2):
    for mode in ("turns", "captions"):
        assert fewshot_prompt(smollm2, "Describe.", [], [], 4, mode=mode) == smollm2.prompt_ids("Describe.", 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        fewshot_prompt(smollm2, "Describe.", [], [], 4, mode="both")
    with pytest.raises(ValueError, match="2 neighbour captions for 1"):
        fewshot_prompt(smollm2, "Describe.", ["A.", "B."], [2], 4)


def test_turns_prompt_with_llama3_keeps_one_begin_of_text_and_a_system_turn_once():
    tok = llama3_tokenizer(str(LLAMA3_MODEL))
    ids = fewshot_prompt(tok, "Describe.", ["A nodule."], [2], 2, mode="turns", system="Be brief.")
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert tok.decode(ids, skip_special_tokens=False) == (
        f"<|begin_of_text|>{header.format('system')}Be brief.<|eot_id|>{header.format('user')}{IMG * 2}Describe."
        f"<|eot_id|>{header.format('assistant')}A nodule.<|eot_id|>{header.format('user')}{IMG * 2}Describe."
        f"<|eot_id|>{header.format('assistant')}")


@pytest.mark.slow
def test_knn_fewshot_recipe_feeds_neighbour_images_in_prompt_order(demo_data, tmp_path, monkeypatch):  # noqa: F811
    tiny_build_index(demo_data, tmp_path / "index")
    index = CaptionIndex.load(tmp_path / "index")
    calls = []
    real_generate = medcap.generation.generate

    def spy(model, prompts, images, **kwargs):
        calls.append((prompts, images.clone(), kwargs))
        return real_generate(model, prompts, images, **kwargs)

    monkeypatch.setattr(medcap.generation, "generate", spy)
    rebuilt = []
    monkeypatch.setattr(medcap.retrieval, "embedder_from_source", lambda *a: rebuilt.append(a))
    transform = image_transform(tiny_efficientnet())
    tok = smollm2_tokenizer()
    test_rows = [json.loads(line) for line in (demo_data / "test.jsonl").read_text().splitlines()][:3]
    common = [f"index_dir={tmp_path / 'index'}", "checkpoint=null",
              "model._component_=medcap.models.builders.tiny_demo",
              "~model.max_seq_len", "~model.image_grid", f"dataset.manifest={demo_data / 'test.jsonl'}",
              "max_samples=3", "k=2", "max_new_tokens=4", "temperature=0.0"]

    for mode in ("turns", "captions"):
        out = tmp_path / mode
        calls.clear()
        cli.run_recipe("knn_fewshot", "demo/knn_fewshot", common + [f"output_dir={out}", f"mode={mode}"])
        with (out / "neighbours.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [(r["ID"], r["rank"]) for r in rows] == [(s["id"], str(i)) for s in test_rows for i in (1, 2)]
        neighbours = {s["id"]: [r["neighbour_ID"] for r in rows if r["ID"] == s["id"]] for s in test_rows}
        entries = {i: (c, im) for i, c, im in zip(index.ids, index.captions, index.images)}
        with (out / "predictions.csv").open() as f:
            assert [r["ID"] for r in csv.DictReader(f)] == [s["id"] for s in test_rows]

        [(prompts, images, kwargs)] = calls  # one batch of 3
        assert kwargs["max_new_tokens"] == 4 and kwargs["temperature"] == 0.0
        expected_paths = []
        for prompt, sample in zip(prompts, test_rows):
            found = neighbours[sample["id"]]
            captions = [entries[n][0] for n in found]
            text = tok.decode(prompt, skip_special_tokens=False)
            if mode == "turns":
                expected_paths += [p for n in found for p in entries[n][1]]
                assert [n for _, n in runs_of(prompt, tok.image_token_id)] == [4, 4, 4]  # 4 tokens per image
                assert text == (f"{USER}{IMG * 4}Write the report for this image.{END}\n{ASSISTANT}{captions[0]}{END}\n"
                                f"{USER}{IMG * 4}Write the report for this image.{END}\n{ASSISTANT}{captions[1]}{END}\n"
                                f"{USER}{IMG * 4}Write the report for this image.{END}\n{ASSISTANT}")
            else:
                assert [n for _, n in runs_of(prompt, tok.image_token_id)] == [4]
                assert text == (f"{USER}{IMG * 4}Similar images were described as:\n1. {captions[0]}\n"
                                f"2. {captions[1]}\nWrite the report for this image.{END}\n{ASSISTANT}")
            expected_paths.append(str(demo_data / sample["image"]))
        expected = torch.stack([transform(load_image(p)) for p in expected_paths])
        assert torch.equal(images, expected)  # neighbours' images, then the query's, prompt after prompt

    assert rebuilt == []  # the index was built with this model's encoder: the captioner's is reused for queries

    # no neighbour clears the threshold: the plain prompt with the query image only
    calls.clear()
    cli.run_recipe("knn_fewshot", "demo/knn_fewshot", common + [f"output_dir={tmp_path / 'none'}", "threshold=1.01"])
    assert calls[0][0][0] == tok.prompt_ids("Write the report for this image.", 4) and len(calls[0][1]) == 3
    with pytest.raises(ValueError, match=r"demo_test_0000'.*lower k"):
        cli.run_recipe("knn_fewshot", "demo/knn_fewshot", common + [f"output_dir={tmp_path / 'long'}", "k=3",
                                                                     "max_new_tokens=500"])


def knn_overrides(data, index_dir, split="test", checkpoint=None):
    return [f"index_dir={index_dir}", f"checkpoint={checkpoint or 'null'}",
            "model._component_=medcap.models.builders.tiny_demo",
            "~model.max_seq_len", "~model.image_grid", f"dataset.manifest={data / f'{split}.jsonl'}",
            "max_new_tokens=2", "temperature=0.0"]


def test_nearest_first_false_reverses_the_examples_not_neighbours_csv(demo_data, tmp_path, monkeypatch):  # noqa: F811
    tiny_build_index(demo_data, tmp_path / "index")
    index = CaptionIndex.load(tmp_path / "index")
    captions = dict(zip(index.ids, index.captions))
    prompts = []
    real_generate = medcap.generation.generate

    def spy(model, batch_prompts, images, **kwargs):
        prompts.extend(batch_prompts)
        return real_generate(model, batch_prompts, images, **kwargs)

    monkeypatch.setattr(medcap.generation, "generate", spy)
    out = tmp_path / "knn"
    cli.run_recipe("knn_fewshot", "demo/knn_fewshot", knn_overrides(demo_data, tmp_path / "index") + [
        f"output_dir={out}", "max_samples=3", "k=2", "mode=captions", "nearest_first=false"])
    with (out / "neighbours.csv").open() as f:
        rows = list(csv.DictReader(f))
    ids = list(dict.fromkeys(r["ID"] for r in rows))
    assert len(ids) == len(prompts) == 3
    tok = smollm2_tokenizer()
    for sample_id, prompt in zip(ids, prompts):
        nearest, second = [r for r in rows if r["ID"] == sample_id]
        assert (nearest["rank"], second["rank"]) == ("1", "2")
        assert float(nearest["similarity"]) >= float(second["similarity"])
        # the prompt lists the nearest last, next to the query
        assert (f"1. {captions[second['neighbour_ID']]}\n2. {captions[nearest['neighbour_ID']]}\n"
                in tok.decode(prompt, skip_special_tokens=False))
    # and synthesize reads the file nearest first
    assert read_neighbours(out / "neighbours.csv", tmp_path / "index")[ids[0]] == [
        captions[r["neighbour_ID"]] for r in rows[:2]]

    # a run without clean-up leaves no raw_predictions.csv of an earlier run that cleaned its captions
    for cleanup in ("aueb", "null"):
        cli.run_recipe("knn_fewshot", "demo/knn_fewshot", knn_overrides(demo_data, tmp_path / "index") + [
            f"output_dir={out}", "max_samples=1", "k=1", f"clean_captions={cleanup}"])
        assert (out / "raw_predictions.csv").is_file() == (cleanup == "aueb")


def test_synthesize_takes_the_fallback_for_knn_fewshot_queries_without_neighbours(demo_data, tmp_path,  # noqa: F811
                                                                                 caplog):
    tiny_build_index(demo_data, tmp_path / "index")
    knn = tmp_path / "knn"
    cli.run_recipe("knn_fewshot", "demo/knn_fewshot", knn_overrides(demo_data, tmp_path / "index") + [
        f"output_dir={knn}", "max_samples=3", "threshold=1.01"])
    ids = [json.loads(line)["id"] for line in (demo_data / "test.jsonl").read_text().splitlines()][:3]
    assert (knn / "neighbours.csv").read_text().splitlines() == (
        ["ID,rank,neighbour_ID,similarity"] + [f"{i},0,," for i in ids])

    drafts = tmp_path / "drafts.csv"
    drafts.write_text("ID,caption\n" + "".join(f"{i},Draft {n}.\n" for n, i in enumerate(ids)))
    out = tmp_path / "synthesize"
    config = tiny_config(tmp_path, drafts=str(drafts), neighbours=str(knn / "neighbours.csv"),
                         index_dir=str(tmp_path / "index"), output_dir=str(out), fallback_template="Caption: {draft}",
                         threshold=0.5)
    cli.run_recipe("synthesize", str(config), [])
    rows = [json.loads(line) for line in (out / "synthesis.jsonl").read_text().splitlines()]
    assert [(r["id"], r["neighbours"], r["prompt"]) for r in rows] == [
        (i, [], f"Caption: Draft {n}.") for n, i in enumerate(ids)]
    assert f"threshold=0.5 is not applied: the neighbours are {knn / 'neighbours.csv'}'s" in caplog.text


def test_knn_fewshot_embeds_queries_in_the_index_dtype(demo_data, tmp_path):  # noqa: F811
    checkpoint = trained_tiny_checkpoint(tmp_path / "ckpt")
    tiny_build_index(demo_data, tmp_path / "index", "dtype=bf16", f"checkpoint={checkpoint}")
    out = tmp_path / "knn"
    # the training images against their own index, left out only as identical embeddings: the captioner's own
    # (fp32) encoder would embed them about 1e-3 away from their bf16 entries
    overrides = knn_overrides(demo_data, tmp_path / "index", "train", checkpoint)
    cli.run_recipe("knn_fewshot", "demo/knn_fewshot", overrides + [f"output_dir={out}", "k=1", "exclude_self=false",
                                                                   "dtype=fp32"])
    with (out / "neighbours.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and [r["ID"] for r in rows if r["ID"] == r["neighbour_ID"]] == []


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_configs_take_fallback_prompt_and_clean_captions(name):
    path = cli.find_config(f"{name}/knn_fewshot")
    cli.check_override_keys(path, ["fallback_prompt=Describe the image.", "clean_captions=aueb"])
    cfg = OmegaConf.load(path)
    assert (cfg.fallback_prompt, cfg.clean_captions) == (None, None)  # the recipe's defaults
