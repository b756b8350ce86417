"""VQA accuracy: multiple-choice answers parsed to an option letter, closed answers (yes/no and short answers as
in VQA-RAD) matched after normalisation, overall, macro over groups and per group."""

import re
import string
import unicodedata

_NUMBERS = {word: str(i) for i, word in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_ARTICLES = {"a", "an", "the"}
# every punctuation mark except a period with a digit on both sides (a decimal point)
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + r"]|(?<!\d)\.|\.(?!\d)")

_QUOTES = "\"'\u201c\u201d\u2018\u2019"  # straight and curly quotes
# the whole answer is a letter: "B", "(B)", "B.", "B)", "[B]", a quoted letter
_WHOLE = re.compile(rf"[(\[{_QUOTES}]?\s*([A-Za-z])\s*[)\]{_QUOTES}]?\s*[.:]?")
# the answer starts with a letter, a separator and text: "B. MRI", "B) MRI", "B: MRI", "(B) MRI"
_LEADING = re.compile(r"[(\[]?([A-Za-z])(?:[)\]][.:]?|[.:])\s+\S")
# "Answer: B", "the answer is (B)", "option B", "Option: B", "choice C", 'the option is "D."'; a letter followed by a
# word character, hyphen or apostrophe + word character is the start of a word ("answer: X-ray", "answer is no",
# "answer: I'm"); an opening quote counts only when a closing one follows the letter ('answer is "a mass"' is text)
_PHRASE = re.compile(rf"\b(?:answer|option|choice)\b\s*(?:is\b\s*)?[:=-]?\s*"
                     rf"(?:([(\[])|[{_QUOTES}](?=[a-z][.)]?[{_QUOTES}]))?\s*([a-z])(?![\w-]|'\w)", re.IGNORECASE)
# words that follow a letter but never an article, so "Option A is correct" names option A
_AFTER_LETTER = {"is", "was", "would", "seems", "appears", "because", "since", "as", "which"}


def normalize_answer(text: str) -> str:
    """NFKC, lowercase; punctuation (any Unicode punctuation: curly quotes, dashes...) becomes a space (decimal
    points in numbers stay); drop the articles a/an/the; number words zero..ten become digits; single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ord(c) > 127 and unicodedata.category(c).startswith("P") else c for c in text)
    words = _PUNCT.sub(" ", text).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _reads_as_word(text: str, match: re.Match) -> bool:
    """Whether an unbracketed a/A/i/I after "answer"/"option" is the article or the pronoun, not a letter."""
    bracket, letter = match.group(1), match.group(2)
    if bracket or letter not in "aAiI":
        return False
    following = re.match(r"\s+([A-Za-z]\w*)", text[match.end():])
    if not following or following.group(1).lower() in _AFTER_LETTER:
        return False
    # lowercase "a"/"i" before any word is an article/pronoun; capital "A"/"I" only before a lowercase word
    return letter.islower() or following.group(1)[0].islower()


def _explicit_letter(prediction: str, options: dict[str, str]) -> str | None:
    letters = {str(key).strip().upper(): key for key in options}
    text = prediction.strip()
    candidates = []
    for pattern in (_WHOLE.fullmatch(text), _LEADING.match(text)):
        if pattern:
            candidates.append(pattern.group(1))
    candidates += [m.group(2) for m in _PHRASE.finditer(text) if not _reads_as_word(text, m)]
    for letter in candidates:
        if letter.upper() in letters:
            return letters[letter.upper()]
    return None


def _contains(text: str, phrase: str) -> bool:
    """Whether normalised ``phrase`` occurs in normalised ``text`` as whole words."""
    return f" {phrase} " in f" {text} "


def _option_by_text(prediction: str, options: dict[str, str]) -> str | None:
    said = normalize_answer(prediction)
    normed = {key: normalize_answer(str(text)) for key, text in options.items()}
    hits = {key: norm for key, norm in normed.items() if norm and _contains(said, norm)}
    if not hits:
        return None
    best = max(hits, key=lambda key: len(hits[key]))
    for key, norm in hits.items():
        if key != best and (norm == hits[best] or not _contains(hits[best], norm)):
            return None
    return best


def parse_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The key of ``options`` ({letter: text}) that a free-text answer names, or None.

    1. An explicit letter, the first of these that is a key of ``options`` (letters match case-insensitively):
       the whole answer is a letter ("B", "b", "(B)", "B.", "B)", "[B]", '"B"'); the answer starts with a letter, a
       separator (. ) : or a bracketed letter) and text ("B. MRI", "B) MRI", "(B) MRI"); or "answer", "option"
       or "choice", optionally "is" and ":", then a letter, anywhere ("Answer: B", "the answer is (B)",
       "option B", 'the option is "B."'; a quote before the letter must close right after it). A leading letter
       followed by a space is never a letter ("A nodule is seen"), and after "answer"/"option" an unbracketed
       "a"/"i" before a word, or "A"/"I" before a lowercase word, is the article or pronoun ("the answer is a
       mass"), except before is/was/because/... ("Option A is correct").
    2. Otherwise option text: an option whose normalised text (``normalize_answer``) equals the normalised
       answer or occurs in it as whole words. When several do, the longest wins if it contains all the others
       ("Chest X-ray" over "X-ray"); otherwise the answer is ambiguous and this returns None.
    3. Otherwise None."""
    return _explicit_letter(prediction, options) or _option_by_text(prediction, options)


def closed_match(prediction: str, answer: str) -> bool:
    """Equal after ``normalize_answer``, or, for a yes/no answer, the prediction's first word is that answer
    ("Yes, there is a fracture." matches "yes")."""
    said, truth = normalize_answer(prediction), normalize_answer(answer)
    if said == truth:
        return True
    return truth in ("yes", "no") and said.split(" ", 1)[0] == truth


def _label(record: dict, index: int) -> str:
    return f"id {record['id']!r}" if record.get("id") is not None else f"at index {index}"


def _field(record: dict, index: int, name: str) -> str:
    value = record.get(name)
    if value is None or (name == "answer" and not str(value).strip()):
        raise ValueError(f"record {_label(record, index)} has no {name!r}")
    return str(value)


def answer_key(answer: str, options: dict[str, str]) -> str | None:
    """The option key a multiple-choice reference answer names, or None: the first option whose text is exactly
    the answer (as the medcap seed matched its ground truth: an answer "B" that is option C's text is C), else a
    letter ("B", "(B)", "b."), else the one option whose normalised text is the normalised answer."""
    exact = [key for key, text in options.items() if str(text) == answer]
    if exact:
        return exact[0]
    letters = {str(key).strip().upper(): key for key in options}
    whole = _WHOLE.fullmatch(answer.strip())
    if whole and whole.group(1).upper() in letters:
        return letters[whole.group(1).upper()]
    matches = [key for key, text in options.items() if normalize_answer(str(text)) == normalize_answer(answer)]
    return matches[0] if len(matches) == 1 else None


def _answer_key(answer: str, options: dict[str, str], label: str) -> str:
    key = answer_key(answer, options)
    if key is None:
        raise ValueError(f"record {label}: answer {answer!r} is neither an option letter nor one option's text "
                         f"(options {list(options)})")
    return key


def per_record_correct(records: list[dict]) -> list[bool]:
    """Whether each record's ``prediction`` is right: multiple choice (``options`` given) when ``parse_choice``
    gives the ``answer`` option, closed questions by ``closed_match``. An unparseable choice is wrong."""
    correct = []
    for index, record in enumerate(records):
        prediction, answer = _field(record, index, "prediction"), _field(record, index, "answer")
        options = record.get("options")
        if options:
            key = _answer_key(answer, options, _label(record, index))
            correct.append(parse_choice(prediction, options) == key)
        else:
            correct.append(closed_match(prediction, answer))
    return correct


def vqa_accuracy(records: list[dict], group_by: str | None = "modality") -> dict[str, float]:
    """{"accuracy", "macro_accuracy" (the mean of the groups' accuracies), "n", "unparsed" (multiple-choice
    predictions naming no option, counted wrong), "accuracy/<group>" for each value of ``group_by``}. Records
    without that field form the group "unknown"; with ``group_by=None`` there are no groups and the macro
    accuracy is the accuracy."""
    if not records:
        raise ValueError("no records to score")
    correct = per_record_correct(records)
    unparsed = sum(1 for r in records if r.get("options") and parse_choice(str(r["prediction"]), r["options"]) is None)
    accuracy = sum(correct) / len(correct)
    groups: dict[str, list[bool]] = {}
    if group_by is not None:
        for record, ok in zip(records, correct):
            value = record.get(group_by)
            groups.setdefault("unknown" if value is None else str(value), []).append(ok)
    per_group = {name: sum(oks) / len(oks) for name, oks in sorted(groups.items())}
    macro = sum(per_group.values()) / len(per_group) if per_group else accuracy
    result = {"accuracy": accuracy, "macro_accuracy": macro, "n": len(records), "unparsed": unparsed}
    result.update({f"accuracy/{name}": value for name, value in per_group.items()})
    return result


def read_vqa_references(path) -> dict[str, dict]:
    """Questions from a JSONL file or a JSON list: ``id`` (or ``question_id``, or VQA-RAD's ``qid``), ``answer``
    (or OmniMedVQA's ``gt_answer``), ``options`` ({letter: text}, or OmniMedVQA's ``option_A``.. fields; none for closed
    questions), and optional ``modality`` (or ``modality_type``), ``question_type`` and ``image`` (a path or a
    list, relative to the file's folder; ``images``, for the report's thumbnails)."""
    import json
    from pathlib import Path

    from medcap.data.records import id_text, image_list
    from medcap.metrics.io import json_lines, read_text

    path = Path(path)
    text = read_text(path)  # a byte-order mark is dropped
    if text.lstrip().startswith("["):  # (where in the file, row)
        try:
            rows = [(f"item {index + 1}", row) for index, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        rows = [(f"line {line_no}", row) for line_no, row in json_lines(path, text)]
    questions = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where}: a question must be a JSON object, found {type(row).__name__}")
        id_field = next((k for k in ("id", "question_id", "qid") if row.get(k) is not None), "id")
        sample_id = id_text(row.get(id_field))
        if not sample_id:
            raise ValueError(f"{path}: {where}: field 'id' is missing or empty")
        if sample_id in questions:
            raise ValueError(f"{path}: {where}: duplicate id {sample_id!r}")
        options = row.get("options") or dict(sorted((k[len("option_"):], v) for k, v in row.items()
                                                    if k.startswith("option_") and v not in (None, "")))
        if not isinstance(options, dict):
            raise ValueError(f"{path}: {where}: sample {sample_id!r}: field 'options' must be an object of "
                             f"{{letter: text}}, found {type(options).__name__}")
        questions[sample_id] = {"id": sample_id, "answer": row.get("answer", row.get("gt_answer")),
                                "options": options or None, "modality": row.get("modality", row.get("modality_type")),
                                "question_type": row.get("question_type"),
                                "images": [str(path.parent / p) for p in image_list(row.get("image"))]}
    return questions


def vqa_scored(questions: dict[str, dict], predictions: dict[str, str], group_by: str | None = "modality"):
    """``vqa_accuracy`` with per-question correctness kept, so accuracy and macro accuracy can be bootstrapped."""
    import numpy as np

    from medcap.metrics.result import Scored

    ids = list(questions)
    records = [{**questions[k], "prediction": predictions[k]} for k in ids]
    corpus = {k: float(v) for k, v in vqa_accuracy(records, group_by).items()}
    correct = np.array(per_record_correct(records), dtype=np.float64)
    groups = [("unknown" if r.get(group_by) is None else str(r[group_by])) if group_by else "all" for r in records]
    masks = np.stack([np.array([g == name for g in groups]) for name in sorted(set(groups))]).astype(np.float64)

    def resample(index: np.ndarray) -> dict[str, np.ndarray]:
        hits, members = correct[index], masks[:, index]  # [..., N], [G, ..., N]
        counts = members.sum(-1)
        per_group = (members * hits).sum(-1) / np.maximum(counts, 1)
        # a group absent from a resample is left out of that resample's macro average
        macro = (per_group * (counts > 0)).sum(0) / np.maximum((counts > 0).sum(0), 1)
        return {"accuracy": hits.mean(-1), "macro_accuracy": macro}

    return Scored(ids, corpus, {"correct": correct}, resample)
