"""A small multiple-choice VQA set built from the demo data's labels, in OmniMedVQA's layout, so that the VQA
recipe runs on it with ``format: omnimedvqa``.

    python -m medcap.data.demo_vqa --data datasets/demo --split test

For every image of the split: the imaging modality, the body part (not asked of the histology slides, which show
no body part) and whether there is a focal abnormality. Writes ``<data>/QA_information/Open-access/demo_<split>.json``
(a list of ``{question_id, question, option_A.., gt_answer, image_path, modality_type, question_type, dataset}``;
``gt_answer`` is the right option's text, as in OmniMedVQA; ``modality_type`` is the demo's modality key, so
accuracy is reported per base image). For the modality and body part the right option's letter is drawn at
random (seeded) and the distractors from the other answers of the same question; the abnormality question is
always A. Yes, B. No.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from medcap.atomic import write_json
from medcap.data.problems import DataFileError, read_jsonl

# demo modality key -> (imaging modality, body part or None)
ANSWERS = {
    "chest_xray": ("Radiograph", "Chest"),
    "leg_xray": ("Radiograph", "Lower leg"),
    "head_ct": ("CT", "Head"),
    "shoulder_mr": ("MRI", "Shoulder"),
    "abdomen_mr": ("MRI", "Abdomen"),
    "ultrasound": ("Ultrasound", "Lymph node"),
    "fundus": ("Fundus photograph", "Eye"),
    "histology": ("Immunohistochemistry", None),
}
QUESTIONS = {
    "modality": ("What is the imaging modality of this image?", "Modality Recognition"),
    "body_part": ("Which body part is shown in this image?", "Anatomy Identification"),
    "abnormality": ("Is there a focal abnormality in this image?", "Disease Diagnosis"),
}
LETTERS = "ABCD"


def multiple_choice(answer: str, pool: list[str], rng: np.random.Generator, n: int = 4) -> dict[str, str]:
    """{letter: text}: ``answer`` and n - 1 other texts of ``pool``, in random order."""
    others = sorted(set(pool) - {answer})
    chosen = [answer] + [others[i] for i in rng.choice(len(others), size=n - 1, replace=False)]
    return {LETTERS[i]: chosen[j] for i, j in enumerate(rng.permutation(n))}


def _read_rows(manifest: Path) -> list[dict]:
    if not manifest.is_file():
        raise DataFileError(f"demo manifest not found: {manifest} (python -m medcap.data.demo_builder builds it)")
    rows = []
    for line_no, row in read_jsonl(manifest):
        if not isinstance(row, dict):
            raise DataFileError(f"{manifest}:{line_no}: expected a JSON object, found {type(row).__name__}")
        for field in ("id", "image", "modality", "finding"):
            if not row.get(field):
                raise DataFileError(f"{manifest}: line {line_no}: sample {row.get('id')!r}: field {field!r} is "
                                    f"missing or empty")
        if row["modality"] not in ANSWERS:
            raise DataFileError(f"{manifest}: line {line_no}: sample {row['id']!r}: field 'modality': unknown "
                                f"modality {row['modality']!r} (known: {sorted(ANSWERS)})")
        rows.append(row)
    return rows


def demo_questions(rows: list[dict], seed: int = 0) -> list[dict]:
    """The OmniMedVQA-style question items of the demo rows (image paths as the rows give them)."""
    rng = np.random.default_rng(seed)
    modalities = [m for m, _ in ANSWERS.values()]
    body_parts = [b for _, b in ANSWERS.values() if b]
    items = []
    for row in rows:
        modality, body_part = ANSWERS[row["modality"]]
        asked = {"modality": multiple_choice(modality, modalities, rng),
                 "abnormality": {"A": "Yes", "B": "No"}}
        if body_part:
            asked["body_part"] = multiple_choice(body_part, body_parts, rng)
        right = {"modality": modality, "body_part": body_part,
                 "abnormality": "No" if row["finding"] == "none" else "Yes"}
        for kind in QUESTIONS:
            if kind not in asked:
                continue
            question, question_type = QUESTIONS[kind]
            items.append({"question_id": f"{row['id']}_{kind}", "question": question,
                          **{f"option_{letter}": text for letter, text in asked[kind].items()},
                          "gt_answer": right[kind], "image_path": row["image"], "modality_type": row["modality"],
                          "question_type": question_type, "dataset": "demo"})
    return items


def build_demo_vqa(data_dir: str | Path = "datasets/demo", split: str = "test", seed: int = 0) -> Path:
    """Write the questions of ``<data_dir>/<split>.jsonl`` to
    ``<data_dir>/QA_information/Open-access/demo_<split>.json`` (image paths stay relative to ``data_dir``, as
    OmniMedVQA's are); returns that path."""
    data_dir = Path(data_dir)
    items = demo_questions(_read_rows(data_dir / f"{split}.jsonl"), seed)
    out = data_dir / "QA_information" / "Open-access" / f"demo_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, items, indent=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="datasets/demo")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_demo_vqa(args.data, args.split, args.seed)
    print(f"{len(json.loads(out.read_text()))} questions -> {out}")


if __name__ == "__main__":
    main()
