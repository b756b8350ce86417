"""Data checks at the edges: absent optional splits in prepare_data, training splits without captions, captions
that are JSON numbers, image paths that leave data_dir, and huge images downscaled on load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from medcap.data.dataset import CaptionDataset, read_manifest
from medcap.data.images import DEFAULT_MAX_IMAGE_PIXELS, capped_size, load_image
from medcap.data.problems import BadSampleError
from tests.test_formats import ROOT, prepare, write_imageclef, write_r2gen_iuxray


def without_test_split(root: Path) -> Path:
    for path in (root / "test").iterdir():
        path.unlink()
    (root / "test").rmdir()
    return root


# --- absent splits ---------------------------------------------------------------------------------------------

def test_an_absent_optional_split_is_reported_and_does_not_fail(tmp_path, capsys):
    root = without_test_split(write_imageclef(tmp_path / "data"))
    args = [ROOT / "configs/data/imageclef.yaml", f"data_dir={root}", f"output_dir={tmp_path / 'out'}"]
    assert prepare(*args) == 0
    out = capsys.readouterr().out
    assert (f"test: absent (split 'test' is absent: neither {root / 'test_captions.csv'} nor {root / 'test'}/ "
            f"exists)\n") in out
    assert out.rstrip().endswith("OK: every split present can be used (absent: test)")


def test_only_problems_in_present_splits_decide_the_exit_code(tmp_path, capsys):
    root = without_test_split(write_imageclef(tmp_path / "data"))
    (root / "train/ROCOv2_2023_train_000002.png").unlink()  # a bad sample in a split that is there
    args = [ROOT / "configs/data/imageclef.yaml", f"data_dir={root}", f"output_dir={tmp_path / 'out'}"]
    assert prepare(*args) == 1
    out = capsys.readouterr().out
    assert "train: 1 problem(s) (on_bad_sample: error):" in out and "test: absent" in out
    assert prepare(*args, "on_bad_sample=skip") == 0  # what remains can train
    out = capsys.readouterr().out
    assert "train: 1 samples, 1 images\n" in out and "  skipped 1 of 2 samples: 1 x image file not found\n" in out
    assert out.rstrip().endswith("OK: every split present can be used (absent: test)")


def test_a_split_training_reads_may_not_be_absent_and_neither_may_all(tmp_path, capsys):
    root = write_r2gen_iuxray(tmp_path / "data")
    annotation = json.loads((root / "annotation.json").read_text())
    del annotation["test"]
    (root / "annotation.json").write_text(json.dumps(annotation))
    args = [ROOT / "configs/data/r2gen_iuxray.yaml", f"data_dir={root}", f"output_dir={tmp_path / 'out'}"]
    assert prepare(*args) == 0
    assert f"test: absent ({root / 'annotation.json'}: no split 'test'; the file has 'train', 'val')" in \
        capsys.readouterr().out
    del annotation["val"]
    (root / "annotation.json").write_text(json.dumps(annotation))
    assert prepare(*args) == 1
    assert (f"val: absent ({root / 'annotation.json'}: no split 'val'; the file has 'train'), but "
            f"val_dataset.split reads it") in capsys.readouterr().out
    assert prepare(*args, "splits=[test]") == 1
    assert "FAILED: none of the splits test is there; check data_dir" in capsys.readouterr().out


# --- captions ---------------------------------------------------------------------------------------------------

def test_a_training_split_whose_captions_are_all_null_fails_naming_split_and_file(tmp_path, capsys):
    root = write_r2gen_iuxray(tmp_path / "data")
    annotation = json.loads((root / "annotation.json").read_text())
    for item in annotation["train"]:
        item["report"] = None
    (root / "annotation.json").write_text(json.dumps(annotation))
    args = [ROOT / "configs/data/r2gen_iuxray.yaml", f"data_dir={root}", f"output_dir={tmp_path / 'out'}"]
    assert prepare(*args) == 1
    out = capsys.readouterr().out
    assert (f"train: r2gen_iuxray:train has no captions: no sample in {root / 'annotation.json'} has field "
            f"'report'") in out
    assert "but dataset.split trains on it, which needs captions" in out and "FAILED" in out
    # a split that only generates may have none (e.g. the test split)
    for item in annotation["train"]:
        item["report"] = "Lungs are clear."
    for item in annotation["test"]:
        item["report"] = None
    (root / "annotation.json").write_text(json.dumps(annotation))
    assert prepare(*args) == 0
    assert "test: 1 samples, 2 images (no captions: generation only)" in capsys.readouterr().out


def test_a_caption_that_is_a_json_number_is_a_problem_not_text(tmp_path):
    root = write_r2gen_iuxray(tmp_path / "data")
    annotation = json.loads((root / "annotation.json").read_text())
    annotation["train"][1]["report"] = 12345
    (root / "annotation.json").write_text(json.dumps(annotation))
    options = dict(format="r2gen_iuxray", data_dir=str(root), split="train")
    with pytest.raises(BadSampleError) as error:
        CaptionDataset(**options)
    assert str(error.value.problems[0]) == (
        f"{root / 'annotation.json'}: train[1]: sample 'CXR2_IM-02': field 'report' is a JSON number (12345), "
        f"not text; write the caption as a JSON string")
    dataset = CaptionDataset(**options, on_bad_sample="skip")
    assert [s["id"] for s in dataset.samples] == ["CXR1_IM-01"]
    assert dataset.skip_summary() == "skipped 1 of 2 samples: 1 x caption not text"

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "image": "a.png", "caption": 12345}\n{"id": "b", "image": "a.png", '
                        '"caption": ["x"]}\n')
    with pytest.raises(BadSampleError) as error:
        read_manifest(manifest)
    assert [str(p) for p in error.value.problems] == [
        f"{manifest}:1: sample 'a': field 'caption' is a JSON number (12345), not text; write the caption as a "
        f"JSON string",
        f"{manifest}:2: sample 'b': field 'caption' is a JSON list ([\"x\"]), not text; write the caption as a "
        f"JSON string"]


# --- image paths outside data_dir -------------------------------------------------------------------------------

def test_image_paths_outside_data_dir_are_refused_unless_allowed(tmp_path):
    root = write_r2gen_iuxray(tmp_path / "data")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (root / "images" / "link.png").symlink_to(secret)
    annotation = json.loads((root / "annotation.json").read_text())
    annotation["train"] = [
        {"id": "ok", "report": "x", "image_path": ["CXR1_IM-01/0.png"]},
        {"id": "dotdot", "report": "x", "image_path": ["../../secret.png"]},
        {"id": "absolute", "report": "x", "image_path": [str(secret)]},
        {"id": "symlink", "report": "x", "image_path": ["link.png"]},
    ]
    (root / "annotation.json").write_text(json.dumps(annotation))
    options = dict(format="r2gen_iuxray", data_dir=str(root), split="train", check_images=True)
    with pytest.raises(BadSampleError) as error:
        CaptionDataset(**options)
    where, resolved = root / "annotation.json", secret.resolve()
    assert [str(p) for p in error.value.problems] == [
        f"{where}: train[{i}]: sample {name!r}: field 'image_path': image path {path} resolves to {resolved}, "
        f"outside data_dir {root.resolve()} (allow_outside_data_dir: true allows it)"
        for i, name, path in [(1, "dotdot", root / "images/../../secret.png"), (2, "absolute", secret),
                              (3, "symlink", root / "images/link.png")]]
    assert [s["id"] for s in CaptionDataset(**options, on_bad_sample="skip").samples] == ["ok"]
    allowed = CaptionDataset(**options, allow_outside_data_dir=True)
    assert [s["id"] for s in allowed.samples] == ["ok", "dotdot", "absolute", "symlink"]


# --- huge images ------------------------------------------------------------------------------------------------

def test_capped_size_keeps_the_aspect_ratio_within_the_cap():
    assert capped_size((300, 200), None) == (300, 200) and capped_size((300, 200), 60000) == (300, 200)
    width, height = capped_size((13000, 6500), 1_000_000)
    assert width * height <= 1_000_000 and (width, height) == (1414, 707)


def _peak_rss_loading(path: Path, max_pixels: int | None) -> tuple[tuple[int, int], int]:
    """(size of load_image's result, peak resident memory in MiB) in a fresh process."""
    # VmHWM: this process's own peak (ru_maxrss would keep the forking pytest process's peak across exec)
    code = ("import re, sys\nfrom medcap.data.images import load_image\n"
            f"image = load_image(sys.argv[1], max_pixels={max_pixels})\n"
            "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
            "print(*image.size, peak // 1024)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(path)], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return (int(out[0]), int(out[1])), int(out[2])


def test_an_image_near_pils_pixel_limit_is_decoded_downscaled_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (13000, 13000), (90, 120, 200)).save(path, quality=90)  # 169 MP: 507 MB as RGB pixels
    size, peak = _peak_rss_loading(path, DEFAULT_MAX_IMAGE_PIXELS)
    assert size == (4096, 4096) and size == capped_size((13000, 13000), DEFAULT_MAX_IMAGE_PIXELS)
    assert peak < 450, peak  # decoded at 1/2 scale (127 MB) and resized; whole, the pixels alone take 507 MB
    size, peak = _peak_rss_loading(path, 1024 * 1024)
    assert size == (1024, 1024) and peak < 120, peak  # decoded at 1/8 scale


def test_max_image_pixels_reaches_the_data_set_and_prepare_data_reports_the_file_size(tmp_path):
    Image.new("L", (3000, 1000), 200).save(tmp_path / "wide.png")
    Image.new("RGB", (4000, 2000), (1, 2, 3)).save(tmp_path / "wide.jpg")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "image": "wide.png", "caption": "x"}\n'
                        '{"id": "b", "image": "wide.jpg", "caption": "y"}\n')
    from tests.test_formats import FakeTokenizer

    dataset = CaptionDataset(str(manifest), tokenizer=FakeTokenizer(), tokens_per_image=1, check_images=True,
                             transform=lambda image: torch.tensor(image.size), max_image_pixels=30_000)
    assert dataset[0]["images"].tolist() == [[300, 100]] and dataset[1]["images"].tolist() == [[244, 122]]
    assert dataset.image_sizes == {str(tmp_path / "wide.png"): (3000, 1000), str(tmp_path / "wide.jpg"): (4000, 2000)}
    assert load_image(tmp_path / "wide.png", max_pixels=None).size == (3000, 1000)


# --- review findings: JSONL line ends, question-only and empty-answer conversations, prompts that are not text ---

def test_a_unicode_line_separator_inside_a_caption_is_not_a_line_end(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "1", "image": "a.png", "caption": "Left lung\u2028opacity."},
            {"id": "2", "image": "a.png", "caption": "No\u0085finding."}]
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert [(s["id"], s["caption"]) for s in read_manifest(manifest)] == [("1", "Left lung\u2028opacity."),
                                                                          ("2", "No\u0085finding.")]
    manifest.write_text('{"id": "1", "image": "a.png", "caption": "x"}\n\n{"id": "2", "image": "a.png",\n')
    with pytest.raises(Exception, match=f"{manifest}:3: invalid JSON"):  # line numbers still count every line
        read_manifest(manifest)


def test_question_only_conversations_serve_generation_and_an_empty_later_answer_is_a_problem(tmp_path):
    from tests.test_formats import write_llava

    question = {"from": "human", "value": "<image>\nDescribe."}
    root = write_llava(tmp_path / "data", [
        {"id": "q", "image": "a.png", "conversations": [question]},
        {"id": "blank", "image": "a.png", "conversations": [question, {"from": "gpt", "value": "A CT."},
                                                            {"from": "human", "value": "Anything else?"},
                                                            {"from": "gpt", "value": "   "}]}])
    options = dict(format="llava", data_dir=str(root), split="train", image_folder="images")
    prompts_only = CaptionDataset(**options, with_captions=False)
    assert [s["id"] for s in prompts_only.samples] == ["q", "blank"]
    with pytest.raises(BadSampleError) as error:
        CaptionDataset(**options)
    problems = {p.sample_id: str(p) for p in error.value.problems}
    assert problems["blank"].endswith("sample 'blank': field 'conversations[3].value' (an answer) is missing or empty")
    assert "each human turn needs the gpt turn that answers it" in problems["q"]


def test_a_prompt_that_is_not_text_is_a_problem_naming_the_field(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": 7, "image": "a.png", "caption": "ok", "prompt": 5}\n')
    with pytest.raises(BadSampleError) as error:
        read_manifest(manifest)
    assert [str(p) for p in error.value.problems] == [
        f"{manifest}:1: sample '7': field 'prompt' is a JSON number (5), not text; write the prompt as a JSON string"]


def test_a_conversation_whose_first_turn_is_only_the_image_takes_the_data_sets_prompt(tmp_path):
    from medcap.text import build_conversation_sample, smollm2_tokenizer
    from tests.test_formats import write_llava

    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A chest radiograph."},
             {"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": "No."}]
    root = write_llava(tmp_path / "data", [{"id": "c", "image": "a.png", "conversations": turns}])
    tok = smollm2_tokenizer()
    dataset = CaptionDataset(format="llava", data_dir=str(root), split="train", image_folder="images", tokenizer=tok,
                             tokens_per_image=4, prompt="Describe the image.", max_seq_len=128)
    exchanges = [("Describe the image.", "A chest radiograph."), ("Any effusion?", "No.")]
    expected = build_conversation_sample(tok, exchanges, 4, 128)
    assert dataset.tokenize(dataset.samples[0]) == expected
