import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medcap.data.dataset import CaptionDataset, collate_captions, read_manifest
from medcap.data.demo_builder import build_demo
from medcap.data.findings import caption_for, findings_scores, parse_caption
from medcap.data.images import ImageLoadError, load_image
from medcap.text import IGNORE_INDEX


def write_dicom(path, pixels, photometric="MONOCHROME2", modality="OT", **extra):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_image_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 255)).save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "i16.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (100, 100, 100)
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (10, 20, 30)
    sixteen = np.asarray(load_image(tmp_path / "i16.png"))[..., 0]
    assert sixteen.tolist() == [[0, 64], [128, 255]]  # scaled by the actual range 0..4000
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"


def test_broken_images_raise_naming_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty \\(0 bytes\\): .*empty.png"):
        load_image(tmp_path / "empty.png")
    Image.new("RGB", (64, 64), 5).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")


def test_monochrome1_dicom_is_inverted(tmp_path):
    pixels = np.array([[0, 0, 100, 100], [200, 200, 400, 400]])
    write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    write_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2")
    m1 = np.asarray(load_image(tmp_path / "m1.dcm"))[..., 0].astype(int)
    m2 = np.asarray(load_image(tmp_path / "m2.dcm"))[..., 0].astype(int)
    assert m2.tolist() == [[0, 0, 64, 64], [128, 128, 255, 255]]  # 100/400 * 255 = 63.75
    assert m1.tolist() == [[255, 255, 191, 191], [128, 128, 0, 0]]  # inverted: the highest value is black


def test_ct_dicom_is_windowed_in_hounsfield_units(tmp_path):
    # stored 1024 + HU; window centre 40, width 400 -> [-160, 240] HU maps to [0, 255]
    hu = np.array([[-1000, -160], [40, 240], [1000, 140]])
    write_dicom(tmp_path / "ct.dcm", hu + 1024, modality="CT", RescaleIntercept=-1024, RescaleSlope=1,
                WindowCenter=40, WindowWidth=400)
    out = np.asarray(load_image(tmp_path / "ct.dcm"))[..., 0]
    assert out.tolist() == [[0, 0], [128, 255], [255, 191]]  # 140 HU: 300/400*255 = 191.25
    narrow = np.asarray(load_image(tmp_path / "ct.dcm", window=(40, 80)))[..., 0]
    assert narrow.tolist() == [[0, 0], [128, 255], [255, 255]]


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


def test_findings_parser_and_scores():
    cap = caption_for("chest_xray", "nodule", "right upper zone")
    assert cap == "Frontal chest radiograph with a rounded nodule in the right upper zone."
    f = parse_caption("frontal CHEST radiograph: a rounded nodule, right upper zone")
    assert (f.modality, f.finding, f.location) == ("chest_xray", "nodule", "right upper zone")
    assert parse_caption("Axial CT of the head. No focal abnormality.").finding == "none"
    assert parse_caption("Axial CT of the head with a rounded thing").location == "unknown"
    refs = {"1": cap, "2": caption_for("head_ct", "none", "none"), "3": caption_for("fundus", "dark_lesion", "upper left quadrant")}
    preds = {"1": caption_for("chest_xray", "nodule", "left upper zone"), "2": refs["2"], "3": "Colour fundus photograph"}
    assert findings_scores(preds, refs) == {"modality_acc": 1.0, "finding_acc": pytest.approx(1 / 3)}


def test_demo_builder_is_deterministic_and_captions_follow_the_drawing(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_demo(a, seed=3, n_train=16, n_val=8, n_test=8)
    build_demo(b, seed=3, n_train=16, n_val=8, n_test=8)
    build_demo(c, seed=4, n_train=16, n_val=8, n_test=8)
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    assert (a / "images/demo_test_0003.png").read_bytes() == (b / "images/demo_test_0003.png").read_bytes()
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    rows = [json.loads(line) for split in ("train", "val", "test") for line in (a / f"{split}.jsonl").open()]
    assert len({r["id"] for r in rows}) == 32
    assert len({r["modality"] for r in rows if r["id"].startswith("demo_val")}) == 8  # every base in every split
    for r in rows:
        parsed = parse_caption(r["caption"])
        assert (parsed.modality, parsed.finding, parsed.location) == (r["modality"], r["finding"], r["location"])


def test_drawn_finding_is_where_the_caption_says(tmp_path):
    import medcap.data.demo_builder as demo

    rng = np.random.default_rng(0)
    base = Image.new("RGB", (demo.SIZE, demo.SIZE), (60, 60, 60))
    drawn = np.asarray(demo.draw(base, "nodule", demo.ZONES["right upper zone"], rng), dtype=int)[..., 0]
    changed = np.argwhere(drawn != 60)
    cy, cx = changed.mean(axis=0) / demo.SIZE
    assert cx < 0.45 and cy < 0.45  # patient's right upper zone = the image's upper left


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
