"""Evaluation speed: 10,000 captions with the COCO preset (target: under 60 s on 2 CPU cores), against the peer
that defines the numbers, pycocoevalcap's scorers called directly as COCOEvalCap does (PTB tokenisation, then
BLEU, METEOR, ROUGE-L, CIDEr), on the same captions in the same run. medcap keeps its METEOR Java process between
calls, so the peer keeps one too: each side is called once as a warm-up (timed and shown as its first call, which
starts the JVM), then the two alternate for ``--reps`` rounds and the medians are compared, as peer seconds / medcap
seconds (>1 = medcap faster). Also times the ImageCLEF preset (ROUGE-1, BLEU-1; BERTScore with the packaged MiniLM
unless --no-bertscore) and 1000 bootstrap resamples.

    .venv/bin/python benchmarks/eval_speed.py [--n 10000] [--reps 3]
"""

import argparse
import random
import statistics
import time

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from medcap.metrics import bootstrap_ci, evaluate

WORDS = ("the a left right upper lower middle lobe zone nodule opacity mass fracture effusion pneumothorax "
         "consolidation chest abdomen knee radiograph ct mri ultrasound axial coronal image shows no acute "
         "finding small large mm cm 3 5 12 with without of in").split()


def corpus(n: int, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    rng = random.Random(seed)
    refs = {f"img{i}": [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "."] for i in range(n)}
    preds = {k: " ".join(rng.choices(WORDS, k=rng.randint(4, 20))) + "." for k in refs}
    return preds, refs


class Peer:
    """pycocoevalcap's scorers as COCOEvalCap calls them, its METEOR Java process started once and kept."""

    def __init__(self):
        self.meteor = Meteor()

    def __call__(self, preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in refs})
        out = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{i + 1}": b for i, b in enumerate(bleu)})
        out["METEOR"] = self.meteor.compute_score(gts, res)[0]
        out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
        out["CIDEr"] = Cider().compute_score(gts, res)[0]
        return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--no-bertscore", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds, the two sides alternating, after a warm-up")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    preds, refs = corpus(args.n)

    peer, peer_start_s = timed(Peer)
    peer_scores, peer_first_s = timed(peer, preds, refs)
    scored, ours_first_s = timed(evaluate, preds, refs, preset="coco")  # starts medcap's METEOR process
    peer_times, ours_times = [], []
    for _ in range(args.reps):
        peer_times.append(timed(peer, preds, refs)[1])
        ours_times.append(timed(evaluate, preds, refs, preset="coco")[1])
    peer_s, ours_s = statistics.median(peer_times), statistics.median(ours_times)
    _, boot_s = timed(bootstrap_ci, scored, 1000, 0)
    worst = max(abs(scored.corpus[k] - v) for k, v in peer_scores.items())
    print(f"{args.n} captions, COCO preset; median of {args.reps} alternating rounds after a warm-up of each side")
    print(f"  pycocoevalcap direct (peer) {peer_s:7.1f} s   (first call, starting METEOR: "
          f"{peer_start_s + peer_first_s:.1f} s)")
    print(f"  medcap evaluate             {ours_s:7.1f} s   (first call, starting METEOR: {ours_first_s:.1f} s; "
          f"target < 60 s; largest metric difference to the peer {worst:.2e})")
    print(f"  medcap vs pycocoevalcap: peer s / medcap s = {peer_s / ours_s:.2f}x (>1 = medcap faster)")
    print(f"  + 1000 bootstrap resamples  {boot_s:7.1f} s")

    refs_one = {k: v[0] for k, v in refs.items()}
    _, clef_s = timed(evaluate, preds, refs_one, preset="imageclef", bertscore=False)
    print(f"ImageCLEF preset without BERTScore {clef_s:7.1f} s")
    if not args.no_bertscore:
        from medcap.metrics.bertscore import BertScore

        scorer, load_s = timed(BertScore)
        _, bert_s = timed(scorer.score, [preds[k] for k in refs], list(refs_one.values()))
        print(f"BERTScore (all-MiniLM-L6-v2, CPU)  {bert_s:7.1f} s  (+{load_s:.1f} s to load)")


if __name__ == "__main__":
    main()
