"""The ImageCLEFmedical caption preset: the official per-caption preprocessing, ROUGE-1 F-measure (tokenised as
rouge-score does, no stemming; the 2024 leaderboard's ROUGE), ROUGE-L F-measure (the same tokens, longest common
subsequence; the AUEB thesis' table names its ROUGE column so), BLEU-1 and BERTScore, each averaged over images;
a pair whose captions are both empty after that preprocessing scores 1, as in the official evaluator."""

import re
import string
from collections import Counter

import numpy as np

from medcap.metrics.result import Scored, mean_scored

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DIGITS = re.compile(r"\d+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def preprocess_caption(caption: str) -> str:
    """Lowercase, each run of digits -> ``number``, ASCII punctuation removed (the official order)."""
    return _DIGITS.sub("number", caption.lower()).translate(_PUNCTUATION)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokeniser: lowercase, anything but ``[a-z0-9]`` separates tokens."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def rouge1_f(prediction: str, reference: str) -> float:
    hyp, ref = Counter(rouge_tokens(prediction)), Counter(rouge_tokens(reference))
    overlap = sum((hyp & ref).values())
    precision = overlap / max(sum(hyp.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0  # the row above, one column to the left
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rougeL_f(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) on rouge-score's tokens: LCS / length for precision and recall."""
    hyp, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs_length(hyp, ref)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 on whitespace tokens: clipped unigram precision times the brevity penalty (no smoothing)."""
    hyp, ref = prediction.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    precision = sum((Counter(hyp) & Counter(ref)).values()) / len(hyp)
    penalty = 1.0 if len(hyp) > len(ref) else float(np.exp(1 - len(ref) / len(hyp)))
    return precision * penalty


def imageclef_scores(predictions: dict[str, str], references: dict[str, str], bertscore=None) -> Scored:
    """``references`` hold one caption per id. ``bertscore``: a ``medcap.metrics.bertscore.BertScore`` or None."""
    ids = list(references)
    hyps = [preprocess_caption(predictions[k]) for k in ids]
    refs = [preprocess_caption(references[k]) for k in ids]
    # "both empty scores 1", checked as the official evaluator checks it: after the preprocessing ("." and "-" are
    # both empty then), on the joined words for ROUGE and BLEU, on the text itself for BERTScore
    no_words = np.array([not h.split() and not r.split() for h, r in zip(hyps, refs)])
    no_text = np.array([not h and not r for h, r in zip(hyps, refs)])
    per_sample = {
        "ROUGE-1": np.array([rouge1_f(h, r) for h, r in zip(hyps, refs)]),
        "ROUGE-L": np.array([rougeL_f(h, r) for h, r in zip(hyps, refs)]),
        "BLEU-1": np.array([bleu1(h, r) for h, r in zip(hyps, refs)]),
    }
    for values in per_sample.values():
        values[no_words] = 1.0
    if bertscore is not None:
        per_sample["BERTScore"] = bertscore.score(hyps, refs)
        per_sample["BERTScore"][no_text] = 1.0
    return mean_scored(ids, per_sample)
