"""What can be wrong with a data set, and how it is told: every problem names the file, the line (or the item of
a JSON file that has no line information), the sample ID and the field. Text files are read strictly: UTF-8,
valid JSON, well-formed CSV, or a ``DataFileError`` that says where."""

import codecs
import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.atomic import replaced_atomically

ON_BAD_SAMPLE = ("error", "skip")


@dataclass(frozen=True)
class Source:
    """Where a sample was read: ``file:line`` for line-based files, ``file: item`` (e.g. ``train[3]``) for JSON."""

    file: str
    line: int | None = None
    item: str | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return f"{self.file}: {self.item}" if self.item is not None else self.file


@dataclass(frozen=True)
class Problem:
    """One bad sample. ``reason`` is short and the same for every problem of a kind (summaries count it);
    ``detail`` says what is wrong and names the field."""

    source: Source
    sample_id: str | None
    field: str | None
    reason: str
    detail: str

    def __str__(self) -> str:
        sample = f"sample {self.sample_id!r}: " if self.sample_id else ""
        return f"{self.source}: {sample}{self.detail}"


class DataFileError(ValueError):
    """A whole file that cannot be used (missing, not UTF-8, malformed JSON or CSV); skipping cannot help."""


class SplitMissingError(DataFileError):
    """A split that the data set does not have at all (none of its files or entries exist), as opposed to one
    whose files exist but are broken."""


class CaptionsMissingError(DataFileError):
    """A split without captions (e.g. ImageCLEF's test split) used where captions are needed."""


class BadSampleError(ValueError):
    """Samples that cannot be used, with ``on_bad_sample: error``; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem], limit: int = 10):
        self.problems = problems
        lines = [str(p) for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more")
        super().__init__(f"{len(problems)} problem(s) in the data set (on_bad_sample: error; `medcap run "
                         f"prepare_data` lists them all, on_bad_sample: skip leaves these samples out):\n  "
                         + "\n  ".join(lines))


def skipped_entries(problems: list[Problem]) -> int:
    """How many rows or samples the problems take out: several problems of one sample share its source."""
    return len({p.source for p in problems})


def summary(problems: list[Problem], total: int) -> str:
    """``skipped 3 of 10 samples: 2 x image file not found, 1 x empty caption``."""
    if not problems:
        return f"skipped 0 of {total} samples"
    reasons = Counter(reason for _, reason in {(p.source, p.reason) for p in problems})
    counts = ", ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {skipped_entries(problems)} of {total} samples: {counts}"


def write_skipped_csv(path: str | Path, dataset: str, problems: list[Problem]) -> Path:
    """Rewrite ``path`` with this data set's problems, keeping the rows other data sets (another split, another
    manifest) wrote there, so that a run's train and validation sets share one ``skipped_samples.csv``."""
    path = Path(path)
    columns = ["dataset", "id", "file", "line", "item", "field", "reason", "detail"]
    kept = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            kept = [row for row in csv.DictReader(f) if row.get("dataset") != dataset]
    rows = kept + [{"dataset": dataset, "id": p.sample_id or "", "file": p.source.file, "line": p.source.line or "",
                    "item": p.source.item or "", "field": p.field or "", "reason": p.reason, "detail": p.detail}
                   for p in problems]
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped), or a DataFileError naming the line of the
    first byte that is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"file not found: {path}")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def json_values(text: str, invalid: Callable[[int, str], Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of JSONL ``text``. Only "\n" ends a line (with an optional
    "\r"): U+2028, U+2029 and NEL may stand unescaped inside a JSON string (``json.dumps(..., ensure_ascii=False)``
    writes them). A line that is not JSON raises ``invalid(line number, the decoder's message)``."""
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise invalid(line_no, e.msg) from None


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, object) for every non-blank line (see ``json_values``)."""
    return list(json_values(read_text(path), lambda line, why: DataFileError(f"{path}:{line}: invalid JSON ({why})")))


def read_csv(path: str | Path, required: list[str], id_column: str,
             optional: tuple[str, ...] = ()) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Rows of a CSV file with a header as (line number where the row starts, {column: value}), with the
    ``required`` columns and those of ``optional`` that the file has. Column names match case-insensitively and
    are returned as spelled in ``required`` / ``optional``. A row with more or fewer
    fields than the header is a Problem (its ID taken from ``id_column`` if present); broken quoting is a
    DataFileError."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    rows, problems = [], []
    try:
        header = next(reader, None)
        if header is None:
            raise DataFileError(f"{path}: empty file; expected a header with columns {', '.join(required)}")
        names = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in required if c.lower() not in names]
        if missing:
            raise DataFileError(f"{path}:1: missing column(s) {', '.join(missing)}; the header is {header}")
        columns = {c: names[c.lower()] for c in [*required, *optional] if c.lower() in names}
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not any(value.strip() for value in row):
                continue
            if len(row) != len(header):
                sample_id = row[columns[id_column]].strip() if columns[id_column] < len(row) else None
                problems.append(Problem(Source(str(path), start), sample_id or None, None, "malformed CSV row",
                                        f"{len(row)} fields where the header has {len(header)} "
                                        f"({', '.join(header)}); quote fields that contain commas"))
                continue
            rows.append((start, {c: row[i] for c, i in columns.items()}))
    except csv.Error as e:
        raise DataFileError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows, problems
