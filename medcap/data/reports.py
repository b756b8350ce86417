"""R2Gen's report cleaning (Chen et al., EMNLP 2020: ``clean_report_iu_xray`` and ``clean_report_mimic_cxr`` in
its tokenizer), written anew and step for step equivalent, so that reports read with ``clean_report: true``
match the references that papers built on R2Gen (R2GenCMN, R2GenGPT, ...) score against.

Both cleanings, in this order:

1. (MIMIC-CXR only) newlines become spaces; runs of ``_`` (the de-identification blanks) and of spaces shrink
   (R2Gen replaces a doubled character by one, 7 times for ``_`` and 6 times for spaces, so runs of up to 128
   and 64 become one);
2. runs of dots shrink the same way, 3 times for IU X-Ray (runs of up to 8 become one) and 8 times for
   MIMIC-CXR;
3. list numbering goes: every ``"1. "`` is deleted (also inside a number: ``"2011. The"`` becomes
   ``"201The"``, as in R2Gen), then ``". 2. "`` .. ``". 5. "`` and then ``" 2. "`` .. ``" 5. "`` become ``". "``
   (numbers from 6 on stay);
4. the text is stripped, lowercased and split into sentences at ``". "``;
5. in each sentence ``"``, ``'``, ``/`` and ``\\`` are deleted, the sentence is stripped, and then these are
   deleted: ``. , ? ; * ! % ^ & _ + ( ) [ ] { } : < = > @`` (R2Gen's character class holds the range
   ``:-[``, which also takes ``; < = > ? @`` and the capitals, already lowercased). Digits, hyphens and
   non-ASCII letters stay; spaces left inside a sentence by deleted characters stay;
6. the sentences are joined with ``" . "`` and ``" ."`` is appended. Empty sentences are kept (R2Gen's filter
   compares a string with a list and so never drops one): ``"Normal. . "`` becomes ``"normal .  ."``.

``variant="r2gengpt"`` is R2GenGPT's MIMIC-CXR cleaning (its ``data_helper.py``): after step 3 every ``:`` becomes
``" :"``, and step 5 keeps ``: < = > @`` (its character class has no ``:-[`` range). For IU X-Ray R2GenGPT used
R2Gen's rules unchanged, so both variants are the same there.
"""

_QUOTES_AND_SLASHES = "\"'/\\"
_DELETED = set(".,?;*!%^&_+()[]{}:<=>@")
_KEPT_BY_R2GENGPT_MIMIC = set(":<=>@")
VARIANTS = ("r2gen", "r2gengpt")


def _shrink_runs(text: str, doubled: str, passes: int) -> str:
    for _ in range(passes):
        text = text.replace(doubled, doubled[0])
    return text


def _drop_numbering(text: str) -> str:
    text = text.replace("1. ", "")
    for n in range(2, 6):
        text = text.replace(f". {n}. ", ". ")
    for n in range(2, 6):
        text = text.replace(f" {n}. ", ". ")
    return text


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"report cleaning variant must be one of {list(VARIANTS)}, got {variant!r}")


def _clean_sentence(sentence: str, deleted: set[str]) -> str:
    for char in _QUOTES_AND_SLASHES:
        sentence = sentence.replace(char, "")
    return "".join(c for c in sentence.strip().lower() if c not in deleted)


def _sentences_joined(text: str, deleted: set[str] = _DELETED) -> str:
    sentences = text.strip().lower().split(". ")
    return " . ".join(_clean_sentence(s, deleted) for s in sentences) + " ."


def clean_report_iu_xray(report: str, variant: str = "r2gen") -> str:
    _check_variant(variant)
    return _sentences_joined(_drop_numbering(_shrink_runs(report, "..", 3)))


def clean_report_mimic_cxr(report: str, variant: str = "r2gen") -> str:
    _check_variant(variant)
    text = _shrink_runs(_shrink_runs(report.replace("\n", " "), "__", 7), "  ", 6)
    text = _drop_numbering(_shrink_runs(text, "..", 8))
    if variant == "r2gengpt":
        return _sentences_joined(text.replace(":", " :"), _DELETED - _KEPT_BY_R2GENGPT_MIMIC)
    return _sentences_joined(text)
