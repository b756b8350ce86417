"""Readers for medical VQA data sets: OmniMedVQA and VQA-RAD. Records carry ``question``, ``options``
({letter: text} or None), ``answer`` and ``modality`` (the names ``medcap.metrics.vqa.read_vqa_references``
reads); as a caption data set the prompt is the question with its options and the caption the answer."""

from pathlib import Path
from typing import Any

from medcap.data.problems import DataFileError, Problem, Source, SplitMissingError, read_json
from medcap.data.records import Samples, drop_duplicates, sample_record, text_or_none
from medcap.metrics.vqa import answer_key


def question_prompt(question: str, options: dict[str, str] | None) -> str:
    """The question, then one line per option: ``A. text``."""
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in (options or {}).items()]
    return "\n".join(lines)


def vqa_record(source: Source, row: dict[str, Any], options: dict[str, str] | None, **fields: Any) -> dict[str, Any]:
    """``row`` is what ``vqa_row`` returns."""
    return sample_record(row["id"], [row["image"]], row["answer"], source,
                         prompt=question_prompt(row["question"], options), caption_field=row["answer_key"],
                         image_field=row["image_key"], question=row["question"], options=options,
                         answer=row["answer"], **fields)


def read_omnimedvqa(data_dir: Path, split: str, access: str = "Open-access",
                    subsets: list[str] | None = None, modalities: list[str] | None = None) -> Samples:
    """OmniMedVQA: ``QA_information/{access}/*.json``, each a list of ``{question_id, question, option_A..option_D,
    gt_answer, image_path (relative to data_dir), modality_type, question_type, dataset}``. The benchmark is
    one test set: ``split`` must be ``test``. ``subsets`` keeps only these files (names without ``.json``).
    Samples get ``question``, ``options`` ({letter: text}), ``answer``, ``modality``, ``question_type`` and
    ``subset``; the prompt is the question with its options, the caption the answer. ``modalities`` keeps only
    the questions whose ``modality_type`` is one of these strings, exactly as the files spell them (the medcap
    seed's eight; a listed modality no question has is an error)."""
    if split != "test":
        raise ValueError(f"OmniMedVQA is a single test set: use split: test (got {split!r})")
    folder = data_dir / "QA_information" / access
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataFileError(f"no OmniMedVQA question files (*.json) in {folder}")
    if subsets is not None:
        subsets = list(subsets)
        unknown = set(subsets) - {f.stem for f in files}
        if unknown:
            raise DataFileError(f"{folder}: no subset(s) {sorted(unknown)}; it has {[f.stem for f in files]}")
        files = [f for f in files if f.stem in subsets]
    samples, problems, found = [], [], set()
    for path in files:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataFileError(f"{path}: expected a JSON list of questions (OmniMedVQA's layout)")
        for index, row in enumerate(rows):
            source = Source(str(path), item=f"[{index}]")
            if not isinstance(row, dict):  # reported whichever modalities are kept
                problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
                continue
            modality = row.get("modality_type", row.get("modality"))
            found.add(modality)
            if modalities is not None and modality not in modalities:
                continue  # a question left out is not checked either
            record = vqa_row(source, row, data_dir, problems, id_key="question_id", image_key="image_path",
                             answer_key="gt_answer")
            if record is None:
                continue
            options = dict(sorted((k[len("option_"):], str(v)) for k, v in row.items()  # A, B, C, D as printed
                                  if k.startswith("option_") and v not in (None, "")))
            if options and record["answer"] is not None and answer_key(record["answer"], options) is None:
                problems.append(Problem(source, record["id"], "gt_answer", "answer not an option",
                                        f"gt_answer {record['answer']!r} names none of the options {options}"))
                continue
            samples.append(vqa_record(source, record, options or None, modality=modality,
                                      question_type=row.get("question_type"), subset=row.get("dataset")))
    unknown = [m for m in modalities or [] if m not in found]
    if unknown:
        raise DataFileError(f"{folder}: no question has modality_type {unknown}; the files have "
                            f"{sorted(map(str, found))}")
    return drop_duplicates(samples, problems, "question_id"), problems


def vqa_row(source: Source, row: Any, image_root: Path, problems: list[Problem], id_key: str, image_key: str,
            answer_key: str) -> dict[str, Any] | None:
    """ID, image path, question and answer of a VQA row, or None after adding the problem to ``problems``."""
    if not isinstance(row, dict):
        problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
        return None
    sample_id = text_or_none(row.get(id_key)) or ""
    if not sample_id.strip():
        problems.append(Problem(source, None, id_key, "missing id", f"field {id_key!r} is missing or empty"))
        return None
    image, question = text_or_none(row.get(image_key)), text_or_none(row.get("question"))
    for field, value in ((image_key, image), ("question", question)):
        if not value or not value.strip():
            problems.append(Problem(source, sample_id.strip(), field, f"missing {field}",
                                    f"field {field!r} is missing or empty"))
            return None
    return {"id": sample_id.strip(), "image": str(image_root / image), "question": question,
            "answer": text_or_none(row.get(answer_key)), "answer_key": answer_key, "image_key": image_key}


def read_vqa_rad(data_dir: Path, split: str, annotation_file: str = "VQA_RAD Dataset Public.json",
                 image_folder: str = "VQA_RAD Image Folder", phrase_types: list[str] | None = None,
                 answer_types: list[str] | None = None) -> Samples:
    """VQA-RAD's public JSON (a list of ``{qid, image_name, question, answer, answer_type, image_organ,
    phrase_type}``, images in ``image_folder``). Splits as in the literature: ``test`` = the rows whose
    ``phrase_type`` starts with ``test`` (``test_freeform``, ``test_para``), ``train`` = the others. With
    ``{split}`` in ``annotation_file`` (one file per split, as SLAKE or exported copies have) every row of that
    file belongs to the split; ``img_name`` and ``id`` are read too. Samples get ``question``, ``answer``,
    ``options`` (None: open and yes/no questions), ``modality`` (the row's ``modality`` if it has one),
    ``question_type`` (``answer_type``: CLOSED / OPEN) and ``organ``. ``phrase_types`` / ``answer_types`` keep only
    the rows whose ``phrase_type`` / ``answer_type`` is one of these, compared exactly as the medcap seed compared
    them (its VQA-RAD test: ``phrase_types: [test_freeform, test_para]``, ``answer_types: [CLOSED]``)."""
    per_split_file = "{split}" in annotation_file
    if not per_split_file and split not in ("train", "test"):
        raise ValueError(f"VQA-RAD's splits are train and test (got {split!r})")
    path = data_dir / annotation_file.format(split=split)
    if per_split_file and not path.is_file():
        raise SplitMissingError(f"split {split!r} is absent: {path} does not exist")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: expected a JSON list of questions (VQA-RAD's layout)")
    samples, problems = [], []
    seen = {"phrase_type": set(), "answer_type": set()}
    for index, row in enumerate(rows):
        if isinstance(row, dict) and not per_split_file:
            if not str(row.get("phrase_type") or "").strip():  # the one file's split marker: without it, no split
                problems.append(Problem(Source(str(path), item=f"[{index}]"), str(row.get("qid", "")).strip() or None,
                                        "phrase_type", "no split", "field 'phrase_type' (test_* rows are the test "
                                        "split, the others train) is missing"))
                continue
            in_test = str(row.get("phrase_type", "")).startswith("test")
            if in_test != (split == "test"):
                continue
        if isinstance(row, dict):
            seen["phrase_type"].add(row.get("phrase_type"))
            seen["answer_type"].add(row.get("answer_type"))
            if ((phrase_types is not None and row.get("phrase_type") not in phrase_types)
                    or (answer_types is not None and row.get("answer_type") not in answer_types)):
                continue
        source = Source(str(path), item=f"[{index}]")
        fields = row if isinstance(row, dict) else {}
        id_key = next((k for k in ("qid", "id") if k in fields), "qid")
        image_key = next((k for k in ("image_name", "img_name") if k in fields), "image_name")
        record = vqa_row(source, row, data_dir / image_folder, problems, id_key=id_key, image_key=image_key,
                         answer_key="answer")
        if record is not None:
            samples.append(vqa_record(source, record, None, modality=row.get("modality"),
                                      question_type=row.get("answer_type"), organ=row.get("image_organ")))
    for field, wanted in (("phrase_type", phrase_types), ("answer_type", answer_types)):
        unknown = [v for v in wanted or [] if v not in seen[field]]
        if unknown:
            raise DataFileError(f"{path}: no {split} row has {field} {unknown}; the rows have "
                                f"{sorted(map(str, seen[field]))}")
    return drop_duplicates(samples, problems, "qid"), problems
