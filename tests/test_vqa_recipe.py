"""The VQA recipe: prompts of the direct and two-stage modes, likelihood scoring of options (packed rows, sum vs
mean), the demo VQA builder, the scorer on a hand-checked set, and the recipe end to end on a tiny model."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medcap import cli
from medcap.data.demo_vqa import ANSWERS, build_demo_vqa
from medcap.data.problems import Source
from medcap.data.vqa_formats import read_omnimedvqa
from medcap.metrics import evaluate, read_predictions
from medcap.metrics.vqa import parse_choice, read_vqa_references
from medcap.text import smollm2_tokenizer
from medcap.vqa import (answer_prompt, correct_option, judged_option, option_ids, pack_tree, pick_option,
                        question_text, score_options, vqa_questions)
from tests.tiny_vlm import IMAGE_ID, tiny_vlm

QUESTION = {"id": "q1", "images": ["x.png"], "question": "What is the imaging modality?",
            "options": {"A": "CT", "B": "MRI", "C": "X-ray"}, "answer": "MRI", "modality": "head"}


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_direct_prompt_lists_the_options_with_letters(tokenizer):
    text = question_text(QUESTION, "Answer with the letter.")
    assert text == "What is the imaging modality?\nA. CT\nB. MRI\nC. X-ray\nAnswer with the letter."
    closed = {**QUESTION, "options": None, "question": "Is there a fracture?"}
    assert question_text(closed, "Answer with the letter.") == "Is there a fracture?"
    assert (question_text(closed, "Answer with the letter.", "Answer yes or no.")
            == "Is there a fracture?\nAnswer yes or no.")
    ids = answer_prompt(tokenizer, text, num_image_tokens=2)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\n<|image|><|image|>What is the imaging modality?\nA. CT\nB. MRI\nC. X-ray\n"
        "Answer with the letter.<|im_end|>\n<|im_start|>assistant\n")


def test_two_stage_prompt_has_the_description_before_the_question(tokenizer):
    ids = answer_prompt(tokenizer, question_text(QUESTION), 2, describe_prompt="Describe the image.",
                        description="Axial CT of the head.")
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\n<|image|><|image|>Describe the image.<|im_end|>\n<|im_start|>assistant\n"
        "Axial CT of the head.<|im_end|>\n<|im_start|>user\nWhat is the imaging modality?\nA. CT\nB. MRI\n"
        "C. X-ray<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tokenizer.image_token_id) == 2  # the image only in the first turn
    with pytest.raises(ValueError, match="describe_prompt"):
        answer_prompt(tokenizer, "Q?", 2, description="text")


def test_option_ids(tokenizer):
    plain = option_ids(tokenizer, QUESTION["options"], "{text}", with_end=False)
    assert [tokenizer.decode(ids) for ids in plain] == ["CT", "MRI", "X-ray"]
    lettered = option_ids(tokenizer, QUESTION["options"], "{letter}. {text}", with_end=True)
    assert [tokenizer.decode(ids, skip_special_tokens=False) for ids in lettered] == [
        "A. CT<|im_end|>", "B. MRI<|im_end|>", "C. X-ray<|im_end|>"]
    with pytest.raises(ValueError, match="option B"):
        option_ids(tokenizer, {"A": "CT", "B": " "}, "{text}", with_end=False)


def test_correct_option():
    assert correct_option("MRI", QUESTION["options"]) == "B"
    assert correct_option("c", QUESTION["options"]) == "C"
    assert correct_option("x ray", QUESTION["options"]) == "C"  # normalised text
    assert correct_option("PET", QUESTION["options"]) is None
    assert correct_option("yes", None) is None


def test_pack_tree_stores_shared_prefixes_once_and_masks_by_ancestry():
    pack = pack_tree([[5, 6, 7], [5, 6, 8], [5, 9]])
    assert pack["tokens"].tolist() == [5, 6, 7, 8, 9]
    assert pack["parents"] == [-1, 0, 1, 1, 0]
    assert pack["positions"].tolist() == [0, 1, 2, 2, 1]
    assert pack["paths"] == [[0, 1, 2], [0, 1, 3], [0, 4]]
    assert pack["mask"].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],  # 8 sees 5, 6 and itself, not its sibling 7
        [1, 0, 0, 0, 1],
    ]


@torch.no_grad()
def _separate_scores(model, prompt, options, image):
    """Each option scored in a forward of its own (plain causal mask): the reference for the packed rows."""
    out = []
    for option in options:
        tokens = torch.tensor([prompt + option])
        logits = model(tokens, encoder_input={"image": {"images": image}})
        logprobs = torch.log_softmax(logits[0].float(), -1)
        n = len(prompt)
        out.append((sum(float(logprobs[n - 1 + k, t]) for k, t in enumerate(option)), len(option)))
    return out


def test_packed_rows_score_as_separate_forwards():
    model = tiny_vlm().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    block = [IMAGE_ID] * 4
    # two questions about image 0 (one row, sharing [2, 3, image]) and one about image 1, options of 1-3 tokens
    prompts = [[2, 3] + block + [10, 11, 12], [2, 3] + block + [10, 13], [2, 3] + block + [14]]
    options = [[[20, 21], [22], [20, 23, 24]], [[30], [31, 32]], [[40, 41], [40, 42], [43]]]
    packed = score_options(model, prompts, options, images, pad_id=0, rows=[[0, 1], [2]])
    expected = [_separate_scores(model, p, o, images[[0 if i < 2 else 1]]) for i, (p, o) in
                enumerate(zip(prompts, options))]
    for got, want in zip(packed, expected):
        assert [n for _, n in got] == [n for _, n in want]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    # one row per question gives the same numbers
    single = score_options(model, prompts, options, images[[0, 0, 1]], pad_id=0)
    assert [s for row in single for s, _ in row] == pytest.approx([s for row in packed for s, _ in row], abs=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        score_options(model, prompts, options, images, pad_id=0, rows=[[0, 1], [2]], max_seq_len=15, ids=list("abc"))
    with pytest.raises(ValueError, match="do not share their image"):
        score_options(model, [[2] + block, [3] + block], [[[20]], [[20]]], images, pad_id=0, rows=[[0, 1]])


V = 40


class Bigram(nn.Module):
    """A fake language model: the next-token distribution depends on the current token only, given by ``probs``
    ({token: {next token: probability}}; the rest of each row's mass spread evenly over the other tokens)."""

    def __init__(self, probs: dict[int, dict[int, float]]):
        super().__init__()
        table = torch.full((V, V), 1.0 / V)
        for token, nexts in probs.items():
            rest = (1.0 - sum(nexts.values())) / (V - len(nexts))
            table[token] = rest
            for nxt, p in nexts.items():
                table[token, nxt] = p
        self.logits = nn.Parameter(table.log())

    def forward(self, tokens, mask=None, input_pos=None, encoder_input=None, output_at=None):
        return self.logits[tokens] if output_at is None else self.logits[tokens[output_at]]


def test_likelihood_picks_the_planted_option_and_scores_accuracy_one():
    # after prompt token 2 the model prefers 20 -> 21 (option B of q1); after 3 it prefers 30 (option C of q2)
    model = Bigram({2: {10: 0.1, 20: 0.6}, 20: {21: 0.9}, 3: {30: 0.7, 31: 0.1}})
    prompts = [[1, 2], [1, 3]]
    options = [{"A": "ten eleven", "B": "twenty", "C": "twelve"}, {"A": "a", "B": "b", "C": "c"}]
    continuations = [[[10, 11], [20, 21], [12]], [[31], [32, 33], [30]]]
    scores = score_options(model, prompts, continuations, None, pad_id=0, rows=[[0, 1]])
    assert scores[0][1] == (pytest.approx(math.log(0.6 * 0.9), abs=1e-5), 2)
    picks = [list(o)[pick_option(s, "mean")] for o, s in zip(options, scores)]
    assert picks == ["B", "C"]
    references = {"q1": {"answer": "twenty", "options": options[0], "modality": "ct"},
                  "q2": {"answer": "c", "options": options[1], "modality": "mri"}}
    result = evaluate(dict(zip(["q1", "q2"], picks)), references, preset="vqa").corpus
    assert result["accuracy"] == 1.0 and result["macro_accuracy"] == 1.0


def test_sum_and_mean_normalisation_disagree_as_computed_by_hand():
    # option A: one token, p = 0.4 -> sum = mean = log 0.4 = -0.9163
    # option B: two tokens, p = 0.5 each -> sum = log 0.25 = -1.3863, mean = log 0.5 = -0.6931
    model = Bigram({2: {10: 0.4, 20: 0.5}, 20: {21: 0.5}})
    (scores,) = score_options(model, [[1, 2]], [[[10], [20, 21]]], None, pad_id=0)
    assert scores[0] == (pytest.approx(-0.916291, abs=1e-5), 1)
    assert scores[1] == (pytest.approx(-1.386294, abs=1e-5), 2)
    assert pick_option(scores, "sum") == 0
    assert pick_option(scores, "mean") == 1
    assert pick_option([(-1.0, 1), (-1.0, 1)], "sum") == 0  # ties: the first
    with pytest.raises(ValueError, match="normalize"):
        pick_option(scores, "max")


def test_per_modality_and_macro_accuracy_hand_checked():
    options = {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}
    references = {
        "1": {"answer": "CT", "options": options, "modality": "ct"},
        "2": {"answer": "MRI", "options": options, "modality": "ct"},
        "3": {"answer": "X-ray", "options": options, "modality": "ct"},
        "4": {"answer": "Ultrasound", "options": options, "modality": "us"},
        "5": {"answer": "yes", "options": None, "modality": None},
    }
    predictions = {"1": "A", "2": "The answer is C", "3": "It is an X-ray.", "4": "I cannot tell", "5": "Yes."}
    result = evaluate(predictions, references, preset="vqa").corpus
    # ct: 1 right, 2 wrong, 3 right (by text) -> 2/3; us: unparsed -> 0; unknown: yes -> 1
    assert result["accuracy/ct"] == pytest.approx(2 / 3)
    assert result["accuracy/us"] == 0.0
    assert result["accuracy/unknown"] == 1.0
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["macro_accuracy"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["unparsed"] == 1


@pytest.mark.parametrize("prediction, expected", [
    ('The correct option is "D."', "D"),  # as the demo model wrote it
    ('The correct option is "D".', "D"),
    ("the answer is \u201cb\u201d", "B"),
    ("Answer: 'C'", "C"),
    ('"B"', "B"),
    ('the answer is "a mass"', None),  # a quote that does not close after the letter: text
    ("answer: I'm not sure", None),
])
def test_parser_reads_quoted_letters(prediction, expected):
    assert parse_choice(prediction, {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}) == expected


def test_vqa_questions_need_questions_and_answers():
    sample = {"id": "s1", "images": ["a.png"], "source": Source("m.jsonl", 3), "caption": "text", "prompt": None}
    with pytest.raises(ValueError, match=r"m.jsonl:3: sample 's1': field 'question'"):
        vqa_questions([sample])


@pytest.fixture(scope="module")
def demo_vqa(tmp_path_factory):
    """A demo-format test split (one image per modality, the findings of the demo's labels; random 64 px
    images), and the VQA set built from it."""
    out = tmp_path_factory.mktemp("demo")
    (out / "images").mkdir()
    findings = ["opacity", "none", "lesion", "none", "lesion", "lesion", "dark_lesion", "none"]
    rng = np.random.default_rng(0)
    lines = []
    for i, (modality, finding) in enumerate(zip(ANSWERS, findings)):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out / "images" / f"t{i}.png")
        lines.append(json.dumps({"id": f"demo_test_{i:04d}", "image": f"images/t{i}.png", "caption": "-",
                                 "modality": modality, "finding": finding, "location": "none"}))
    (out / "test.jsonl").write_text("\n".join(lines) + "\n")
    return out, build_demo_vqa(out, "test", seed=0)


def test_demo_vqa_set_reads_as_omnimedvqa(demo_vqa):
    data_dir, path = demo_vqa
    assert path == data_dir / "QA_information" / "Open-access" / "demo_test.json"
    rows = {json.loads(line)["id"]: json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()}
    samples, problems = read_omnimedvqa(data_dir, "test")
    assert not problems
    assert len(samples) == 8 * 3 - 1  # no body-part question for the histology image
    kinds = {}
    for s in samples:
        kind = next(k for k in ("modality", "body_part", "abnormality") if s["id"].endswith("_" + k))
        row = rows[s["id"][:-len(kind) - 1]]
        assert Path(s["images"][0]) == data_dir / row["image"]
        assert s["modality"] == row["modality"]
        assert list(s["options"].values()).count(s["answer"]) == 1
        kinds.setdefault(kind, []).append(s)
        if kind == "abnormality":
            assert s["options"] == {"A": "Yes", "B": "No"}
            assert s["answer"] == ("No" if row["finding"] == "none" else "Yes")
        else:
            assert sorted(s["options"]) == list("ABCD") and len(set(s["options"].values())) == 4
    assert len(kinds["modality"]) == 8 and len(kinds["body_part"]) == 7
    assert {s["answer"] for s in kinds["modality"]} >= {"Radiograph", "CT", "MRI", "Ultrasound"}
    letters = {correct_option(s["answer"], s["options"]) for s in kinds["modality"] + kinds["body_part"]}
    assert len(letters) > 1  # the right option is not always at the same letter
    assert len(read_vqa_references(path)) == 23
    assert build_demo_vqa(data_dir, "test", seed=0).read_text() == path.read_text()  # deterministic


def _run(data_dir, out, *overrides):
    cli.run_recipe("vqa", "demo/vqa", [
        "model._component_=medcap.models.builders.tiny_demo", "~model.max_seq_len", "~model.image_grid",
        "checkpoint=null", f"dataset.data_dir={data_dir}", f"output_dir={out}", "bootstrap=50", *overrides])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "metrics.json").read_text())


def _by_hand(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r["modality"], []).append(r["correct"])
    per_group = {m: sum(v) / len(v) for m, v in groups.items()}
    return sum(r["correct"] for r in rows) / len(rows), per_group


def test_recipe_end_to_end_likelihood(demo_vqa, tmp_path):
    data_dir, _ = demo_vqa
    rows, metrics = _run(data_dir, tmp_path / "lik", "mode=likelihood", "questions_per_row=3")
    assert len(rows) == 23 and metrics["n"] == 23
    for r in rows:
        assert r["raw_answer"] == r["parsed_option"] and r["raw_answer"] in r["options"]
        assert r["correct"] == (r["parsed_option"] == r["correct_option"])
        assert set(r["option_scores"]) == set(r["options"])
        best = max(r["option_scores"], key=lambda k: r["option_scores"][k]["mean"])
        assert r["raw_answer"] == best
    accuracy, per_group = _by_hand(rows)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["macro_accuracy"] == pytest.approx(sum(per_group.values()) / len(per_group))
    assert {k: v for k, v in metrics.items() if k.startswith("accuracy/")} == pytest.approx(
        {f"accuracy/{m}": v for m, v in per_group.items()})
    assert (tmp_path / "lik" / "intervals.json").is_file() and (tmp_path / "lik" / "report.html").is_file()

    # a rerun without intervals or page leaves none of the earlier run's beside its metrics
    _run(data_dir, tmp_path / "lik", "mode=likelihood", "limit=2", "bootstrap=0", "report=false")
    assert not (tmp_path / "lik" / "intervals.json").exists() and not (tmp_path / "lik" / "report.html").exists()


def test_recipe_packing_changes_nothing_and_two_stage_runs(demo_vqa, tmp_path):
    data_dir, path = demo_vqa
    rows, _ = _run(data_dir, tmp_path / "lik", "mode=likelihood", "questions_per_row=3", "limit=6")
    single, _ = _run(data_dir, tmp_path / "lik1", "mode=likelihood", "questions_per_row=1", "limit=6")
    for a, b in zip(single, rows):
        assert a["raw_answer"] == b["raw_answer"]
        assert {k: v["sum"] for k, v in a["option_scores"].items()} == pytest.approx(
            {k: v["sum"] for k, v in b["option_scores"].items()}, abs=1e-3)

    rows, metrics = _run(data_dir, tmp_path / "two", "mode=two_stage", "limit=6", "max_new_tokens=4",
                         "description_max_new_tokens=4")
    assert len(rows) == 6 and all("description" in r for r in rows)
    # the three questions about one image share its description
    assert len({r["description"] for r in rows[:3]}) == 1
    predictions = (tmp_path / "two" / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "ID,caption" and len(predictions) == 7
    assert metrics["accuracy"] == pytest.approx(_by_hand(rows)[0])
    # the CSV scores as the recipe scored it
    references = {k: v for k, v in read_vqa_references(path).items() if k in {r["id"] for r in rows}}
    rescored = evaluate(read_predictions(tmp_path / "two" / "predictions.csv"), references, preset="vqa").corpus
    assert rescored == pytest.approx(metrics)


def test_real_weight_config_runs_two_stage_with_a_tiny_model_of_its_family(demo_vqa, tmp_path):
    """configs/medcap/llama3_1_8b_biomedclip_vqa as a user runs it, with a tiny Llama 3 + ViT in place of the
    real weights and the Llama 3 tokenizer (two-stage: the Llama 3 follow-up turn)."""
    from tests.test_tokenizers import LLAMA3_MODEL

    data_dir, _ = demo_vqa
    llm_dir = tmp_path / "llm"
    (llm_dir / "original").mkdir(parents=True)
    (llm_dir / "original" / "tokenizer.model").symlink_to(LLAMA3_MODEL)
    out = tmp_path / "out"
    cli.run_recipe("vqa", "medcap/llama3_1_8b_biomedclip_vqa", [
        f"llm_dir={llm_dir}", "vision_dir=unused", "checkpoint=null", f"data_dir={data_dir}", f"output_dir={out}",
        "model._component_=medcap.models.builders.tiny_llama3_biomedclip", "~model.llm_dir", "~model.vision_dir",
        "model.num_tokens=8", "device=cpu", "dtype=fp32", "limit=4", "max_new_tokens=3",
        "description_max_new_tokens=3", "bootstrap=0"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["demo_test_0000_modality", "demo_test_0000_body_part",
                                       "demo_test_0000_abnormality", "demo_test_0001_modality"]
    assert len({r["description"] for r in rows[:3]}) == 1
    assert json.loads((out / "metrics.json").read_text())["n"] == 4


def test_correct_option_reads_the_letter_forms_scoring_reads():
    assert [correct_option(a, QUESTION["options"]) for a in ("(B)", "b.", "B)", "[c]")] == ["B", "B", "B", "C"]


def test_an_answer_naming_no_option_stops_before_the_model_runs():
    sample = {"id": "s1", "images": ["a.png"], "source": Source("q.json", item="[4]"), "question": "Which?",
              "answer": "PET", "options": {"A": "CT", "B": "MRI"}}
    with pytest.raises(ValueError, match=r"q.json: \[4\]: sample 's1': field 'answer' \('PET'\) names none of the "
                                         r"options"):
        vqa_questions([sample])
    assert vqa_questions([{**sample, "answer": "MRI"}])[0]["options"] == {"A": "CT", "B": "MRI"}


def test_judge_reply_counts_only_as_an_option_letter():
    options = {"A": "I", "B": "II", "C": "III"}  # roman numerals: "I think..." is not option A's text
    assert [judged_option(r, options) for r in ("B", " c) III", "I think it is A.", "", "D")] == ["B", "C", "", "", ""]
    assert parse_choice("", options) is None  # scored wrong, counted unparsed


def test_omnimedvqa_checks_only_the_modalities_asked_for_and_answers_naming_no_option(tmp_path):
    folder = tmp_path / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    good = {"question_id": "q1", "question": "Which?", "option_A": "CT", "option_B": "MRI", "gt_answer": "MRI",
            "image_path": "a.png", "modality_type": "X-Ray"}
    (folder / "s.json").write_text(json.dumps([
        good,
        {"question_id": "q2", "question": "", "image_path": "b.png", "modality_type": "Dermoscopy"},  # not asked
        {**good, "question_id": "q3", "gt_answer": "PET"},
    ]))
    samples, problems = read_omnimedvqa(tmp_path, "test", modalities=["X-Ray"])
    assert [s["id"] for s in samples] == ["q1"]
    assert [(p.sample_id, p.field, p.reason) for p in problems] == [("q3", "gt_answer", "answer not an option")]
    assert "'PET' names none of the options" in problems[0].detail and problems[0].source.item == "[2]"
    _, problems = read_omnimedvqa(tmp_path, "test")
    assert [p.sample_id for p in problems] == ["q2", "q3"]  # without the filter q2 is checked (no question)


def test_an_option_without_tokens_names_the_question(demo_vqa, tmp_path):
    data_dir, path = demo_vqa
    copy = tmp_path / "data"
    (copy / "QA_information" / "Open-access").mkdir(parents=True)
    shutil.copytree(data_dir / "images", copy / "images")
    items = json.loads(path.read_text())
    items[1]["option_C"] = " "
    (copy / "QA_information" / "Open-access" / path.name).write_text(json.dumps(items))
    with pytest.raises(ValueError, match=rf"demo_test.json: \[1\]: sample '{items[1]['question_id']}': field "
                                         r"'options': option C \(' '\) gives no tokens"):
        _run(copy, tmp_path / "out", "mode=likelihood", "with_end=false", "limit=3", "shuffle_seed=null")


def test_a_damaged_image_names_its_question_and_max_image_pixels_is_followed(demo_vqa, tmp_path, monkeypatch):
    import medcap.data.dataset

    data_dir, path = demo_vqa
    copy = Path(shutil.copytree(data_dir, tmp_path / "data"))
    items = json.loads(path.read_text())
    image = copy / items[0]["image_path"]
    image.write_bytes(image.read_bytes()[:100])  # a truncated PNG
    with pytest.raises(ValueError, match=rf"demo_test.json: \[0\]: sample '{items[0]['question_id']}': field "
                                         r"'image_path': cannot read image"):
        _run(copy, tmp_path / "out", "mode=likelihood", "limit=1", "shuffle_seed=null")
    shutil.copy(data_dir / items[0]["image_path"], image)
    limits = []
    real = medcap.data.dataset.load_image
    monkeypatch.setattr(medcap.data.dataset, "load_image", lambda p, max_pixels: limits.append(max_pixels)
                        or real(p, max_pixels=max_pixels))
    _run(copy, tmp_path / "out", "mode=likelihood", "limit=1", "shuffle_seed=null", "dataset.max_image_pixels=1000")
    assert limits and set(limits) == {1000}


def test_demo_manifest_errors_name_the_line(tmp_path):
    from medcap.data.demo_vqa import _read_rows
    from medcap.data.problems import DataFileError

    manifest = tmp_path / "test.jsonl"
    manifest.write_text('{"id": "a", "image": "a.png", "modality": "chest_xray", "finding": "none"}\n{"id": \n')
    with pytest.raises(DataFileError, match=r"test.jsonl:2: invalid JSON"):
        _read_rows(manifest)
