"""The medcap seed as published: its prompts character for character (the seed's strings, written out here as its
code builds them, and torchtune's own Llama 3 tokenizer as the oracle for token ids), its ShareGPT training files,
its VQA protocol (two_stage_judge) end to end with scripted generations, its OmniMedVQA / VQA-RAD selections, and
its training settings (configs/medcap/seed_textplus) for two steps."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchtune.data import Message
from torchtune.models.llama3 import llama3_tokenizer as torchtune_llama3_tokenizer

import medcap.generation
from medcap import cli
from medcap.data.caption_formats import read_sharegpt
from medcap.data.dataset import CaptionDataset
from medcap.data.problems import DataFileError
from medcap.data.vqa_formats import read_omnimedvqa, read_vqa_rad
from medcap.text import IGNORE_INDEX, llama3_tokenizer, smollm2_tokenizer
from medcap.text.seed_prompts import rendered_prompt, seed_text_ids
from medcap.vqa import description_budget, judge_letter, judge_text
from tests.test_tokenizers import LLAMA3_MODEL
from tests.test_vqa_recipe import demo_vqa  # noqa: F401 (a fixture)

SEED_ID = 118075  # "①" in Llama 3's vocabulary: the seed's image placeholder
# The seed's rendered prompts (torchtune 0.2.1: decoded chat, no <|begin_of_text|>, the final <|eot_id|> removed)
SEED_TURN1 = ("<|start_header_id|>user<|end_header_id|>\n\n" + "①" * 50
              + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
SEED_TURN2 = (SEED_TURN1 + "A frontal chest radiograph.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "Is there a nodule in the left lung?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
SEED_JUDGE_4 = ("<|start_header_id|>user<|end_header_id|>\n\nQuestion: Which organ is shown?\nOur answer: The lungs."
                "\nA. Heart\nB. Lung\nC. Liver\nD. Brain\n\nBased on the question and our answer, respond with only "
                "the letter of the correct option from the given choices.<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n")
SEED_JUDGE_2 = ("<|start_header_id|>user<|end_header_id|>\n\nQuestion: Is there a nodule?\nOur answer: Yes.\nA. Yes\n"
                "B. No\n\nBased on the question and our answer, respond with only the letter of the correct option "
                "from the given choices.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
# what the seed's run showed after reading its answers back from its CSV (empty cells -> NaN -> "nan")
SEED_JUDGE_2_CSV = SEED_JUDGE_2.replace("B. No\n", "B. No\nC. nan\nD. nan\n")


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer(str(LLAMA3_MODEL))


@pytest.fixture(scope="module")
def oracle():
    """torchtune's own Llama 3 tokenizer: the seed's tokenizer class (0.2.1 there, 0.6.1 here)."""
    return torchtune_llama3_tokenizer(str(LLAMA3_MODEL))


def test_vqa_prompts_render_as_the_seeds_strings(llama3):
    turn1 = llama3.prompt_ids("", 50)
    assert rendered_prompt(llama3, turn1) == SEED_TURN1
    turn2 = turn1 + llama3.answer_ids("A frontal chest radiograph.") + llama3.followup_ids(
        "Is there a nodule in the left lung?")
    assert rendered_prompt(llama3, turn2) == SEED_TURN2
    judge = judge_text("Which organ is shown?", "The lungs.", {"A": "Heart", "B": "Lung", "C": "Liver", "D": "Brain"})
    assert rendered_prompt(llama3, llama3.prompt_ids(judge)) == SEED_JUDGE_4
    judge = judge_text("Is there a nodule?", "Yes.", {"A": "Yes", "B": "No"})
    assert rendered_prompt(llama3, llama3.prompt_ids(judge)) == SEED_JUDGE_2
    judge = judge_text("Is there a nodule?", "Yes.", {"A": "Yes", "B": "No"}, missing="nan")
    assert rendered_prompt(llama3, llama3.prompt_ids(judge)) == SEED_JUDGE_2_CSV
    assert judge_text("Q?", "", {"A": "x", "B": "y", "C": "z"}, missing="nan").splitlines()[1:6] == [
        "Our answer: nan", "A. x", "B. y", "C. z", "D. nan"]
    # three options: the seed's code printed C and D whenever either was there (D empty)
    assert judge_text("Q?", "a", {"A": "x", "B": "y", "C": "z"}).splitlines()[2:6] == ["A. x", "B. y", "C. z", "D. "]
    # what pandas read back as NaN from the seed's CSV (its default na_values; pandas itself is the oracle)
    from pandas._libs.parsers import STR_NA_VALUES

    from medcap.vqa import PANDAS_NA_TEXTS
    assert PANDAS_NA_TEXTS == STR_NA_VALUES
    assert judge_text("Q?", "None", {"A": "NA", "B": "null", "C": "n/a ", "D": "x"}, "nan").splitlines()[1:6] == [
        "Our answer: nan", "A. nan", "B. nan", "C. n/a ", "D. x"]


def test_chat_prompt_ids_are_the_seeds_training_tokens(llama3, oracle):
    """Our chat ids equal torchtune's tokenize_messages of the seed's messages (bos + turns; the seed also appended
    <|end_of_text|>), with our placeholder id where the seed had the ① token."""
    seed_tokens, _ = oracle.tokenize_messages([Message("user", "①" * 50), Message("assistant", "")],
                                              add_end_tokens=False)
    ours = [SEED_ID if t == llama3.image_token_id else t for t in llama3.prompt_ids("", 50)]
    assert seed_tokens[:len(ours)] == ours


def test_seed_text_ids_are_what_the_seeds_generate_recipe_fed_the_model(llama3, oracle):
    """The seed's recipe called tokenizer.encode(prompt, add_bos=True, add_eos=False) on the rendered string:
    torchtune encodes the special tokens' spellings as plain text."""
    turn2 = llama3.prompt_ids("", 50) + llama3.answer_ids("A frontal chest radiograph.") + llama3.followup_ids(
        "Is there a nodule in the left lung?")
    expected = [llama3.image_token_id if t == SEED_ID else t
                for t in oracle.encode(SEED_TURN2, add_bos=True, add_eos=False)]
    assert seed_text_ids(llama3, turn2) == expected
    assert expected.count(llama3.image_token_id) == 50 and expected.count(oracle.eot_id) == 0
    assert seed_text_ids(llama3, llama3.prompt_ids(judge_text("Is there a nodule?", "Yes.", {"A": "Yes", "B": "No"}))) \
        == oracle.encode(SEED_JUDGE_2, add_bos=True, add_eos=False)
    with pytest.raises(ValueError, match="holds 50 image placeholders but its text 51"):
        seed_text_ids(llama3, llama3.prompt_ids("", 50) + llama3.answer_ids("see ①") + llama3.followup_ids("Q?"))
    with pytest.raises(ValueError, match="SmolLM2Tokenizer has"):
        seed_text_ids(smollm2_tokenizer(), [1, 2])


def test_description_budget_and_judge_letter():
    assert description_budget(200, 500, 120, 20) == 200           # 500 - 145 = 355: the 200 cap holds
    assert description_budget(200, 500, 300, 40) == 155           # 500 - 300 - 40 - 5
    assert description_budget(200, None, 300, 400) == 200
    assert [judge_letter(r) for r in (" b) Lung", "A", "\nC.", "", "  ", "The answer is B")] == \
        ["B", "A", "C", "", "", "T"]


# --- training data: the seed's ShareGPT files ----------------------------------------------------------------------

def write_sharegpt(folder: Path, captions: list[str], relative_dir: bool = True) -> Path:
    """Items exactly as the seed's tools/convert_to_sharegpt.py writes them (instruction_type 'no')."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(folder / "imgs" / f"im{i}.png")
        items.append({"conversations": [{"from": "human", "value": "①" * 50}, {"from": "gpt", "value": caption}],
                      "image": f"im{i}.png", "meta": f"dir={'imgs' if relative_dir else folder / 'imgs'}"})
    (folder / "textplus_pmcoa_patients_train.json").write_text(json.dumps(items, indent=4))
    return folder


def test_sharegpt_training_sample_is_the_seeds(tmp_path, llama3, oracle):
    data = write_sharegpt(tmp_path, ["Axial CT of the chest shows a 12 mm nodule.", "Normal fundus."])
    settings = dict(format="sharegpt", data_dir=str(data), split="train", prompt="", tokenizer=llama3,
                    annotation_file="textplus_pmcoa_patients_{split}.json", tokens_per_image=50,
                    transform=lambda image: torch.zeros(3, 4, 4), max_seq_len=1000)
    dataset = CaptionDataset(**settings, label_assistant_header=True)
    assert [s["id"] for s in dataset.samples] == ["0", "1"]
    assert dataset.samples[1]["images"] == [str(data / "imgs" / "im1.png")]
    sample = dataset[0]
    assert rendered_prompt(llama3, sample["tokens"]) == (
        SEED_TURN1 + "Axial CT of the chest shows a 12 mm nodule.<|eot_id|>")
    # the seed's labels: tokenize_messages' mask (user turn masked, train_on_input False), then each ① and the
    # position after it masked; it appended <|end_of_text|> (masked), which changes no loss
    tokens, mask = oracle.tokenize_messages([Message("user", "①" * 50, masked=True),
                                             Message("assistant", "Axial CT of the chest shows a 12 mm nodule.")])
    for i, t in enumerate(tokens):
        if t == SEED_ID:
            mask[i] = mask[i + 1] = True
    seed_labels = [IGNORE_INDEX if m else t for t, m in zip(tokens, mask)]
    assert tokens[-1] == oracle.eos_id and seed_labels[-1] == IGNORE_INDEX
    assert [SEED_ID if t == llama3.image_token_id else t for t in sample["tokens"]] == tokens[:-1]
    assert sample["labels"] == seed_labels[:-1]
    # without the option: the assistant header (4 tokens after the user turn's <|eot_id|>) is not labelled
    plain = CaptionDataset(**settings)[0]["labels"]
    differ = [i for i, (a, b) in enumerate(zip(plain, sample["labels"])) if a != b]
    assert differ == [56, 57, 58, 59] and all(plain[i] == IGNORE_INDEX for i in differ)


def test_sharegpt_reader_names_file_item_and_field(tmp_path):
    data = write_sharegpt(tmp_path, ["a", "b", "c", "d", "e", "f"], relative_dir=False)
    path = data / "textplus_pmcoa_patients_train.json"
    items = json.loads(path.read_text())
    items[1]["conversations"][0]["value"] = "Describe the image."                         # no placeholder
    items[2]["conversations"] += [{"from": "human", "value": "①"}, {"from": "gpt", "value": "x"}]
    items[3]["meta"] = "dir"                                                                # not key=value
    items[4]["image"] = ""
    items[5]["conversations"][0]["value"] = "①" * 50 + "\n\nDescribe the image in detail."  # instruction_type random
    items[5]["id"] = "   "  # a blank id: its place in the list, as a missing one
    path.write_text(json.dumps(items))
    samples, problems = read_sharegpt(data, "train", annotation_file="textplus_pmcoa_patients_{split}.json")
    assert [(str(p.source), p.sample_id, p.field) for p in problems] == [
        (f"{path}: [1]", "1", "conversations[0].value"), (f"{path}: [2]", "2", "conversations[2].value"),
        (f"{path}: [3]", "3", "meta"), (f"{path}: [4]", "4", "image")]
    assert [(s["id"], s["prompt"], s["caption"]) for s in samples] == [
        ("0", None, "a"), ("5", "Describe the image in detail.", "f")]
    assert samples[0]["images"] == [str(data / "imgs" / "im0.png")]  # an absolute dir stays as it is


# --- VQA selections as the seed made them --------------------------------------------------------------------------

def test_omnimedvqa_modalities_filter_and_unknown_modality(tmp_path):
    folder = tmp_path / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    rows = [{"question_id": f"q{i}", "question": "Q?", "option_A": "a", "option_B": "b", "gt_answer": "a",
             "image_path": "x.png", "modality_type": m}
            for i, m in enumerate(["X-Ray", "Microscopy Images", "Infrared Reflectance Imaging", "X-Ray"])]
    (folder / "set.json").write_text(json.dumps(rows))
    samples, _ = read_omnimedvqa(tmp_path, "test", modalities=["X-Ray", "Microscopy Images"])
    assert [s["id"] for s in samples] == ["q0", "q1", "q3"]
    # a malformed row is reported whatever the filter; options in letter order whatever the file's key order
    (folder / "set.json").write_text(json.dumps([["not", "a", "question"], {**rows[0], "option_A": "b",
                                                                            "option_B": "a"}]))
    samples, problems = read_omnimedvqa(tmp_path, "test", modalities=["X-Ray"])
    assert [(p.reason, p.source.item) for p in problems] == [("malformed row", "[0]")]
    assert list(samples[0]["options"].items()) == [("A", "b"), ("B", "a")]
    row = {k: rows[0][k] for k in ("question_id", "question", "option_B", "option_A", "gt_answer", "image_path")}
    (folder / "set.json").write_text(json.dumps([{**row, "modality_type": "X-Ray"}]))
    samples, _ = read_omnimedvqa(tmp_path, "test", modalities=["X-Ray"])
    assert list(samples[0]["options"]) == ["A", "B"] and samples[0]["prompt"] == "Q?\nA. a\nB. b"
    with pytest.raises(DataFileError, match=r"no question has modality_type \['CT\(Computed Tomography\)'\]"):
        read_omnimedvqa(tmp_path, "test", modalities=["X-Ray", "CT(Computed Tomography)"])


def test_vqa_rad_test_freeform_and_para_closed_only(tmp_path):
    rows = [{"qid": i, "image_name": "a.jpg", "question": "Q?", "answer": "yes", "answer_type": a, "phrase_type": p}
            for i, (p, a) in enumerate([("test_freeform", "CLOSED"), ("test_para", "CLOSED"), ("test_para", "OPEN"),
                                        ("freeform", "CLOSED"), ("test_frame", "CLOSED"), ("test_freeform", "OPEN")])]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    samples, _ = read_vqa_rad(tmp_path, "test", phrase_types=["test_freeform", "test_para"], answer_types=["CLOSED"])
    assert [s["id"] for s in samples] == ["0", "1"]
    assert len(read_vqa_rad(tmp_path, "test")[0]) == 5  # without the filters: every test_* row
    with pytest.raises(DataFileError, match=r"no test row has answer_type \['closed'\]"):
        read_vqa_rad(tmp_path, "test", answer_types=["closed"])


# --- two_stage_judge end to end, generations scripted ----------------------------------------------------------------



class ScriptedLLM:
    """Stands in for medcap.generation.generate: reads each prompt, records it, and answers by rule. Turn 1 (an
    image, no text in the user turn): a description. Turn 2 (an image, the question): 'Radiograph' to the modality
    question, ``other`` otherwise. The judge (no image): the letter of the option named in 'Our answer', else 'Z'."""

    def __init__(self, tokenizer, other: str = "not sure"):
        self.tok, self.other, self.calls = tokenizer, other, []

    def __call__(self, model, prompts, images, *, max_new_tokens, **_):
        outputs = []
        for ids in prompts:
            text = self.tok.decode(ids)
            if images is None:
                kind = "judge"
                said = text.split("Our answer: ")[1].split("\n")[0]
                letters = [line[0] for line in text.splitlines() if line[1:3] == ". " and line[3:] == said]
                reply = f"{letters[0]}. {said}" if letters else "Z"
            elif "?" not in text:
                kind, reply = "describe", "word " * 40
            else:
                kind, reply = "answer", "Radiograph" if "imaging modality" in text else self.other
            self.calls.append((kind, text, max_new_tokens, None if images is None else images.shape[0]))
            outputs.append(self.tok.encode(reply)[:max_new_tokens])
        return outputs


def test_two_stage_judge_end_to_end(demo_vqa, tmp_path, monkeypatch):
    data_dir, path = demo_vqa
    llm = ScriptedLLM(smollm2_tokenizer())
    monkeypatch.setattr(medcap.generation, "generate", llm)
    out = tmp_path / "judge"
    cli.run_recipe("vqa", "demo/vqa", [
        "model._component_=medcap.models.builders.tiny_demo", "~model.max_seq_len", "~model.image_grid",
        "checkpoint=null", f"dataset.data_dir={data_dir}", f"output_dir={out}", "bootstrap=0",
        "mode=two_stage_judge", "description_max_new_tokens=30", "max_new_tokens=12", "judge_max_new_tokens=7",
        "shuffle_seed=0", "batch_size=5"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    order = [q["question_id"] for q in json.loads(path.read_text())]
    random.Random(0).shuffle(order)
    assert [r["id"] for r in rows] == order

    kinds = [c[0] for c in llm.calls]
    assert kinds.count("describe") == 8 and kinds.count("answer") == 23 and kinds.count("judge") == 23
    for kind, text, max_new, n_images in llm.calls:
        if kind == "describe":  # the user turn holds the image placeholders alone
            assert text == "user\n\nassistant\n" and max_new == 30 and n_images in (5, 3)
        elif kind == "answer":  # the bare question, no options, after the description
            assert "A." not in text and text.startswith("user\n\nassistant\n" + "word " * 29 + "word\nuser\n")
            assert max_new == 12
        else:
            assert max_new == 7 and text.endswith(
                "\n\nBased on the question and our answer, respond with only the letter of the correct option "
                "from the given choices.\nassistant\n")
    for r in rows:
        assert r["description"] == ("word " * 30).strip()  # cut to the 30-token budget, one per image
        modality_question = r["id"].endswith("_modality")
        assert r["answer_text"] == ("Radiograph" if modality_question else "not sure")
        named = [k for k, v in r["options"].items() if v == "Radiograph"] if modality_question else []
        # a reply starting with no option's letter is no answer (the seed counted it wrong)
        assert r["judge_reply"].startswith(named[0] if named else "Z")
        assert r["raw_answer"] == (named[0] if named else "") and r["parsed_option"] == (named[0] if named else None)
        assert r["correct"] == (modality_question and r["answer"] == "Radiograph")
    metrics = json.loads((out / "metrics.json").read_text())
    per_group = {}
    for r in rows:
        per_group.setdefault(r["modality"], []).append(r["correct"])
    assert metrics["accuracy"] == pytest.approx(2 / 23)  # the two radiographs' modality questions
    assert metrics["accuracy/chest_xray"] == metrics["accuracy/leg_xray"] == pytest.approx(1 / 3)
    assert metrics["macro_accuracy"] == pytest.approx(np.mean([np.mean(v) for v in per_group.values()]))
    assert metrics["macro_accuracy"] == pytest.approx(2 / 3 / 8)


class BeamLLM(ScriptedLLM):
    """A beam search stand-in: a description's tokens depend on the max_new_tokens of the search (as a beam search's
    do: its first n tokens are not the n-token search)."""

    def __call__(self, model, prompts, images, *, max_new_tokens, **settings):
        assert settings["num_beams"] == 3
        if images is None or "?" in self.tok.decode(prompts[0]):
            return super().__call__(model, prompts, images, max_new_tokens=max_new_tokens)
        self.calls.append(("describe", None, max_new_tokens, images.shape[0]))
        return [self.tok.encode(f"searched{max_new_tokens} " * 40)[:max_new_tokens] for _ in prompts]


def test_two_stage_judge_with_beams_describes_each_image_with_its_own_budget(demo_vqa, tmp_path, monkeypatch):
    import shutil

    data_dir, path = demo_vqa
    data_dir = Path(shutil.copytree(data_dir, tmp_path / "data"))
    questions = json.loads(path.read_text())
    for i, q in enumerate(questions):  # questions of several lengths: the images' budgets differ
        q["question"] += " Answer briefly." * (i % 3)
    (data_dir / path.relative_to(demo_vqa[0])).write_text(json.dumps(questions))
    config = tmp_path / "vqa.yaml"
    config.write_text((Path(cli.__file__).parent.parent / "configs" / "demo" / "vqa.yaml").read_text()
                      + "\nnum_beams: 3\n")
    descriptions = []
    for batch_size in (1, 8):
        llm = BeamLLM(smollm2_tokenizer())
        monkeypatch.setattr(medcap.generation, "generate", llm)
        out = tmp_path / f"batch{batch_size}"
        cli.run_recipe("vqa", str(config), [
            "model._component_=medcap.models.builders.tiny_demo", "~model.max_seq_len", "~model.image_grid",
            "checkpoint=null", f"dataset.data_dir={data_dir}", f"output_dir={out}", "bootstrap=0", "report=false",
            "mode=two_stage_judge", "description_max_new_tokens=30", "describe_context_len=50", "max_new_tokens=4",
            "judge_max_new_tokens=4", "shuffle_seed=0", f"batch_size={batch_size}"])
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        descriptions.append({r["id"]: r["description"] for r in rows})
        budgets = [max_new for kind, _, max_new, _ in llm.calls if kind == "describe"]
        assert len(set(budgets)) > 1 or batch_size > 1  # the budgets differ (their first questions' lengths do)
    assert descriptions[0] == descriptions[1]


def test_seed_vqa_config_runs_with_a_tiny_model_and_the_seed_checkpoint(demo_vqa, tmp_path):
    """configs/medcap/seed_omnimedvqa as a user runs it: a tiny Llama 3 + ViT, the Llama 3 tokenizer, the seed's
    checkpoint file, seed_text prompts and the seed run's judge prompt; the demo modalities stand in for the
    eight."""
    from tests.test_import_medcap import two_models, write_seed_file

    data_dir, _ = demo_vqa
    llm_dir = tmp_path / "llm"
    (llm_dir / "original").mkdir(parents=True)
    (llm_dir / "original" / "tokenizer.model").symlink_to(LLAMA3_MODEL)
    checkpoint = write_seed_file(two_models()[0], tmp_path / "meta_model_last.pt")
    out = tmp_path / "out"
    cli.run_recipe("vqa", "medcap/seed_omnimedvqa", [
        f"llm_dir={llm_dir}", "vision_dir=unused", f"checkpoint={checkpoint}", f"data_dir={data_dir}",
        f"output_dir={out}", "model._component_=medcap.models.builders.tiny_llama3_biomedclip", "~model.llm_dir",
        "~model.vision_dir", "model.num_tokens=8", "device=cpu", "dtype=fp32", "limit=5", "max_new_tokens=3",
        "description_max_new_tokens=3", "judge_max_new_tokens=2", "bootstrap=0", "prompt_encoding=seed_text",
        "judge_missing=nan", "dataset.modalities=[chest_xray,fundus]"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["modality"] for r in rows} <= {"chest_xray", "fundus"}
    assert all("judge_reply" in r and len(r["raw_answer"]) <= 1 for r in rows)
    assert json.loads((out / "metrics.json").read_text())["n"] == 5


# --- training with the seed's settings --------------------------------------------------------------------------------

def test_seed_training_config_trains_two_steps_with_its_settings(tmp_path, monkeypatch):
    import medcap.training
    import recipes.finetune

    data = write_sharegpt(tmp_path / "data", [f"Caption number {i} of a chest film." for i in range(6)])
    llm_dir = tmp_path / "llm"
    (llm_dir / "original").mkdir(parents=True)
    (llm_dir / "original" / "tokenizer.model").symlink_to(LLAMA3_MODEL)
    seen = {}
    real_train = medcap.training.train

    def spy(model, optimizer, scheduler, batches, settings, **kwargs):
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["optimizer"], seen["settings"], seen["model"] = optimizer, settings, model
        seen["batch"] = next(batches)
        seen["checkpointed"] = [type(m).__name__ for m in model.decoder.modules()
                                if type(m).__name__ == "CheckpointWrapper"]
        return real_train(model, optimizer, scheduler, batches, settings, **kwargs)

    monkeypatch.setattr(recipes.finetune, "train", spy)
    out = tmp_path / "out"
    cli.run_recipe("finetune_vision", "medcap/seed_textplus", [  # runs recipes.finetune.main
        f"llm_dir={llm_dir}", "vision_dir=unused", f"data_dir={data}", f"output_dir={out}", "max_steps=2",
        "model._component_=medcap.models.builders.tiny_llama3_biomedclip", "~model.llm_dir", "~model.vision_dir",
        "device=cpu", "batch_size=2", "gradient_accumulation_steps=1", "num_workers=0"])

    settings, optimizer = seen["settings"], seen["optimizer"]
    assert settings.clip_grad_norm is None and settings.max_steps == 2
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(2e-5, 0.01), (2e-5, 0.01)]
    assert seen["model"].decoder.layers[0].parameters().__next__().dtype == torch.bfloat16
    assert len(seen["checkpointed"]) == 2  # every decoder layer under activation checkpointing
    batch = seen["batch"]
    assert (batch["tokens"] == seen["model"].image_token_id).sum(1).tolist() == [50, 50]
    # images as the seed fed them: open_clip's own evaluation transform (shorter side, bicubic, centre crop)
    from open_clip.transform import image_transform as open_clip_transform

    from medcap.data.images import load_image

    encoder = seen["model"].vision.encoder
    theirs = open_clip_transform(encoder.image_size, is_train=False, mean=encoder.mean, std=encoder.std)
    expected = torch.stack([theirs(load_image(data / "imgs" / f"im{i}.png")) for i in batch["ids"]])
    assert torch.allclose(batch["images"], expected, atol=1e-6)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [h["lr"] for h in summary["history"]] == [2e-5, 2e-5] and "grad_norm" not in summary["history"][0]
    model = seen["model"]
    prefixes = {"encoder": "encoders.image.encoder.", "projector": "encoders.image.projector."}
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(seen["before"][k], after[k])}
    assert changed and all(k.startswith(tuple(prefixes.values())) for k in changed)
    assert {part for part, prefix in prefixes.items() if any(k.startswith(prefix) for k in changed)} == set(prefixes)
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()


def test_seed_vqa_rad_config_answers_closed_questions_without_a_judge(tmp_path, monkeypatch):
    """configs/medcap/seed_vqa_rad: test_freeform + test_para CLOSED rows only; no options, so the turn-2 answer
    is scored (yes/no by its first word) and the judge never runs."""
    data = tmp_path / "vqa_rad"
    (data / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.fromarray(np.zeros((70, 90, 3), dtype=np.uint8)).save(data / "VQA_RAD Image Folder" / "a.jpg")
    rows = [{"qid": i, "image_name": "a.jpg", "question": f"Is there finding {i}?", "answer": answer,
             "answer_type": kind, "phrase_type": phrase}
            for i, (phrase, kind, answer) in enumerate([
                ("test_freeform", "CLOSED", "yes"), ("test_para", "CLOSED", "No"), ("test_para", "OPEN", "lung"),
                ("freeform", "CLOSED", "yes"), ("test_freeform", "CLOSED", "yes")])]
    (data / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    llm = ScriptedLLM(llama3_tokenizer(str(LLAMA3_MODEL)), other="Yes, there is.")
    monkeypatch.setattr(medcap.generation, "generate", llm)
    llm_dir = tmp_path / "llm"
    (llm_dir / "original").mkdir(parents=True)
    (llm_dir / "original" / "tokenizer.model").symlink_to(LLAMA3_MODEL)
    out = tmp_path / "out"
    cli.run_recipe("vqa", "medcap/seed_vqa_rad", [
        f"llm_dir={llm_dir}", "vision_dir=unused", "checkpoint=null", f"data_dir={data}", f"output_dir={out}",
        "model._component_=medcap.models.builders.tiny_llama3_biomedclip", "~model.llm_dir", "~model.vision_dir",
        "model.num_tokens=8", "device=cpu", "dtype=fp32", "bootstrap=0"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "4"]  # the file's order
    assert [c[0] for c in llm.calls] == ["describe", "answer", "answer", "answer"]  # one image, one description
    assert all(r["raw_answer"] == "Yes, there is." and "judge_reply" not in r for r in rows)
    assert [r["correct"] for r in rows] == [True, False, True]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(2 / 3)


def test_description_budget_counts_the_prompt_as_the_seed_did(llama3, oracle):
    """The seed: min(200, 500 - (len(encode(rendered empty two-turn prompt)) + len(encode(question)) + 5)), its
    encode adding BOS and EOS and spelling special tokens as text (prompt_encoding: seed_text); chat counts the
    real prompt ids."""
    from omegaconf import OmegaConf
    from types import SimpleNamespace

    from recipes.vqa import VQARun

    model = torch.nn.Linear(1, 1)
    model.tokens_per_image, model.views_per_block = 50, 1
    question = {"id": "q", "images": ["a.png"], "question": "Which structure " + "is abnormal and " * 100 + "why?"}
    seed_prompt = SEED_TURN1 + ("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    seed_budget = min(200, 500 - (len(oracle.encode(seed_prompt)) + len(oracle.encode(question["question"])) + 5))
    chat_prompt = llama3.prompt_ids("", 50) + llama3.answer_ids("") + llama3.followup_ids("")
    chat_budget = min(200, 500 - len(chat_prompt) - len(llama3.encode(question["question"])) - 5)
    assert seed_budget < chat_budget < 200  # the long question binds, and the text spelling costs more tokens
    for encoding, expected in (("seed_text", seed_budget), ("chat", chat_budget)):
        cfg = OmegaConf.create({"description_max_new_tokens": 200, "describe_context_len": 500,
                                "prompt_encoding": encoding, "seed": 0})
        run = VQARun(cfg, model, llama3, SimpleNamespace(system=None), torch.float32)
        assert run.description_tokens(question) == expected
