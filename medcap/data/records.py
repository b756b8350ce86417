"""The sample records every reader returns, and the checks they share.

A record is a dict with ``id``, ``images`` (absolute paths, one image-token block each, in order), ``caption``
(None where the split has none), ``prompt`` (None: the data set's default prompt), ``source`` (where it was read)
and format-specific fields. Readers return ``(records, problems)``: ``problems`` are the rows that could not
become records (missing ID, duplicate ID, malformed row, missing image, ``<image>`` tags that do not match the
images); a file that cannot be read at all raises ``DataFileError``.
"""

import json
from pathlib import Path
from typing import Any

from medcap.data.problems import Problem, Source, read_csv, read_jsonl

Samples = tuple[list[dict[str, Any]], list[Problem]]


def sample_record(sample_id: str, images: list[str], caption: str | None, source: Source, prompt: str | None = None,
                  caption_field: str = "caption", image_field: str = "image", **fields: Any) -> dict[str, Any]:
    """``caption_field`` and ``image_field`` are the names the file gives these fields, for messages."""
    return {"id": sample_id, "images": images, "caption": caption, "prompt": prompt, "source": source,
            "caption_field": caption_field, "image_field": image_field, **fields}


def text_or_none(value: Any) -> str | None:
    """Text fields as read: strings stay, numbers (some VQA-RAD answers and IDs) become text, others are None."""
    return str(value) if isinstance(value, (str, int, float)) else None


def id_text(value: Any) -> str:
    """A sample ID as read: text stripped, a JSON number its text (0 is "0", not missing), None "" (missing)."""
    return "" if value is None else str(value).strip()


def caption_not_text(value: Any, source: Source, sample_id: str, field: str, what: str = "caption") -> Problem | None:
    """A caption or report (or a prompt: ``what``) must be text or absent (null): a JSON number, boolean, list or
    object is a problem, not a caption (``12345`` would otherwise train as the caption "12345")."""
    if value is None or isinstance(value, str):
        return None
    kind = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(type(value), "value")
    return Problem(source, sample_id, field, f"{what} not text",
                   f"field {field!r} is a JSON {kind} ({json.dumps(value)[:60]}), not text; write the {what} as a "
                   f"JSON string")


def drop_duplicates(samples: list[dict[str, Any]], problems: list[Problem],
                    id_field: str = "id") -> list[dict[str, Any]]:
    """Keeps the first sample of each ID; every later one is a problem that names where the first is.
    ``id_field`` is the name the file gives the ID."""
    first: dict[str, Source] = {}
    kept = []
    for s in samples:
        if s["id"] in first:
            where = first[s["id"]]
            at = f"line {where.line}" if where.line is not None and where.file == s["source"].file else str(where)
            problems.append(Problem(s["source"], s["id"], id_field, "duplicate id", f"duplicate id (first at {at})"))
        else:
            first[s["id"]] = s["source"]
            kept.append(s)
    return kept


def image_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    return []


def read_manifest_samples(path: str | Path) -> Samples:
    """A JSONL (one object per line) or CSV manifest with ``id``, ``image`` (a path, or a list of paths; in CSV
    several paths are joined with ``;``), ``caption`` and optional ``prompt``. Relative image paths are resolved
    against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() == ".csv":
        rows, problems = read_csv(path, ["id", "image"], "id", optional=("caption", "prompt"))
        for _, row in rows:
            row["image"] = [p for p in (row.get("image") or "").split(";") if p]
    else:
        rows, problems = read_jsonl(path), []
    samples = []
    for line_no, row in rows:
        source = Source(str(path), line_no)
        if not isinstance(row, dict):
            problems.append(Problem(source, None, None, "malformed row", "expected a JSON object"))
            continue
        sample_id = id_text(row.get("id"))
        if not sample_id:
            problems.append(Problem(source, None, "id", "missing id", "field 'id' is missing or empty"))
            continue
        images = image_list(row.get("image"))
        if not images:
            problems.append(Problem(source, sample_id, "image", "missing image",
                                    "field 'image' is missing or empty"))
            continue
        problem = (caption_not_text(row.get("caption"), source, sample_id, "caption")
                   or caption_not_text(row.get("prompt"), source, sample_id, "prompt", what="prompt"))
        if problem:
            problems.append(problem)
            continue
        samples.append(sample_record(sample_id, [str(path.parent / p) for p in images], row.get("caption"),
                                     source, prompt=row.get("prompt") or None))
    return drop_duplicates(samples, problems), problems
