"""METEOR in the COCO preset equals pycocoevalcap's own evaluation (PTB tokeniser + Java METEOR 1.5), corpus and
per image, on predictions that mix empty, punctuation-only and ordinary captions; the bootstrap's METEOR resample
is consistent with it; successive scorings share one Java process, replaced when a scoring fails or it dies;
a forked child starts its own."""

import json
import os

import numpy as np
import pytest

from medcap.metrics import bootstrap_ci, evaluate

REFERENCES = {
    "1": ["Left lower lobe nodule.", "A nodule in the left lower lobe."],
    "2": ["No acute cardiopulmonary finding."],
    "3": ["Right rib fracture, displaced."],
    "4": ["Chest X-ray with a small effusion."],
    "5": ["Normal study."],
    "6": ["Large right pleural effusion."],
    "7": ["Axial CT of the head, no bleed."],
}
PREDICTIONS = {"1": "A nodule in the left lung.", "2": "", "3": "...", "4": "Chest X-ray, small effusion.",
               "5": "?!", "6": "large effusion on the right", "7": ""}


def oracle(predictions: dict[str, str], references: dict[str, list[str]], ptb: bool):
    """What pycocoevalcap's COCOEvalCap computes: both sides through its PTB tokeniser (or, for pre-tokenised
    text as R2Gen scores it, lowercased whitespace tokens), then every image through METEOR."""
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if ptb:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    else:
        gts = {k: [" ".join(c.lower().split()) for c in v] for k, v in references.items()}
        res = {k: [" ".join(predictions[k].lower().split())] for k in references}
    return Meteor().compute_score(gts, res)


# each case starts Java METEOR twice (~10 s each on 2 CPU cores): the R2Gen (no PTB) case runs with -m slow
@pytest.mark.parametrize("ptb", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["coco", "r2gen"])
def test_meteor_equals_pycocoevalcap_with_empty_and_punctuation_only_predictions(ptb):
    expected_corpus, expected_segments = oracle(PREDICTIONS, REFERENCES, ptb)
    scored = evaluate(PREDICTIONS, REFERENCES, tokenize=ptb)
    assert scored.corpus["METEOR"] == pytest.approx(expected_corpus, abs=1e-12)
    np.testing.assert_allclose(scored.per_sample["METEOR"], expected_segments, rtol=0, atol=1e-12)
    assert scored.per_sample["METEOR"][[1, 6]].tolist() == [0.0, 0.0]  # the empty predictions
    assert 0 < scored.corpus["METEOR"] < 1
    # the bootstrap's METEOR for the identity resample is the corpus score; intervals contain it
    identity = np.arange(len(REFERENCES))[None]
    assert scored.resample(identity)["METEOR"][0] == pytest.approx(scored.corpus["METEOR"], abs=1e-12)
    low, high = bootstrap_ci(scored, resamples=200, seed=0)["METEOR"]
    assert low <= scored.corpus["METEOR"] <= high and low < high


def test_meteor_process_is_kept_between_calls_and_replaced_after_a_failure_or_a_death(monkeypatch):
    from pycocoevalcap.meteor.meteor import Meteor

    from medcap.metrics import coco

    first = evaluate(PREDICTIONS, REFERENCES)
    process = coco._meteor.meteor_p
    again = evaluate(PREDICTIONS, REFERENCES)
    assert coco._meteor.meteor_p is process and process.poll() is None  # one Java start for both
    assert again.corpus["METEOR"] == first.corpus["METEOR"]
    np.testing.assert_array_equal(again.per_sample["METEOR"], first.per_sample["METEOR"])

    def broken_pipe(self, hypothesis, references):  # a failure in the middle of an exchange with Java
        raise BrokenPipeError("METEOR went away")

    with monkeypatch.context() as patch:
        patch.setattr(Meteor, "_stat", broken_pipe)
        with pytest.raises(BrokenPipeError):
            evaluate(PREDICTIONS, REFERENCES)
    assert coco._meteor is None and process.poll() is not None  # ended (and its lock freed: no hang here)
    after_failure = evaluate(PREDICTIONS, REFERENCES)
    assert coco._meteor.meteor_p is not process
    assert after_failure.corpus["METEOR"] == first.corpus["METEOR"]

    coco._meteor.meteor_p.kill()  # died between calls: the next call starts another
    coco._meteor.meteor_p.wait()
    died = coco._meteor.meteor_p
    after_death = evaluate(PREDICTIONS, REFERENCES)
    assert coco._meteor.meteor_p is not died and after_death.corpus["METEOR"] == first.corpus["METEOR"]
    coco.close_meteor()
    assert coco._meteor is None


def test_a_forked_child_scores_on_its_own_meteor_and_leaves_the_parents_running():
    from medcap.metrics import coco

    expected = evaluate(PREDICTIONS, REFERENCES).corpus["METEOR"]
    parent_process = coco._meteor.meteor_p
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: score, report the score and the Java process it used, leave without cleanup
        try:
            value = evaluate(PREDICTIONS, REFERENCES).corpus["METEOR"]
            os.write(write_end, json.dumps([value, coco._meteor.meteor_p.pid]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_value, child_java = json.loads(pipe.read())
    os.waitpid(child, 0)
    assert child_value == expected and child_java != parent_process.pid
    assert coco._meteor.meteor_p is parent_process and parent_process.poll() is None  # still the parent's, alive
    assert evaluate(PREDICTIONS, REFERENCES).corpus["METEOR"] == expected
