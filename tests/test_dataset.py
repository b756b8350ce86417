import pytest

from medcap.data.dataset import CaptionDataset, collate_captions, read_manifest
from medcap.data.demo_builder import build_demo
from medcap.text import IGNORE_INDEX


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
