"""Reading prediction/reference files and writing prediction CSVs."""

import csv
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from medcap.atomic import replaced_atomically
from medcap.data.problems import json_values, read_text
from medcap.data.records import id_text

_ID_COLUMNS = ("ID", "id", "Id")
NO_HEADER = ("ID", "caption")  # the columns of a predictions file without a header line
_CAPTION_COLUMNS = ("caption", "Caption", "CAPTION", "answer", "prediction")


def csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields) for each row that is not blank. Broken quoting (a quote never closed,
    text after a closing quote) is an error naming the line: read leniently it would swallow the rows after it."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # keeps newlines inside quoted captions
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise ValueError(f"{path}: line {start}: malformed CSV ({e}); quote fields that contain commas, "
                             f"quotes or newlines") from None
        if row is None:
            return
        if any(field.strip() for field in row):
            yield start, row


def field_count_error(path: Path, line: int, row: list[str], header: list[str]) -> str:
    return (f"{path}: line {line}: expected {len(header)} fields ({','.join(header)}), found "
            f"{len(row)}; quote fields that contain commas")


def _read_csv_rows(path: Path, header_optional: bool = False) -> list[tuple[int, str, str]]:
    """(line, id, caption) of every row of an ``ID,caption`` CSV with a header (or, with ``header_optional``, a
    file whose first row has no ``ID`` column is read as ``ID,caption`` rows from its first line, as the
    submission check reads it). A row with more or fewer fields than the header is an error naming the line (an
    unquoted comma would otherwise cut the caption short)."""
    rows = csv_rows(path, read_text(path))
    first_line, header = next(rows, (1, []))
    names = [name.strip() for name in header]
    if header_optional and header and "id" not in [name.lower() for name in names]:
        rows = itertools.chain([(first_line, header)], rows)
        header = names = NO_HEADER
    id_col = next((names.index(c) for c in _ID_COLUMNS if c in names), None)
    cap_col = next((names.index(c) for c in _CAPTION_COLUMNS if c in names), None)
    if id_col is None or cap_col is None:
        raise ValueError(f"{path}: line 1: expected columns ID,caption, found {header}")
    out = []
    for line, row in rows:
        if len(row) != len(header):
            raise ValueError(field_count_error(path, line, row, header))
        sample_id = row[id_col].strip()
        if not sample_id:
            raise ValueError(f"{path}: line {line}: field {names[id_col]!r} is empty")
        out.append((line, sample_id, row[cap_col]))
    return out


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of JSONL ``text`` read from ``path`` (``json_values``'s lines);
    invalid JSON is an error naming the line."""
    return json_values(text, lambda line, why: ValueError(f"{path}: line {line}: invalid JSON ({why})"))


def iter_jsonl(path: Path):
    """(line number, id, row) for each non-blank line of a JSONL file whose rows carry an ``id``; invalid JSON, a
    row that is not an object or a missing id is an error naming the line."""
    for line_no, row in json_lines(path, read_text(path)):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_no}: expected a JSON object, found {type(row).__name__}")
        sample_id = id_text(row.get("id"))
        if not sample_id:
            raise ValueError(f"{path}: line {line_no}: field 'id' is missing or empty")
        yield line_no, sample_id, row


def read_predictions(path: str | Path, header_optional: bool = False) -> dict[str, str]:
    """``ID,caption`` CSV (UTF-8) -> {id: caption}. Duplicate or empty IDs are errors naming the line.
    ``header_optional``: a file without a header line is read too (an ImageCLEF submission may leave it out; the
    evaluate recipe reads so after ``check_submission`` has matched its IDs to the test set: elsewhere a header
    with other column names is an error rather than a row of data)."""
    path = Path(path)
    predictions: dict[str, str] = {}
    for line, sample_id, caption in _read_csv_rows(path, header_optional):
        if sample_id in predictions:
            raise ValueError(f"{path}: line {line}: duplicate ID {sample_id!r}")
        predictions[sample_id] = caption
    return predictions


def read_references(path: str | Path) -> dict[str, list[str]]:
    """References from an ``ID,caption`` CSV or a JSONL manifest (``id`` with ``caption`` or a ``captions``
    list); repeated ids accumulate captions."""
    path = Path(path)
    references: dict[str, list[str]] = {}
    if path.suffix.lower() == ".csv":
        for _, sample_id, caption in _read_csv_rows(path):
            references.setdefault(sample_id, []).append(caption)
        return references
    for line_no, sample_id, row in iter_jsonl(path):
        if row.get("captions") is not None:
            field, captions = "captions", row["captions"]
            ok, wanted = isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions), \
                "a non-empty list of texts"
        else:
            field, captions = "caption", [row.get("caption")]
            ok, wanted = isinstance(row.get("caption"), str), "text"
        if not ok:
            raise ValueError(f"{path}: line {line_no}: sample {sample_id!r}: field {field!r} is missing or not "
                             f"{wanted} ({json.dumps(row.get(field))})")
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
