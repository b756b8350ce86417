import hashlib
import json
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import medcap.data.demo_builder as demo
from medcap.data.findings import Findings, caption_for, findings_scores, parse_caption

COUNTS = {"train": 24, "val": 8, "test": 8}
FIELDS = {"id", "image", "caption", "modality", "finding", "location"}


def build(out, seed):
    return demo.build_demo(out, seed=seed, n_train=COUNTS["train"], n_val=COUNTS["val"], n_test=COUNTS["test"])


def file_digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_rows(folder) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
            for split in COUNTS}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    returned = [build(root / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    return root, returned


def test_same_seed_gives_identical_files_and_another_seed_differs(builds):
    root, returned = builds
    assert returned == [COUNTS] * 3
    a, b, c = (file_digests(root / name) for name in "abc")
    assert len(a) == sum(COUNTS.values()) + 4  # images, three manifests, build_info.json
    assert a == b
    assert a.keys() == c.keys()
    differing_images = [k for k in a if k.startswith("images/") and a[k] != c[k]]
    assert len(differing_images) == sum(COUNTS.values())
    assert (root / "a/train.jsonl").read_bytes() != (root / "c/train.jsonl").read_bytes()


def test_manifests_are_valid_and_point_at_256px_rgb_pngs(builds):
    root, _ = builds
    for split, rows in read_rows(root / "a").items():
        assert len(rows) == COUNTS[split]
        for i, row in enumerate(rows):
            assert set(row) == FIELDS
            assert row["id"] == f"demo_{split}_{i:04d}" and row["image"] == f"images/{row['id']}.png"
            with Image.open(root / "a" / row["image"]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (256, 256))
            assert row["modality"] in demo.BASES
            if row["finding"] == "none":
                assert row["location"] == "none"
            else:
                assert row["finding"] in demo.BASES[row["modality"]][1]
                assert row["location"] in demo.BASES[row["modality"]][2]


def test_captions_parse_back_to_the_recorded_labels(builds):
    root, _ = builds
    for rows in read_rows(root / "a").values():
        for row in rows:
            assert parse_caption(row["caption"]) == Findings(row["modality"], row["finding"], row["location"])


def test_splits_are_disjoint_and_each_holds_every_base_image(builds):
    root, _ = builds
    rows = read_rows(root / "a")
    ids = [row["id"] for split_rows in rows.values() for row in split_rows]
    assert len(ids) == len(set(ids))
    digests = file_digests(root / "a" / "images")
    assert len(set(digests.values())) == len(digests)  # no image is repeated, within or across splits
    for split_rows in rows.values():
        assert Counter(row["modality"] for row in split_rows).keys() == demo.BASES.keys()
    train = Counter(row["modality"] for row in rows["train"])
    assert set(train.values()) == {3}


def test_finding_plan_balances_normals_types_and_locations():
    _, kinds, locations = demo.BASES["chest_xray"]
    plan = demo.finding_plan(64, kinds, locations, np.random.default_rng(0))
    counts = Counter(plan)
    assert counts[("none", "none")] == 19  # round(0.3 * 64)
    abnormal = [counts[(kind, location)] for kind in kinds for location in locations]
    assert sum(abnormal) == 45 and min(abnormal) == 5 and max(abnormal) == 6  # 45 over 8 pairs
    assert plan[:19] != [("none", "none")] * 19  # normals are spread, not all first
    assert plan != demo.finding_plan(64, kinds, locations, np.random.default_rng(1))  # shuffled by the seed


def expected_region(modality: str, location: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x range, y range) as fractions of the image where the finding's centre must lie, from the words of
    the location alone. Chest and head use the patient's side: the patient's right is the image's left."""
    x, y = (0.0, 1.0), (0.0, 1.0)
    words = location.split()
    patient_side = modality in ("chest_xray", "head_ct")
    if "right" in words:
        x = (0.0, 0.5) if patient_side else (0.5, 1.0)
    if "left" in words:
        x = (0.5, 1.0) if patient_side else (0.0, 0.5)
    if {"upper", "frontal"} & set(words):
        y = (0.0, 0.5)
    if {"lower", "occipital"} & set(words):
        y = (0.5, 1.0)
    y = {"proximal": (0.0, 0.35), "mid": (0.35, 0.6), "distal": (0.6, 1.0)}.get(words[0], y)
    return x, y


@pytest.mark.parametrize("modality", list(demo.BASES))
def test_drawn_finding_changes_the_pixels_where_the_caption_says(modality):
    base = demo.base_images()[modality]
    _, kinds, locations = demo.BASES[modality]
    for kind in kinds:
        for location in locations:
            drawn, record = demo.make_sample(base, modality, kind, location, np.random.default_rng(7))
            plain, _ = demo.make_sample(base, modality, "none", "none", np.random.default_rng(7))
            assert record["caption"] == caption_for(modality, kind, location)
            # same augmentation, different noise (sigma 3): only the finding changes pixels by more than 40
            changed = np.abs(np.asarray(drawn, dtype=int) - np.asarray(plain, dtype=int)).max(axis=2) > 40
            assert changed.sum() > 150, (kind, location)  # clearly visible: a nodule of radius 16 is ~800 px
            cy, cx = np.argwhere(changed).mean(axis=0) / demo.SIZE
            (x0, x1), (y0, y1) = expected_region(modality, location)
            assert x0 < cx < x1 and y0 < cy < y1, (kind, location, cx, cy)


def test_rebuild_is_skipped_for_the_same_parameters_and_redone_otherwise(tmp_path, capsys):
    build(tmp_path, seed=2)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    build(tmp_path, seed=2)
    assert "already built" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == before
    from medcap.data.demo_vqa import build_demo_vqa

    questions = build_demo_vqa(tmp_path, split="test")
    assert demo.build_demo(tmp_path, seed=2, n_train=8, n_val=8, n_test=8) == {"train": 8, "val": 8, "test": 8}
    assert len(list((tmp_path / "images").glob("*.png"))) == 24  # the earlier build's extra images are gone
    assert not questions.exists()  # and its questions, whose answers were the old images'
    assert "removed the earlier build's VQA questions" in capsys.readouterr().out
    assert json.loads((tmp_path / "build_info.json").read_text())["counts"]["train"] == 8


def test_command_line(tmp_path, monkeypatch, capsys):
    argv = ["demo_builder", "--out", str(tmp_path), "--seed", "5", "--n-train", "8", "--n-val", "8", "--n-test", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    demo.main()
    assert "test: 16 samples" in capsys.readouterr().out
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 16


def test_parse_caption_tolerates_case_punctuation_and_extra_words():
    assert parse_caption("FRONTAL chest radiograph. A rounded nodule in the right upper zone!") == \
        Findings("chest_xray", "nodule", "right upper zone")
    assert parse_caption("Immunohistochemistry stained tissue section, with a dark focal lesion (lower left "
                         "quadrant)") == Findings("histology", "dark_lesion", "lower left quadrant")
    assert parse_caption("Axial CT of the head. No focal abnormality.") == Findings("head_ct", "none", "none")
    # a caption that rambles on is read by what it says first
    assert parse_caption("Axial CT of the head with a bright focal lesion in the left frontal region in the "
                         "right occipital region with a dark focal lesion") == \
        Findings("head_ct", "lesion", "left frontal region")
    assert parse_caption("a radiograph of something") == Findings("unknown", "unknown", "unknown")
    assert parse_caption("Radiograph of the lower leg with a fracture") == Findings("leg_xray", "fracture", "unknown")
    with pytest.raises(ValueError, match="unknown location 'left ear'"):
        caption_for("head_ct", "lesion", "left ear")


def test_findings_scores_on_hand_made_cases():
    references = {
        "a": caption_for("chest_xray", "nodule", "right upper zone"),
        "b": caption_for("chest_xray", "opacity", "left lower zone"),
        "c": caption_for("head_ct", "none", "none"),
        "d": caption_for("fundus", "dark_lesion", "upper left quadrant"),
        "e": caption_for("leg_xray", "fracture", "mid tibial shaft"),
    }
    predictions = {
        "a": "Frontal chest radiograph with a rounded nodule in the right upper zone.",  # all right
        "b": "Frontal chest radiograph with an ill-defined opacity in the right lower zone.",  # wrong side
        "c": "Axial MRI of the abdomen with no focal abnormality.",  # wrong modality, right that it is normal
        "d": "Colour fundus photograph with no focal abnormality.",  # missed the finding
        "extra": "Frontal chest radiograph with no focal abnormality.",  # not a reference: ignored
    }  # "e" has no prediction: wrong on both counts
    assert findings_scores(predictions, references) == {"modality_acc": 3 / 5, "finding_acc": 2 / 5}
    assert findings_scores(references, references) == {"modality_acc": 1.0, "finding_acc": 1.0}
    with pytest.raises(ValueError, match="sample 'x': reference caption 'Normal chest.' is not in the demo"):
        findings_scores({}, {"x": "Normal chest."})
    with pytest.raises(ValueError, match="no references"):
        findings_scores(predictions, {})


def test_a_split_smaller_than_the_number_of_base_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_val=4: each split needs at least 8 samples"):
        demo.build_demo(tmp_path, n_train=16, n_val=4, n_test=8)
    assert not (tmp_path / "build_info.json").exists()
