"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, with per-sample scores
and BLEU's sufficient statistics, so corpus scores can be bootstrapped over images."""

import atexit
import contextlib
import os
import re
import threading
from collections import Counter

import numpy as np

from medcap.metrics.result import Scored

# pycocoevalcap is imported where it is used: importing medcap.metrics (as the generate recipe does) then needs
# neither it nor Java.

COCO_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer constants


# pycocoevalcap sends the tokenizer one caption per line and replaces only "\n" in them; the Java tokenizer also
# ends a line at these, which would shift every later caption onto the next image's id
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def tokenize(captions: dict[str, list[str]], ptb: bool) -> dict[str, list[str]]:
    """PTB-tokenise (lowercased, punctuation tokens dropped) as the COCO evaluation does, or, with
    ``ptb=False`` for pre-tokenised text, only lowercase and normalise whitespace. Empty captions stay
    empty (they are not sent to the Java tokenizer, whose line-based output they would misalign), and line
    breaks inside a caption (the CR LF of a multi-line CSV field, U+2028, ...) are read as spaces."""
    if not ptb:
        return {k: [" ".join(c.lower().split()) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    non_empty = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in v if c.strip()] for k, v in captions.items()}
    tokenized = PTBTokenizer().tokenize({k: v for k, v in non_empty.items() if v})
    return {k: tokenized.get(k, []) + [""] * (len(v) - len(non_empty[k])) for k, v in captions.items()}


_meteor = None  # one Java METEOR per Python process: starting one (the JVM, its paraphrase tables) takes ~5 s,
_meteor_lock = threading.Lock()  # scoring 96 captions on a started one ~0.1 s


def _after_fork_in_child() -> None:
    # A forked child inherits the parent's METEOR but cannot wait on it (not its child), so poll() reports it ended
    # and meteor_scores starts the child's own, leaving the parent's untouched; the lock may have been copied held.
    global _meteor_lock
    _meteor_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def meteor_scores(references: dict[str, list[str]], hypotheses: dict[str, list[str]]) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR 1.5 (``Meteor().compute_score``) on a Java process kept for the next call. A call
    that fails ends that process (its pipes may hold half an exchange); a process that died is replaced, and a
    forked child starts its own."""
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor is not None and _meteor.meteor_p.poll() is not None:
            _end_meteor()
        if _meteor is None:
            _meteor = Meteor()
        try:
            return _meteor.compute_score(references, hypotheses)
        except BaseException:
            _end_meteor()
            raise


def _end_meteor() -> None:
    global _meteor
    scorer, _meteor = _meteor, None
    if scorer is None:
        return
    if scorer.lock.locked():  # compute_score leaves it held when it raises, and Meteor.__del__ waits for it
        scorer.lock.release()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    with contextlib.suppress(OSError):  # what a failed write left in the pipe's buffer cannot be flushed
        scorer.meteor_p.stdin.close()


@atexit.register
def close_meteor() -> None:
    """End the METEOR process (at exit; a later call starts another)."""
    with _meteor_lock:
        _end_meteor()


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
        value, segments = meteor_scores(refs, hyps)
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


__all__ = ["COCO_METRICS", "bleu_stats", "close_meteor", "coco_scores", "corpus_bleu", "meteor_scores",
           "tokenize"]
