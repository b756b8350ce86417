"""The submission check that ``evaluate`` runs on every predictions file before scoring it (the ImageCLEFmedical
rules, applied to every preset): a UTF-8 ``ID,caption`` CSV (header optional; a byte-order mark is accepted)
holding every reference ID exactly once and nothing else, each row with as many fields as the header."""

from pathlib import Path

from medcap.metrics.io import NO_HEADER, csv_rows, field_count_error, read_text


def check_submission(path: str | Path, test_ids: list[str] | set[str]) -> list[str]:
    """Every problem found, each naming the file and line; an empty list means the file is valid."""
    path = Path(path)
    try:
        text = read_text(path)
    except ValueError as e:  # a missing file or one that is not UTF-8
        return [str(e)]
    expected = set(test_ids)
    problems, seen = [], set()
    header, id_col = None, 0
    try:
        for index, (line, row) in enumerate(csv_rows(path, text)):
            names = [name.strip().lower() for name in row]
            if index == 0 and "id" in names:
                header, id_col = row, names.index("id")
                continue
            if len(row) != len(header or NO_HEADER):
                problems.append(field_count_error(path, line, row, header or NO_HEADER))
                continue
            sample_id = row[id_col]
            if not sample_id.strip():
                problems.append(f"{path}: line {line}: empty ID")
            elif sample_id not in expected:
                problems.append(f"{path}: line {line}: ID {sample_id!r} is not in the test set")
            elif sample_id in seen:
                problems.append(f"{path}: line {line}: ID {sample_id!r} appears more than once")
            seen.add(sample_id)
    except ValueError as e:  # broken quoting: the rest of the file cannot be read row by row
        problems.append(str(e))
        return problems
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"{path}: {len(missing)} test ID(s) have no caption, e.g. {missing[:5]}")
    return problems
