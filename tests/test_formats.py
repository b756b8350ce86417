"""The data set readers on tiny copies of each published layout, the configs/data/*.yaml nodes in the recipes,
and prepare_data."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from medcap import cli
from medcap.data.dataset import CaptionDataset, collate_captions
from medcap.data.formats import read_samples
from medcap.data.problems import CaptionsMissingError, DataFileError
from medcap.data.reports import clean_report_iu_xray, clean_report_mimic_cxr

ROOT = Path(__file__).resolve().parent.parent


def image(path: Path, size=(12, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode == "L" else (120, 60, 30)).save(path)
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def write_imageclef(root: Path) -> Path:
    """ROCOv2 layout: two training images (.jpg and .png), one validation image, two test images, concepts."""
    image(root / "train/ROCOv2_2023_train_000001.jpg", (40, 30))
    image(root / "train/ROCOv2_2023_train_000002.png", (20, 50), mode="L")
    image(root / "valid/ROCOv2_2023_valid_000001.jpg")
    image(root / "test/ROCOv2_2023_test_000002.jpg")
    image(root / "test/ROCOv2_2023_test_000001.jpg")
    write_csv(root / "train_captions.csv", [["ID", "Caption"],
                                           ["ROCOv2_2023_train_000001", "Chest X-ray, frontal view."],
                                           ["ROCOv2_2023_train_000002", "CT of the abdomen."]])
    write_csv(root / "valid_captions.csv", [["ID", "Caption"], ["ROCOv2_2023_valid_000001", "MRI of the knee."]])
    write_csv(root / "train_concepts.csv", [["ID", "CUIs"], ["ROCOv2_2023_train_000001", "C0040405;C1306645"]])
    return root


IU_REPORT = "1. The heart is normal in size.. 2. No pneumothorax, effusion. Right-sided \"T-spine\" at T11-12:"


def write_r2gen_iuxray(root: Path) -> Path:
    annotation = {split: [{"id": f"CXR{n}_IM-0{n}", "report": IU_REPORT if n == 1 else "Lungs are clear.",
                           "image_path": [f"CXR{n}_IM-0{n}/0.png", f"CXR{n}_IM-0{n}/1.png"], "split": split}
                          for n in numbers]
                  for split, numbers in {"train": [1, 2], "val": [3], "test": [4]}.items()}
    for items in annotation.values():
        for item in items:
            for path in item["image_path"]:
                image(root / "images" / path, (16, 16), mode="L")
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


def write_llava(root: Path, conversations: list[dict] | None = None) -> Path:
    items = conversations or [
        {"id": "llava-1", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat does the image show?"},
                           {"from": "gpt", "value": "A chest radiograph."}]},
        {"id": "llava-2", "image": ["b.png", "c.png"],
         "conversations": [{"from": "human", "value": "Compare <image> and <image>."},
                           {"from": "gpt", "value": "The second shows an effusion."}]},
    ]
    for name in "abc":
        image(root / "images" / f"{name}.png")
    (root / "train.json").write_text(json.dumps(items))
    return root


def write_omnimedvqa(root: Path) -> Path:
    folder = root / "QA_information/Open-access"
    folder.mkdir(parents=True)
    rows = [{"dataset": "Chest CT Scan", "question_id": "Chest CT Scan_0", "question_type": "Modality Recognition",
             "question": "What imaging modality is this?", "gt_answer": "CT", "image_path": "Images/ct/1.png",
             "option_A": "CT", "option_B": "MRI", "option_C": "X-ray", "modality_type": "CT"},
            {"dataset": "Chest CT Scan", "question_id": "Chest CT Scan_1", "question_type": "Disease Diagnosis",
             "question": "Is there a nodule?", "gt_answer": "No", "image_path": "Images/ct/1.png",
             "option_A": "Yes", "option_B": "No", "modality": "CT"}]  # one real file says "modality"
    (folder / "Chest CT Scan.json").write_text(json.dumps(rows))
    image(root / "Images/ct/1.png")
    return root


def write_vqa_rad(root: Path) -> Path:
    rows = [{"qid": 1, "image_name": "synpic1.jpg", "question": "Is this a CT?", "answer": "yes",
             "answer_type": "CLOSED", "image_organ": "HEAD", "phrase_type": "freeform"},
            {"qid": 2, "image_name": "synpic1.jpg", "question": "How many lesions?", "answer": 2,
             "answer_type": "OPEN", "image_organ": "HEAD", "phrase_type": "test_freeform"},
            {"qid": 3, "image_name": "synpic1.jpg", "question": "Count the lesions.", "answer": 2,
             "answer_type": "OPEN", "image_organ": "HEAD", "phrase_type": "test_para"}]
    image(root / "VQA_RAD Image Folder/synpic1.jpg")
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


LAYOUTS = {"imageclef": write_imageclef, "r2gen_iuxray": write_r2gen_iuxray, "r2gen_mimic": write_r2gen_iuxray,
           "llava": write_llava, "omnimedvqa": write_omnimedvqa, "vqa_rad": write_vqa_rad}


def names(samples) -> list[list[str]]:
    return [[Path(p).name for p in s["images"]] for s in samples]


def test_imageclef_finds_images_by_id_and_attaches_concepts(tmp_path):
    root = write_imageclef(tmp_path)
    samples, problems = read_samples("imageclef", root, "train", concepts_file="{split}_concepts.csv")
    assert problems == []
    assert [(s["id"], s["caption"], s["concepts"]) for s in samples] == [
        ("ROCOv2_2023_train_000001", "Chest X-ray, frontal view.", ["C0040405", "C1306645"]),
        ("ROCOv2_2023_train_000002", "CT of the abdomen.", []),
    ]
    assert names(samples) == [["ROCOv2_2023_train_000001.jpg"], ["ROCOv2_2023_train_000002.png"]]
    assert str(samples[1]["source"]) == f"{root / 'train_captions.csv'}:3"


def test_imageclef_test_split_without_captions_is_for_generation_only(tmp_path):
    root = write_imageclef(tmp_path)
    dataset = CaptionDataset(format="imageclef", data_dir=str(root), split="test", with_captions=False,
                             concepts_file="{split}_concepts.csv")  # no test concepts: fine without captions
    assert [s["id"] for s in dataset.samples] == ["ROCOv2_2023_test_000001", "ROCOv2_2023_test_000002"]
    assert all(s["caption"] is None for s in dataset.samples)
    with pytest.raises(CaptionsMissingError,
                       match="imageclef:test has no captions: no sample in .*test has field 'Caption'"):
        CaptionDataset(format="imageclef", data_dir=str(root), split="test")


def test_imageclef_missing_image_names_the_id_and_the_folder(tmp_path):
    root = write_imageclef(tmp_path)
    (root / "train/ROCOv2_2023_train_000002.png").unlink()
    samples, problems = read_samples("imageclef", root, "train")
    assert [s["id"] for s in samples] == ["ROCOv2_2023_train_000001"]
    assert [str(p) for p in problems] == [
        f"{root / 'train_captions.csv'}:3: sample 'ROCOv2_2023_train_000002': field 'ID': no image file "
        f"ROCOv2_2023_train_000002{{.jpg,.jpeg,.png}} in {root / 'train'}"]


def test_unknown_format_and_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'roco'; formats: imageclef, r2gen_iuxray"):
        read_samples("roco", tmp_path, "train")
    with pytest.raises(ValueError, match="format 'imageclef' has no option\\(s\\) view; its options are captions_file"):
        read_samples("imageclef", tmp_path, "train", view="first")
    with pytest.raises(ValueError, match="give either manifest, or format"):
        CaptionDataset("m.jsonl", format="imageclef")


def test_r2gen_reads_views_in_order_and_cleans_reports(tmp_path):
    root = write_r2gen_iuxray(tmp_path)
    samples, problems = read_samples("r2gen_iuxray", root, "train", clean_report=True)
    assert problems == [] and [s["id"] for s in samples] == ["CXR1_IM-01", "CXR2_IM-02"]
    assert samples[0]["images"] == [str(root / "images/CXR1_IM-01/0.png"), str(root / "images/CXR1_IM-01/1.png")]
    assert samples[0]["caption"] == ("the heart is normal in size . no pneumothorax effusion . "
                                     "right-sided t-spine at t11-12 .")
    raw, _ = read_samples("r2gen_iuxray", root, "train")
    assert raw[0]["caption"] == IU_REPORT
    first, _ = read_samples("r2gen_iuxray", root, "val", views="first")
    assert names(first) == [["0.png"]]
    with pytest.raises(DataFileError, match="annotation.json: no split 'valid'; the file has 'train', 'val', 'test'"):
        read_samples("r2gen_iuxray", root, "valid")


def test_r2gen_cleanings_differ_between_iu_xray_and_mimic():
    report = "FINDINGS:\nThe ___ is  stable.. 3. No effusion; (see 2011. note)"
    # IU X-Ray keeps newlines, underscores' runs and double spaces until the character deletion
    assert clean_report_iu_xray(report) == "findings\nthe  is  stable . no effusion see 201note ."
    # MIMIC-CXR first turns newlines into spaces and shrinks runs of underscores and spaces
    assert clean_report_mimic_cxr(report) == "findings the  is stable . no effusion see 201note ."
    assert clean_report_iu_xray("Normal. . ") == "normal .  ."  # R2Gen keeps empty sentences
    assert clean_report_iu_xray("x <= 5 @ 3/4") == "x  5  34 ."


def test_r2gen_multi_view_sample_gives_one_image_block_per_view(tmp_path):
    from tests.tiny_vlm import PatchEncoder
    from medcap.data.dataset import image_transform

    root = write_r2gen_iuxray(tmp_path)
    dataset = CaptionDataset(format="r2gen_iuxray", data_dir=str(root), split="train", tokenizer=FakeTokenizer(),
                             tokens_per_image=3, transform=image_transform(PatchEncoder()), clean_report=True)
    batch = collate_captions([dataset[0], dataset[1]], pad_id=0)
    assert batch["images"].shape == (4, 3, 32, 32)  # two samples x two views
    assert (batch["tokens"] == FakeTokenizer.image_token_id).sum(1).tolist() == [6, 6]


def test_llava_single_turn_becomes_prompt_and_caption(tmp_path):
    root = write_llava(tmp_path)
    samples, problems = read_samples("llava", root, "train", image_folder="images")
    assert problems == []
    assert [(s["id"], s["prompt"], s["caption"]) for s in samples] == [
        ("llava-1", "What does the image show?", "A chest radiograph."),
        ("llava-2", "Compare  and .", "The second shows an effusion."),
    ]
    assert names(samples) == [["a.png"], ["b.png", "c.png"]]


def test_llava_image_tag_count_must_match_the_images(tmp_path):
    root = write_llava(tmp_path, [
        {"id": "one-tag-two-images", "image": ["a.png", "b.png"],
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-roles", "image": "a.png",
         "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "x"}]},
    ])
    samples, problems = read_samples("llava", root, "train", image_folder="images")
    assert samples == []
    path = root / "train.json"
    assert [str(p) for p in problems] == [
        f"{path}: [0]: sample 'one-tag-two-images': field 'conversations' has 1 <image> tag(s) but field 'image' "
        f"names 2 image(s)",
        f"{path}: [1]: sample 'bad-roles': field 'conversations[0].from' is 'gpt'; turns must alternate human/gpt, "
        f"starting with human",
    ]
    assert [p.field for p in problems] == ["conversations", "conversations"]


def test_llava_multi_turn_trains_on_every_answer(tmp_path):
    import torch

    from medcap.data.dataset import image_transform
    from medcap.models import builders
    from medcap.text import IGNORE_INDEX, smollm2_tokenizer
    from medcap.training import caption_loss

    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A CT."},
             {"from": "human", "value": "Any bleed?"}, {"from": "gpt", "value": "No."}]
    unanswered = turns[:3]
    root = write_llava(tmp_path, [{"id": "multi", "image": "a.png", "conversations": turns},
                                  {"id": "open", "image": "b.png", "conversations": unanswered}])
    samples, _ = read_samples("llava", root, "train", image_folder="images")
    assert [t["content"] for t in samples[0]["turns"]] == ["What is it?", "A CT.", "Any bleed?", "No."]
    with pytest.raises(ValueError, match="sample 'open': field 'conversations' holds 3 turns; each human turn needs"):
        CaptionDataset(format="llava", data_dir=str(root), split="train", image_folder="images")

    model, tok = builders.tiny_demo(), smollm2_tokenizer()
    dataset = CaptionDataset(format="llava", data_dir=str(root), split="train", image_folder="images",
                             tokenizer=tok, tokens_per_image=model.tokens_per_image,
                             transform=image_transform(model.vision.encoder), on_bad_sample="skip")
    item = dataset[0]
    labelled = [t for t, label in zip(item["tokens"], item["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special_tokens=False) == "A CT.<|im_end|>No.<|im_end|>"
    batch = collate_captions([item], pad_id=tok.pad_id)
    loss = caption_loss(model, {"tokens": batch["tokens"], "encoder_input": {"image": {"images": batch["images"]}}},
                        batch["labels"])
    assert torch.isfinite(loss)


def test_omnimedvqa_and_vqa_rad_give_question_options_answer_modality(tmp_path):
    root = write_omnimedvqa(tmp_path / "omni")
    samples, problems = read_samples("omnimedvqa", root, "test")
    assert problems == []
    first = samples[0]
    assert (first["id"], first["question"], first["options"], first["answer"], first["modality"]) == (
        "Chest CT Scan_0", "What imaging modality is this?", {"A": "CT", "B": "MRI", "C": "X-ray"}, "CT", "CT")
    assert first["prompt"] == "What imaging modality is this?\nA. CT\nB. MRI\nC. X-ray"
    assert first["caption"] == "CT" and first["images"] == [str(root / "Images/ct/1.png")]
    assert samples[1]["modality"] == "CT" and samples[1]["question_type"] == "Disease Diagnosis"
    with pytest.raises(ValueError, match="OmniMedVQA is a single test set: use split: test"):
        read_samples("omnimedvqa", root, "train")

    rad = write_vqa_rad(tmp_path / "rad")
    train, _ = read_samples("vqa_rad", rad, "train")
    test, _ = read_samples("vqa_rad", rad, "test")
    assert [(s["id"], s["answer"], s["question_type"], s["organ"]) for s in train] == [("1", "yes", "CLOSED", "HEAD")]
    assert [(s["id"], s["prompt"], s["caption"]) for s in test] == [("2", "How many lesions?", "2"),
                                                                    ("3", "Count the lesions.", "2")]
    assert test[0]["options"] is None and test[0]["images"] == [str(rad / "VQA_RAD Image Folder/synpic1.jpg")]

    # a row without phrase_type, the one file's split marker, is a problem in either split, not a training row
    rows = json.loads((rad / "VQA_RAD Dataset Public.json").read_text())
    for marker in (None, " "):  # missing, or blank
        rows[0]["phrase_type"] = marker
        (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
        for split, kept in (("train", []), ("test", ["2", "3"])):
            samples, problems = read_samples("vqa_rad", rad, split)
            assert [s["id"] for s in samples] == kept
            assert [(p.sample_id, p.field, p.reason) for p in problems] == [("1", "phrase_type", "no split")]


class FakeTokenizer:
    """One token per character; enough for shapes and truncation."""

    image_token_id, pad_id = 1000, 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 900 + 1 for c in text]

    def prompt_ids(self, text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        return [2] + [self.image_token_id] * num_image_tokens + self.encode(text) + [3]

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text) + [4]


def data_config(name: str, data_dir: Path, output_dir: Path):
    cfg = OmegaConf.load(ROOT / "configs/data" / f"{name}.yaml")
    cfg.data_dir, cfg.output_dir = str(data_dir), str(output_dir)
    if name == "llava":
        cfg.dataset.image_folder = "images"
    return cfg


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_data_config_feeds_the_model(name, tmp_path):
    """The dataset node of configs/data/NAME.yaml, built as the recipes build it, gives batches the model takes."""
    from medcap.models.builders import tiny_demo
    from medcap.runtime import caption_dataset, caption_loader
    from medcap.text import smollm2_tokenizer

    cfg = data_config(name, LAYOUTS[name](tmp_path / "data"), tmp_path / "out")
    model, tokenizer = tiny_demo(), smollm2_tokenizer()
    for with_captions in (True, False):
        dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=with_captions)
        batch = next(iter(caption_loader(dataset, tokenizer, batch_size=2)))
        logits = model(batch["tokens"], encoder_input={"image": {"images": batch["images"]}})
        assert logits.shape[:2] == batch["tokens"].shape
        assert int((batch["tokens"] == tokenizer.image_token_id).sum()) == len(batch["images"]) * model.tokens_per_image


def prepare(config: Path, *overrides: str) -> int:
    try:
        cli.run_recipe("prepare_data", str(config), list(overrides))
    except SystemExit as e:
        return int(e.code)
    return 0


def test_prepare_data_reports_statistics_and_exits_0(tmp_path, capsys):
    root = write_imageclef(tmp_path / "data")
    args = [ROOT / "configs/data/imageclef.yaml", f"data_dir={root}", f"output_dir={tmp_path / 'out'}"]
    code = prepare(*args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "train: 2 samples, 2 images\n  image width  min 20 / median 30 / max 40 px\n" in out
    assert "  image height min 30 / median 40 / max 50 px\n" in out
    assert "valid: 1 samples, 1 images\n" in out
    assert "test: 2 samples, 2 images (no captions: generation only)\n" in out
    assert "  0 caption(s) truncated to fit max_seq_len=256" in out
    assert out.rstrip().endswith("OK: every split can be used")
    # the prompt takes 33 tokens (16 of them the image's): room for 7 caption tokens; the first caption needs 10
    assert prepare(*args, "dataset.max_seq_len=40") == 0
    out = capsys.readouterr().out
    assert ("  caption tokens min 5 / median 7 / max 9, mean 7.0 (SmolLM2Tokenizer)\n"
            "  1 caption(s) truncated to fit max_seq_len=40 (16 tokens per image, never cut)\n") in out
    assert prepare(*args, "dataset.max_seq_len=34") == 1
    assert (f"{root / 'train_captions.csv'}:2: sample 'ROCOv2_2023_train_000001': the prompt needs 33 tokens (16 of "
            f"them image tokens) and the caption at least 2 more, but max_seq_len is 34") in capsys.readouterr().out


def test_prepare_data_fails_on_bad_samples_and_skips_them_when_asked(tmp_path, capsys):
    root = write_imageclef(tmp_path / "data")
    (root / "train/ROCOv2_2023_train_000002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # corrupt
    with (root / "valid_captions.csv").open("a", encoding="utf-8") as f:
        f.write("ROCOv2_2023_valid_000001,duplicate\n")
    out_dir = tmp_path / "out"
    args = [ROOT / "configs/data/imageclef.yaml", f"data_dir={root}", f"output_dir={out_dir}"]

    assert prepare(*args) == 1
    out = capsys.readouterr().out
    assert "train: 1 problem(s) (on_bad_sample: error):\n" in out
    assert (f"  {root / 'train_captions.csv'}:3: sample 'ROCOv2_2023_train_000002': field 'ID': cannot read image "
            f"{root / 'train/ROCOv2_2023_train_000002.png'}") in out
    assert (f"  {root / 'valid_captions.csv'}:3: sample 'ROCOv2_2023_valid_000001': duplicate id (first at line 2)"
            in out)
    assert "FAILED" in out and not (out_dir / "skipped_samples.csv").exists()

    assert prepare(*args, "on_bad_sample=skip") == 0
    out = capsys.readouterr().out
    assert "train: 1 samples, 1 images\n" in out
    assert "  skipped 1 of 2 samples: 1 x unreadable image\n" in out
    assert "  skipped 1 of 2 samples: 1 x duplicate id\n" in out
    with open(out_dir / "skipped_samples.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["id"], r["line"], r["field"], r["reason"]) for r in rows] == [
        ("imageclef:train", "ROCOv2_2023_train_000002", "3", "ID", "unreadable image"),
        ("imageclef:valid", "ROCOv2_2023_valid_000001", "3", "ID", "duplicate id"),
    ]


def test_imageclef_config_trains_and_generates_unchanged(tmp_path):
    """finetune_vision and generate take configs/data/imageclef.yaml's data set nodes as they are."""
    root = write_imageclef(tmp_path / "data")
    data = OmegaConf.load(ROOT / "configs/data/imageclef.yaml")
    for recipe in ("finetune_vision", "generate"):
        cfg = OmegaConf.load(ROOT / f"configs/tiny/{recipe}.yaml")
        cfg.data_dir, cfg.output_dir = str(root), str(tmp_path / recipe)
        cfg.dataset = data.dataset
        if recipe == "finetune_vision":
            cfg.val_dataset = data.val_dataset
            cfg.merge_with({"batch_size": 1, "max_steps": 2, "eval_every": 2, "save_every": 2})
        else:
            cfg.merge_with({"dataset": {"split": "test"}, "checkpoint": str(tmp_path / "finetune_vision/checkpoints"),
                            "max_new_tokens": 2})
        OmegaConf.save(cfg, tmp_path / f"{recipe}.yaml")
        cli.run_recipe(recipe, str(tmp_path / f"{recipe}.yaml"), [])
    with open(tmp_path / "generate/predictions.csv", newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)] == ["ID", "ROCOv2_2023_test_000001", "ROCOv2_2023_test_000002"]


def test_r2gen_views_average_gives_one_averaged_block_per_study(tmp_path):
    import torch

    from medcap.data.dataset import image_transform
    from medcap.models import builders

    root = write_r2gen_iuxray(tmp_path)
    annotation = json.loads((root / "annotation.json").read_text())
    annotation["train"][1]["image_path"] = annotation["train"][1]["image_path"][:1]  # a single-view study
    annotation["train"].append({"id": "three-views", "report": "x", "image_path": ["a.png", "b.png", "c.png"]})
    (root / "annotation.json").write_text(json.dumps(annotation))
    samples, problems = read_samples("r2gen_iuxray", root, "train", views="average", num_views=2)
    assert names(samples) == [["0.png", "1.png"], ["0.png", "0.png"]]  # the single view is repeated
    assert [(p.sample_id, p.field, p.reason) for p in problems] == [("three-views", "image_path", "too many views")]

    model = builders.tiny_llama2_swin(views_per_block=2)
    options = dict(format="r2gen_iuxray", data_dir=str(root), split="train", tokenizer=FakeTokenizer(),
                   tokens_per_image=model.tokens_per_image, transform=image_transform(model.vision.encoder),
                   views="average", on_bad_sample="skip")
    with pytest.raises(ValueError, match="views: average gives 2 views per study, but the model averages "
                                         "views_per_block=1"):
        CaptionDataset(**options)
    dataset = CaptionDataset(**options, views_per_block=2)
    batch = collate_captions([dataset[0], dataset[1]], pad_id=0)
    assert batch["images"].shape[0] == 4  # two studies x two views
    # one block of tokens_per_image placeholders per study, not one per view
    assert (batch["tokens"] == FakeTokenizer.image_token_id).sum(1).tolist() == [model.tokens_per_image] * 2
    placeholders = batch["tokens"] == FakeTokenizer.image_token_id
    tokens = (batch["tokens"] % model.image_token_id).masked_fill(placeholders, model.image_token_id)
    logits = model(tokens, encoder_input={"image": {"images": batch["images"]}})
    assert logits.shape[:2] == tokens.shape and torch.isfinite(logits).all()
