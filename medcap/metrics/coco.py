"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, with per-sample scores
and BLEU's sufficient statistics, so corpus scores can be bootstrapped over images."""

from collections import Counter

import numpy as np

from medcap.metrics.result import Scored

# pycocoevalcap is imported where it is used: importing medcap.metrics (as the generate recipe does) then needs
# neither it nor Java.

COCO_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer constants


def tokenize(captions: dict[str, list[str]], ptb: bool) -> dict[str, list[str]]:
    """PTB-tokenise (lowercased, punctuation tokens dropped) as the COCO evaluation does, or, with
    ``ptb=False`` for pre-tokenised text, only lowercase and normalise whitespace. Empty captions stay
    empty (they are not sent to the Java tokenizer, whose line-based output they would misalign)."""
    if not ptb:
        return {k: [" ".join(c.lower().split()) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    non_empty = {k: [{"caption": c} for c in v if c.strip()] for k, v in captions.items()}
    tokenized = PTBTokenizer().tokenize({k: v for k, v in non_empty.items() if v})
    return {k: tokenized.get(k, []) + [""] * (len(v) - len(non_empty[k])) for k, v in captions.items()}


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu_stats(hypothesis: str, references: list[str], n: int = 4) -> np.ndarray:
    """One image's BLEU sufficient statistics as pycocoevalcap counts them (whitespace tokens, reference
    length closest to the hypothesis, shorter on ties): [correct_1..n, guess_1..n, hyp_len, ref_len]."""
    words = hypothesis.split()
    counts = _ngrams(words, n)
    max_ref: Counter = Counter()
    ref_lens = []
    for ref in references:
        ref_words = ref.split()
        ref_lens.append(len(ref_words))
        for gram, c in _ngrams(ref_words, n).items():
            max_ref[gram] = max(max_ref[gram], c)
    correct = [0] * n
    for gram, c in counts.items():
        correct[len(gram) - 1] += min(c, max_ref[gram])
    guess = [max(0, len(words) - k) for k in range(n)]
    ref_len = min((abs(r - len(words)), r) for r in ref_lens)[1]
    return np.array(correct + guess + [len(words), ref_len], dtype=np.float64)


def corpus_bleu(stats: np.ndarray, n: int = 4) -> np.ndarray:
    """BLEU-1..n from summed statistics ``[..., 2n+2]`` (any leading batch shape), with pycocoevalcap's
    smoothing constants and brevity penalty, so it equals ``Bleu(n)`` on the same corpus."""
    correct, guess = stats[..., :n], stats[..., n:2 * n]
    hyp_len, ref_len = stats[..., 2 * n], stats[..., 2 * n + 1]
    precision = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=-1)
    bleu = precision ** (1.0 / np.arange(1, n + 1))
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleu * penalty[..., None]


def coco_scores(predictions: dict[str, str], references: dict[str, list[str]], ptb: bool = True,
                meteor: bool = True) -> Scored:
    """Corpus and per-sample COCO metrics; ``meteor=False`` skips the Java METEOR process."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(references)
    hyps = tokenize({k: [predictions[k]] for k in ids}, ptb)
    refs = tokenize(references, ptb)
    corpus: dict[str, float] = {}
    per_sample: dict[str, np.ndarray] = {}

    bleu, bleu_per_sample = Bleu(4).compute_score(refs, hyps, verbose=0)
    corpus.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    per_sample["BLEU-4"] = np.asarray(bleu_per_sample[3], dtype=np.float64)
    stats = np.stack([bleu_stats(hyps[k][0], refs[k]) for k in ids])

    if meteor:  # every hypothesis, empty ones included, as pycocoevalcap's evaluation sends them
        value, segments = Meteor().compute_score(refs, hyps)
        corpus["METEOR"] = float(value)
        per_sample["METEOR"] = np.asarray(segments, dtype=np.float64)

    rouge, rouge_per_sample = Rouge().compute_score(refs, hyps)
    corpus["ROUGE-L"] = float(rouge)
    per_sample["ROUGE-L"] = np.asarray(rouge_per_sample, dtype=np.float64)
    cider, cider_per_sample = Cider().compute_score(refs, hyps)
    corpus["CIDEr"] = float(cider)
    per_sample["CIDEr"] = np.asarray(cider_per_sample, dtype=np.float64)

    def resample(index: np.ndarray) -> dict[str, np.ndarray]:
        out = {f"BLEU-{n + 1}": b for n, b in enumerate(np.moveaxis(corpus_bleu(stats[index].sum(-2)), -1, 0))}
        for name in ("ROUGE-L", "CIDEr"):  # corpus score = mean over images (CIDEr's idf stays the full corpus')
            out[name] = per_sample[name][index].mean(-1)
        if "METEOR" in per_sample:  # the aggregate is not a mean: shift it by the resampled change of the mean
            out["METEOR"] = corpus["METEOR"] + per_sample["METEOR"][index].mean(-1) - per_sample["METEOR"].mean()
        return out

    return Scored(ids=ids, corpus=corpus, per_sample=per_sample, resample=resample)


__all__ = ["COCO_METRICS", "bleu_stats", "coco_scores", "corpus_bleu", "tokenize"]
