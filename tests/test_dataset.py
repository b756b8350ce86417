import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from medcap.data.dataset import CaptionDataset, collate_captions, count_truncated, read_manifest
from medcap.data.demo_builder import build_demo
from medcap.data.problems import BadSampleError, DataFileError, read_csv
from medcap.text import IGNORE_INDEX
from tests.test_formats import FakeTokenizer


def test_manifest_errors_name_the_file_line_and_field(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "a", "image": "a.png", "caption": "x"}\n{"id": "a", "image": "b.png", "caption": "y"}\n')
    with pytest.raises(ValueError, match="m.jsonl:2: sample 'a': duplicate id"):
        read_manifest(bad)
    bad.write_text('{"id": "a", "caption": "x"}\n')
    with pytest.raises(ValueError, match="m.jsonl:1: sample 'a': field 'image' is missing"):
        read_manifest(bad)
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("id,image,caption\nx,a.png;b.png,two views\n")
    assert read_manifest(csv_manifest)[0]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_dataset_and_collate(tmp_path):
    from tests.tiny_vlm import PatchEncoder
    from medcap.data.dataset import image_transform
    from medcap.text import smollm2_tokenizer

    build_demo(tmp_path, seed=0, n_train=8, n_val=8, n_test=8)
    tok = smollm2_tokenizer()
    ds = CaptionDataset(str(tmp_path / "train.jsonl"), tok, tokens_per_image=4, transform=image_transform(PatchEncoder()))
    batch = collate_captions([ds[0], ds[1], ds[2]], pad_id=tok.pad_id)
    assert batch["images"].shape == (3, 3, 32, 32)
    assert (batch["tokens"] == tok.image_token_id).sum(1).tolist() == [4, 4, 4]
    lengths = batch["padding_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding carries no labels
    left = collate_captions([ds[0], ds[1]], pad_id=tok.pad_id, padding_side="left")
    assert left["padding_mask"][:, -1].all()


def png(path, mode="RGB", size=(10, 8)) -> str:
    colour = {"RGB": (200, 100, 50), "RGBA": (200, 100, 50, 128), "L": 90, "CMYK": (0, 200, 0, 0)}.get(mode, 0)
    Image.new(mode, size, colour).save(path)
    return path.name


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def problem_lines(error: BadSampleError) -> list[str]:
    return [str(p) for p in error.problems]


def test_missing_empty_and_corrupt_images_name_file_sample_and_field(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:200])
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ok", "image": "ok.png", "caption": "fine"},
        {"id": "gone", "image": "missing.png", "caption": "x"},
        {"id": "zero", "image": "empty.png", "caption": "x"},
        {"id": "truncated", "image": ["ok.png", "cut.png"], "caption": "x"},
    ])
    with pytest.raises(BadSampleError) as error:
        CaptionDataset(manifest, check_images=True)
    lines = problem_lines(error.value)
    assert lines[:2] == [
        f"{manifest}:2: sample 'gone': field 'image': image file not found: {tmp_path / 'missing.png'}",
        f"{manifest}:3: sample 'zero': field 'image': image file is empty (0 bytes): {tmp_path / 'empty.png'}",
    ]
    assert len(lines) == 3 and lines[2].startswith(
        f"{manifest}:4: sample 'truncated': field 'image': cannot read image {tmp_path / 'cut.png'}: ")
    assert "3 problem(s) in the data set" in str(error.value)

    # without check_images the corrupt file is found when its sample is loaded, with the same names
    dataset = CaptionDataset(manifest, tokenizer=FakeTokenizer(), tokens_per_image=2, transform=T.ToTensor(),
                             on_bad_sample="skip")
    assert [s["id"] for s in dataset.samples] == ["ok", "truncated"]
    with pytest.raises(ValueError, match="m.jsonl:4: sample 'truncated': field 'image': cannot read image .*cut.png"):
        dataset[1]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK", "P"])
def test_grayscale_rgba_16bit_cmyk_and_palette_images_are_converted(tmp_path, mode):
    name = "image.jpg" if mode == "CMYK" else "image.png"
    if mode == "I;16":
        Image.fromarray(np.array([[1000, 2000], [3000, 60000]], dtype=np.uint16)).save(tmp_path / name)
    else:
        png(tmp_path / name, mode)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": name, "caption": "x"}])
    dataset = CaptionDataset(manifest, tokenizer=FakeTokenizer(), tokens_per_image=2, transform=T.ToTensor(),
                             check_images=True)
    assert dataset.problems == [] and dataset[0]["images"].shape[:2] == (1, 3)


def test_empty_and_whitespace_captions_are_problems_only_when_captions_are_needed(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "good", "image": "a.png", "caption": "a caption"},
        {"id": "blank", "image": "a.png", "caption": " \n\t"},
        {"id": "none", "image": "a.png"},
    ])
    with pytest.raises(BadSampleError) as error:
        CaptionDataset(manifest)
    assert problem_lines(error.value) == [f"{manifest}:2: sample 'blank': field 'caption' is missing or empty",
                                          f"{manifest}:3: sample 'none': field 'caption' is missing or empty"]
    assert len(CaptionDataset(manifest, with_captions=False)) == 3


def test_long_captions_are_truncated_never_the_image_tokens(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "long", "image": ["a.png", "a.png"], "caption": "x" * 100},
        {"id": "short", "image": "a.png", "caption": "ok"},
    ])
    tok = FakeTokenizer()
    dataset = CaptionDataset(manifest, tokenizer=tok, tokens_per_image=5, transform=T.ToTensor(), prompt="p",
                             max_seq_len=40)
    long = dataset[0]
    assert len(long["tokens"]) == 40 and long["tokens"].count(tok.image_token_id) == 10
    assert long["truncated"] and long["labels"][-1] == 4  # the end-of-turn token stays
    assert count_truncated(dataset) == 1
    dataset.max_seq_len = 12  # the prompt of the two-image sample alone takes 13 tokens
    with pytest.raises(ValueError, match="m.jsonl:1: sample 'long': the prompt needs 13 tokens \\(10 of them image"):
        dataset[0]


def test_duplicate_ids_keep_the_first_and_skip_lists_the_rest(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "a.png", "caption": "first"},
                                                  {"id": "b", "image": "a.png", "caption": "other"},
                                                  {"id": "a", "image": "a.png", "caption": "second"}])
    dataset = CaptionDataset(manifest, on_bad_sample="skip")
    assert [(s["id"], s["caption"]) for s in dataset.samples] == [("a", "first"), ("b", "other")]
    assert [str(p) for p in dataset.problems] == [f"{manifest}:3: sample 'a': duplicate id (first at line 1)"]


def test_malformed_csv_and_json_name_the_line(tmp_path):
    png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text('id,image,caption\na,a.png,"one, two"\nb,a.png,three,four\n', encoding="utf-8")
    dataset = CaptionDataset(str(manifest), on_bad_sample="skip")
    assert [s["caption"] for s in dataset.samples] == ["one, two"]
    assert [str(p) for p in dataset.problems] == [
        f"{manifest}:3: sample 'b': 4 fields where the header has 3 (id, image, caption); quote fields that "
        f"contain commas"]
    manifest.write_text('id,image,caption\na,a.png,fine\nb,a.png,"never closed\nc,a.png,x\n', encoding="utf-8")
    with pytest.raises(DataFileError, match="m.csv:4: malformed CSV \\(unexpected end of data\\)"):
        CaptionDataset(str(manifest), on_bad_sample="skip")  # a broken file cannot be skipped
    annotation = tmp_path / "annotation.json"
    annotation.write_text('{"train": [\n  {"id": "a", "report": "x", "image_path": ["a.png"]},\n  {"id": "b",,}\n]}')
    with pytest.raises(DataFileError, match="annotation.json:3: invalid JSON \\(Expecting property name"):
        CaptionDataset(format="r2gen_iuxray", data_dir=str(tmp_path), split="train")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"id": "a", "image": "a.png", "caption": "x"}\n{"id": "b", "image": \n')
    with pytest.raises(DataFileError, match="m.jsonl:2: invalid JSON"):
        CaptionDataset(str(jsonl))


def test_non_utf8_text_names_the_line(tmp_path):
    manifest = tmp_path / "train_captions.csv"
    manifest.write_bytes("ID,Caption\nx,Normal.\ny,Rx du f\xe9mur.\n".encode("latin-1"))
    with pytest.raises(DataFileError, match="train_captions.csv:3: not UTF-8 text \\(byte 0xe9 at offset 30\\); "
                                            "re-encode the file as UTF-8"):
        read_csv(manifest, ["ID", "Caption"], "ID")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataFileError, match="train_captions.csv:3: not UTF-8"):
        CaptionDataset(format="imageclef", data_dir=str(tmp_path), split="train")


def test_skip_summarises_and_lists_skipped_samples_per_data_set(tmp_path):
    png(tmp_path / "a.png")
    listing = tmp_path / "out/skipped_samples.csv"
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "image": "a.png", "caption": "x"},
                                                   {"id": "b", "image": "gone.png", "caption": "x"},
                                                   {"id": "c", "image": "a.png", "caption": ""},
                                                   {"image": "a.png", "caption": "no id"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"id": "v", "image": "a.png", "caption": " "},
                                               {"id": "w", "image": "a.png", "caption": "x"}])
    dataset = CaptionDataset(train, on_bad_sample="skip", skipped_samples_csv=str(listing))
    assert [s["id"] for s in dataset.samples] == ["a"]
    assert dataset.skip_summary() == ("skipped 3 of 4 samples: 1 x empty caption, 1 x image file not found, "
                                      "1 x missing id")
    CaptionDataset(val, on_bad_sample="skip", skipped_samples_csv=str(listing))

    def listed():
        with listing.open(newline="", encoding="utf-8") as f:
            return [(Path(r["dataset"]).name, r["id"], r["line"], r["field"], r["reason"]) for r in csv.DictReader(f)]

    assert listed() == [("train.jsonl", "b", "2", "image", "image file not found"),
                        ("train.jsonl", "c", "3", "caption", "empty caption"),
                        ("train.jsonl", "", "4", "id", "missing id"),
                        ("val.jsonl", "v", "1", "caption", "empty caption")]
    # building the training set again after fixing it drops its old rows and keeps the validation set's
    write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "image": "a.png", "caption": "x"}])
    CaptionDataset(train, on_bad_sample="skip", skipped_samples_csv=str(listing))
    assert listed() == [("val.jsonl", "v", "1", "caption", "empty caption")]
    with pytest.raises(ValueError, match="on_bad_sample must be one of \\('error', 'skip'\\), got 'ignore'"):
        CaptionDataset(train, on_bad_sample="ignore")
