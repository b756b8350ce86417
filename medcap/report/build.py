"""What goes into a report page: its rows (captions with the words that differ from the reference marked,
findings parsed from the captions, VQA answers), the per-sample score columns, the sample of rows kept for a
large test set, and the metrics at the top."""

import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from medcap.atomic import write_text
from medcap.data.findings import findings_scores, parse_caption
from medcap.metrics.result import Scored
from medcap.report.page import metrics_table, paired_table, render_page
from medcap.report.thumbnails import relative_url, thumbnail_sources, thumbnails_folder

# the per-sample score a page sorts by first (worst first), the first of these that the scores have
DEFAULT_SORT = ("CIDEr", "BERTScore", "BLEURT", "ROUGE-L", "BLEU-4", "RefCLIPScore", "correct")


@dataclass
class ReportOptions:
    """``report.*`` keys of the evaluate and vqa configs."""
    max_rows: int | None = 5000  # above this, the page keeps the worst third, the best third and a random third
    sort_by: str | None = None  # per-sample score sorted by first; None: the first of DEFAULT_SORT present
    findings: bool | None = None  # mark parsed modality / finding / location; None: when every reference parses
    thumbnail_px: int = 128
    inline_kb: float = 2048  # thumbnails inlined while their total is at most this; else JPEGs beside the page
    seed: int = 0  # the random third of a sampled page

    def __post_init__(self):
        if self.max_rows is not None and self.max_rows < 3:
            raise ValueError(f"report.max_rows must be at least 3 or null, got {self.max_rows}")
        for key, least in (("thumbnail_px", 1), ("inline_kb", 0), ("seed", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"report.{key} must be at least {least}, got {getattr(self, key)}")


def report_options(value) -> ReportOptions | None:
    """The ``report`` config value: false/null -> no report; true -> the defaults; a mapping -> those keys."""
    if value is None or value is False:
        return None
    if value is True:
        return ReportOptions()
    if hasattr(value, "items"):
        known = {f.name for f in fields(ReportOptions)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"report: unknown key(s) {unknown}; known: {sorted(known)}")
        return ReportOptions(**dict(value.items()))
    raise ValueError(f"report must be true, false or a mapping of {[f.name for f in fields(ReportOptions)]}, "
                     f"got {value!r}")


@dataclass
class System:
    """One set of predictions and its scores."""
    name: str
    predictions: dict[str, str]
    scored: Scored
    intervals: dict[str, tuple[float, float]] | None = None
    source: str | None = None  # the predictions file, shown on the page


_WORD = re.compile(r"\S+")


def _norm(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def marked_words(text: str, references: list[str]) -> list[str]:
    """``text`` cut into segments, alternately unmarked and marked (starting unmarked; joined they give
    ``text`` back): marked are the words outside the longest word alignment with the closest reference
    (ignoring case and punctuation)."""
    spans = [m.span() for m in _WORD.finditer(text)]
    words = [_norm(text[a:b]) for a, b in spans]
    alignments = []
    for reference in references or [""]:
        matcher = difflib.SequenceMatcher(None, words, [_norm(w) for w in reference.split()], autojunk=False)
        alignments.append({i for block in matcher.get_matching_blocks() for i in range(block.a, block.a + block.size)})
    same = max(alignments, key=len)  # the first of the best-aligned references
    segments, position = [""], 0
    for i, (start, end) in enumerate(spans):
        marked = i not in same and words[i] != ""  # a word of punctuation only is never marked
        if marked != (len(segments) % 2 == 0):  # the last segment is the marked kind when their number is even
            if marked:  # the space before a marked word stays unmarked
                segments[-1] += text[position:start]
                position = start
            segments.append("")
        segments[-1] += text[position:end]
        position = end
    segments[-1] += text[position:]
    return segments


def _value(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def sample_rows(values: list[float | None], max_rows: int | None, seed: int) -> tuple[list[int], str]:
    """Positions of the rows a page keeps (in their original order) and a note saying what was kept: all of them,
    or, above ``max_rows``, the worst and best thirds by ``values`` (missing values count as worst, ties broken
    at random) and a random third of the rest."""
    n = len(values)
    if max_rows is None or n <= max_rows:
        return list(range(n)), ""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)  # ties (a 0/1 score, many zeros) are broken at random, not by file order
    ranked = sorted(range(n), key=lambda i: (values[i] is not None, values[i] or 0.0, shuffled[i]))
    third = max_rows // 3
    worst, best, middle = ranked[:third], ranked[n - third:], ranked[third:n - third]
    rest = max_rows - 2 * third
    picked = rng.choice(len(middle), size=rest, replace=False)
    keep = sorted(worst + best + [middle[i] for i in picked])
    return keep, f"{max_rows} of {n} rows: the {third} worst, the {third} best and {rest} at random (seed {seed})"


def _default_sort(keys: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise ValueError(f"report.sort_by: no per-sample score {wanted!r}; choose one of {keys}")
        return wanted
    return next((k for k in DEFAULT_SORT if k in keys), keys[0])


def _images(ids: list[str], images: dict[str, list[str]] | None, page: Path,
            options: ReportOptions) -> dict[str, dict]:
    """{id: {"img": src, "href": link to the full image} or {"noimg": why}} for the ids with images."""
    first = {k: ((images or {}).get(k) or [None])[0] for k in ids}
    paths = [p for p in first.values() if p]
    sources, problems = thumbnail_sources(paths, page, options.thumbnail_px, options.inline_kb)
    if problems:
        print(f"report: {len(problems)} image(s) without a thumbnail, e.g. {next(iter(problems.values()))}")
    out = {}
    for k, path in first.items():
        if path in sources:
            out[k] = {"img": sources[path], "href": relative_url(path, page.parent)}
        elif path:
            out[k] = {"noimg": problems[path]}
    return out


def _write(path: Path, title: str, meta: list[str], summary: str, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, render_page(title, meta, summary, data))
    return path


def _score_columns(systems: list[System], parsed: dict | None) -> tuple[list[dict], list[dict], dict[str, list]]:
    """(columns: every sortable score, cells: the score cells of a row, {column key: value per sample}). Each
    per-sample metric of every system, with ``parsed`` findings whether modality and finding + location are right
    (1/0), and the difference of the first two systems."""
    metrics = [(m, "score") for m in systems[0].scored.per_sample] + (
        [("modality", "flag"), ("finding", "flag")] if parsed else [])
    columns, cells, values = [], [], {}
    for metric, kind in metrics:
        keys = []
        for n, s in enumerate(systems):
            key = metric if n == 0 else f"{metric} @ {s.name}"
            columns.append({"key": key, "label": metric if len(systems) == 1 else f"{metric} · {s.name}"})
            keys.append(key)
            if metric == "modality":
                values[key] = [float(g.modality == w.modality) for g, w in zip(parsed["got"][n], parsed["want"])]
            elif metric == "finding":
                values[key] = [float((g.finding, g.location) == (w.finding, w.location))
                               for g, w in zip(parsed["got"][n], parsed["want"])]
            else:
                values[key] = [_value(x) for x in s.scored.per_sample[metric]]
        if len(systems) > 1:
            key = f"{metric} difference"
            columns.append({"key": key, "label": f"{metric} · {systems[0].name} − {systems[1].name}"})
            values[key] = [None if a is None or b is None else a - b for a, b in zip(values[keys[0]], values[keys[1]])]
        cells.append({"label": f"{metric} ✓" if kind == "flag" else metric, "kind": kind, "columns": keys})
    return columns, cells, values


def caption_report(path: str | Path, systems: list[System], references: dict[str, list[str]],
                   options: ReportOptions | None = None, images: dict[str, list[str]] | None = None,
                   paired: dict[str, dict[str, float]] | None = None, title: str | None = None,
                   meta: list[str] | None = None) -> Path:
    """Write the page of a caption evaluation: ``systems[0]`` with its scores, and the others (``compare_to``)
    beside it; ``paired``: the paired bootstrap of the first two as ``paired.json`` holds it (``metrics``,
    ``resamples``, ``seed``). ``images``: {id: image paths} for thumbnails."""
    options = options or ReportOptions()
    path = Path(path)
    _check_names([s.name for s in systems])
    ids = systems[0].scored.ids
    for s in systems[1:]:
        if s.scored.ids != ids:
            raise ValueError(f"report: {s.name} was scored on other samples than {systems[0].name}")
    first_refs = {k: references[k][0] if references[k] else "" for k in ids}
    want = [parse_caption(first_refs[k]) for k in ids]
    findings = options.findings
    if findings is None:  # a data set with findings: every reference is in the demo templates
        findings = all("unknown" not in (w.modality, w.finding, w.location) for w in want)
    parsed = None
    if findings:
        parsed = {"want": want, "got": [[parse_caption(s.predictions[k]) for k in ids] for s in systems]}

    columns, cells, values = _score_columns(systems, parsed)
    sort = _default_sort([c["key"] for c in columns], options.sort_by)
    keep, note = sample_rows(values[sort], options.max_rows, options.seed)
    thumbs = _images([ids[i] for i in keep], images, path, options)
    rows = []
    for i in keep:
        k = ids[i]
        row = {"id": k, **thumbs.get(k, {}), "refs": references[k],
               "preds": [marked_words(s.predictions[k], references[k]) for s in systems],
               "s": [values[c["key"]][i] for c in columns]}
        if parsed:
            row["found"] = {"want": [want[i].modality, want[i].finding, want[i].location],
                            "got": [[g[i].modality, g[i].finding, g[i].location] for g in parsed["got"]]}
        rows.append(row)

    corpus = {s.name: dict(s.scored.corpus) for s in systems}
    if findings:
        for s in systems:
            corpus[s.name].update(findings_scores(s.predictions, first_refs))
    summary = metrics_table(corpus, {s.name: s.intervals for s in systems if s.intervals})
    if findings:
        summary += ('<p class="meta">modality / finding: parsed from the captions (the demo templates); '
                    'finding = finding type and location right.</p>')
    if paired and len(systems) > 1:
        summary += _paired_summary(systems[0].name, systems[1].name, corpus[systems[0].name], paired)
    lines = [f"{len(ids)} images" + (f"; the page holds {note}" if note else ""),
             *(f"{s.name}: {s.source}" for s in systems if s.source), *(meta or [])]
    data = {"kind": "caption", "systems": [s.name for s in systems], "columns": columns, "cells": cells,
            "sort": sort, "rows": rows}
    return _write(path, title or f"medcap evaluation: {systems[0].name}", lines, summary, data)


def _check_names(names: list[str]) -> None:
    if len(set(names)) < len(names):
        raise ValueError(f"report: two systems share a name in {names}; give each its own")


def _paired_summary(a: str, b: str, first: dict[str, float], paired: dict) -> str:
    metrics = paired["metrics"]
    order = sorted(metrics, key=lambda m: list(first).index(m) if m in first else len(first))  # as the table above
    return paired_table(a, b, {m: metrics[m] for m in order}, paired["resamples"], paired["seed"])


def vqa_report(path: str | Path, records: list[dict], corpus: dict[str, float],
               intervals: dict[str, tuple[float, float]] | None = None, images: dict[str, list[str]] | None = None,
               options: ReportOptions | None = None, name: str = "answers", title: str | None = None,
               meta: list[str] | None = None, other: tuple[str, dict, dict | None] | None = None,
               paired: dict | None = None) -> Path:
    """Write the page of a VQA run. ``records``: one per question, as the vqa recipe's ``predictions.jsonl``
    (id, question, options, raw_answer, parsed_option, correct_option, answer, correct, modality; description).
    ``other``: (name, corpus, intervals) of a second system (``compare_to``; its answers are not shown),
    ``paired``: the paired bootstrap of the two as ``paired.json`` holds it."""
    options = options or ReportOptions()
    path = Path(path)
    columns = [{"key": "correct", "label": "correct"}]
    cells = [{"label": "right", "kind": "flag", "columns": ["correct"]}]
    sort = _default_sort(["correct"], options.sort_by)
    keep, note = sample_rows([float(r["correct"]) for r in records], options.max_rows, options.seed)
    thumbs = _images([records[i]["id"] for i in keep], images, path, options)
    rows = []
    for i in keep:
        r = records[i]
        rows.append({"id": r["id"], **thumbs.get(r["id"], {}), "q": r.get("question"),
                     "opts": [[str(k), str(v)] for k, v in r["options"].items()] if r.get("options") else None,
                     "key": r.get("correct_option"), "answer": r.get("answer"), "raw": r.get("raw_answer", ""),
                     "parsed": r.get("parsed_option"), "ok": bool(r["correct"]), "group": r.get("modality"),
                     "desc": r.get("description"), "s": [float(r["correct"])]})
    def with_counts(values: dict[str, float]) -> dict[str, float]:  # n and unparsed shown as integers
        return {k: int(v) if k in ("n", "unparsed") else v for k, v in values.items()}

    corpora = {name: with_counts(corpus)}
    all_intervals = {name: intervals} if intervals else {}
    if other is not None:
        _check_names([name, other[0]])
        corpora[other[0]] = with_counts(other[1])
        if other[2]:
            all_intervals[other[0]] = other[2]
    summary = metrics_table(corpora, all_intervals or None)
    if other is not None and paired:
        summary += _paired_summary(name, other[0], corpus, paired)
    lines = [f"{len(records)} questions" + (f"; the page holds {note}" if note else ""), *(meta or [])]
    data = {"kind": "vqa", "systems": [name], "columns": columns, "cells": cells, "sort": sort, "rows": rows}
    return _write(path, title or f"medcap VQA: {name}", lines, summary, data)


def scoring_outputs(folder: Path) -> list[Path]:
    """The outputs of a scoring (evaluate, vqa) beside its metrics.json that a run may or may not write. An earlier
    scoring's are removed before a new one writes anything: a run that fails part-way must not leave them beside
    its own scores."""
    return [folder / "intervals.json", folder / "paired.json", folder / "report.html",
            thumbnails_folder(folder / "report.html")]


def manifest_images(path: str | Path) -> dict[str, list[str]]:
    """{id: image paths} of a manifest's rows that have images (none for a references CSV without them)."""
    from medcap.data.problems import DataFileError
    from medcap.data.records import read_manifest_samples

    if Path(path).suffix.lower() not in (".jsonl", ".csv"):
        return {}
    try:
        samples, _ = read_manifest_samples(path)  # rows without an image get no thumbnail
    except DataFileError:  # a CSV without an image column
        return {}
    return {s["id"]: s["images"] for s in samples}


def evaluation_report(page: str | Path, options: ReportOptions, preset: str, scored: Scored, name: str,
                      predictions: str, references_path: str, references: dict, intervals: dict | None = None,
                      other: tuple[str, str, Scored, dict] | None = None, resamples: int = 0, seed: int = 0) -> Path:
    """The evaluate recipe's page. ``other``: (name, predictions file, scores, paired bootstrap as ``paired.json``
    holds it) of ``compare_to``."""
    from medcap.metrics import bootstrap_ci, read_predictions

    if preset == "vqa":  # read_vqa_references' ids and image paths
        images = {k: q["images"] for k, q in references.items() if q.get("images")}
    else:
        images = manifest_images(references_path)
    meta = [f"references: {references_path}"]
    if not images:
        meta.append("no thumbnails: no reference has an image path (field image)")
    other_intervals = None
    if other is not None and resamples:
        other_intervals = bootstrap_ci(other[2], resamples, seed)
    if preset == "vqa":
        from medcap.metrics.vqa import parse_choice
        from medcap.vqa import correct_option

        answers = read_predictions(predictions, header_optional=True)
        correct = dict(zip(scored.ids, scored.per_sample["correct"].tolist()))
        records = [{**q, "question": q.get("question"), "raw_answer": answers[k], "correct": correct[k],
                    "parsed_option": parse_choice(answers[k], q["options"]) if q.get("options") else None,
                    "correct_option": correct_option(str(q["answer"]), q.get("options"))}
                   for k, q in references.items()]
        compared = None
        if other is not None:
            compared = (other[0], other[2].corpus, other_intervals)
            meta.insert(0, f"{other[0]}: {other[1]} (its answers are not shown)")
        return vqa_report(page, records, scored.corpus, intervals, images, options, name,
                          meta=[f"{name}: {predictions}", *meta], other=compared,
                          paired=other[3] if other is not None else None)
    systems = [System(name, read_predictions(predictions, header_optional=True), scored, intervals, predictions)]
    paired = None
    if other is not None:
        other_name, other_file, other_scored, paired = other
        systems.append(System(other_name, read_predictions(other_file, header_optional=True), other_scored,
                              other_intervals, other_file))
    refs = {k: [v] if isinstance(v, str) else list(v) for k, v in references.items()}
    return caption_report(page, systems, refs, options, images, paired, meta=meta)
