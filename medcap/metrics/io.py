"""Reading prediction/reference files and writing prediction CSVs."""

import csv
import io
import json
from pathlib import Path

from medcap.atomic import replaced_atomically

_ID_COLUMNS = ("ID", "id", "Id")
_CAPTION_COLUMNS = ("caption", "Caption", "CAPTION", "answer", "prediction")


def _read_csv_rows(path: Path) -> list[tuple[int, str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps newlines inside quoted captions
    fields = reader.fieldnames or []
    id_col = next((c for c in _ID_COLUMNS if c in fields), None)
    cap_col = next((c for c in _CAPTION_COLUMNS if c in fields), None)
    if id_col is None or cap_col is None:
        raise ValueError(f"{path}: line 1: expected columns ID,caption, found {fields}")
    rows = []
    for row in reader:
        line = reader.line_num
        sample_id = (row.get(id_col) or "").strip()
        if not sample_id:
            raise ValueError(f"{path}: line {line}: field {id_col!r} is empty")
        rows.append((line, sample_id, row.get(cap_col) or ""))
    return rows


def iter_jsonl(path: Path):
    """(line number, id, row) for each non-blank line of a JSONL file whose rows carry an ``id``; invalid JSON or a
    missing id is an error naming the line."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
            sample_id = str(row.get("id") or "").strip() if isinstance(row, dict) else ""
            if not sample_id:
                raise ValueError(f"{path}: line {line_no}: field 'id' is missing or empty")
            yield line_no, sample_id, row


def read_predictions(path: str | Path) -> dict[str, str]:
    """``ID,caption`` CSV (UTF-8) -> {id: caption}. Duplicate or empty IDs are errors naming the line."""
    path = Path(path)
    predictions: dict[str, str] = {}
    for line, sample_id, caption in _read_csv_rows(path):
        if sample_id in predictions:
            raise ValueError(f"{path}: line {line}: duplicate ID {sample_id!r}")
        predictions[sample_id] = caption
    return predictions


def read_references(path: str | Path) -> dict[str, list[str]]:
    """References from an ``ID,caption`` CSV or a JSONL manifest (``id`` with ``caption`` or a ``captions``
    list); repeated ids accumulate captions."""
    path = Path(path)
    references: dict[str, list[str]] = {}
    if path.suffix == ".csv":
        for _, sample_id, caption in _read_csv_rows(path):
            references.setdefault(sample_id, []).append(caption)
        return references
    for line_no, sample_id, row in iter_jsonl(path):
        captions = row.get("captions") or ([row["caption"]] if isinstance(row.get("caption"), str) else None)
        if not captions:
            raise ValueError(f"{path}: line {line_no}: sample {sample_id!r}: field 'caption' is missing")
        references.setdefault(sample_id, []).extend(captions)
    return references


def write_csv_predictions(path: str | Path, predictions: dict[str, str]) -> None:
    """``ID,caption`` CSV, UTF-8, written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "caption"])
        writer.writerows(predictions.items())
