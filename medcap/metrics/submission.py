"""The ImageCLEFmedical submission check: a UTF-8 ``ID,caption`` CSV (header optional) holding every test ID
exactly once and nothing else."""

import csv
import io
from pathlib import Path


def check_submission(path: str | Path, test_ids: list[str] | set[str]) -> list[str]:
    """Every problem found, each naming the file and line; an empty list means the file is valid."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return [f"{path}: file not found"]
    except UnicodeDecodeError as e:
        return [f"{path}: not UTF-8 text (byte {e.start})"]
    expected = set(test_ids)
    problems, seen = [], set()
    rows = list(csv.reader(io.StringIO(text)))
    start = 1 if rows and rows[0] and rows[0][0].strip().lower() == "id" else 0
    for line, row in enumerate(rows[start:], start + 1):
        if not row:
            continue
        if len(row) != 2:
            problems.append(f"{path}: line {line}: expected 2 fields ID,caption, found {len(row)}")
            continue
        sample_id = row[0]
        if not sample_id.strip():
            problems.append(f"{path}: line {line}: empty ID")
        elif sample_id not in expected:
            problems.append(f"{path}: line {line}: ID {sample_id!r} is not in the test set")
        elif sample_id in seen:
            problems.append(f"{path}: line {line}: ID {sample_id!r} appears more than once")
        seen.add(sample_id)
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"{path}: {len(missing)} test ID(s) have no caption, e.g. {missing[:5]}")
    return problems
