"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D."""

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

COCO_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def tokenize(captions: dict[str, list[str]], ptb: bool) -> dict[str, list[str]]:
    """PTB-tokenise (lowercased, punctuation tokens dropped) as the COCO evaluation does, or, with
    ``ptb=False`` for pre-tokenised text, only lowercase and normalise whitespace. Empty captions stay
    empty (they are not sent to the Java tokenizer, whose line-based output they would misalign)."""
    if not ptb:
        return {k: [" ".join(c.lower().split()) for c in v] for k, v in captions.items()}
    non_empty = {k: [{"caption": c} for c in v if c.strip()] for k, v in captions.items()}
    tokenized = PTBTokenizer().tokenize({k: v for k, v in non_empty.items() if v})
    return {k: tokenized.get(k, []) + [""] * (len(v) - len(non_empty[k])) for k, v in captions.items()}


def coco_scores(predictions: dict[str, str], references: dict[str, list[str]], ptb: bool = True) -> dict[str, float]:
    hyps = tokenize({k: [predictions[k]] for k in references}, ptb)
    refs = tokenize(references, ptb)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    # METEOR's Java process cannot score an empty hypothesis: such segments count as 0 by scaling the corpus
    # score with the share of non-empty ones (exact for a mean; METEOR's own aggregate is close to one).
    non_empty = [k for k in references if hyps[k][0]]
    if non_empty:
        meteor, _ = Meteor().compute_score({k: refs[k] for k in non_empty}, {k: hyps[k] for k in non_empty})
        scores["METEOR"] = float(meteor) * len(non_empty) / len(references)
    else:
        scores["METEOR"] = 0.0
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    return scores
