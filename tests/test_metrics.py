import json
import math

import pytest

from medcap.metrics import format_table, read_predictions, read_references, score, write_csv_predictions

NO_PTB = dict(tokenize=False)  # whitespace tokens: the hand computations below count them directly


def test_bleu_and_rouge_hand_checked():
    # hyp "a b c d" vs ref "a b c e": clipped precisions 3/4, 2/3, 1/2, 0/1; equal lengths so BP = 1
    s = score({"x": "a b c d"}, {"x": "a b c e"}, **NO_PTB)
    assert s["BLEU-1"] == pytest.approx(0.75, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert s["BLEU-3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert s["BLEU-4"] < 1e-3  # no 4-gram matches
    # ROUGE-L: LCS 3, P = R = 3/4, F_beta (beta 1.2) = 0.75
    assert s["ROUGE-L"] == pytest.approx(0.75, abs=1e-6)


def test_brevity_penalty_and_rouge_recall():
    # hyp "a b" vs ref "a b c d": precisions 1, BP = exp(1 - 4/2) = e^-1
    s = score({"x": "a b"}, {"x": "a b c d"}, **NO_PTB)
    assert s["BLEU-1"] == pytest.approx(math.exp(-1), abs=1e-6)
    # ROUGE-L: P = 1, R = 1/2: (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1)
    assert s["ROUGE-L"] == pytest.approx(2.44 * 0.5 / 1.94, abs=1e-6)


def test_cider_identical_captions_with_distinct_words_is_ten():
    # every n-gram occurs in one image only, so idf = log(3) > 0 and for n = 1..4 the cosine of identical
    # vectors is 1: CIDEr-D = 10 * mean_n(1) = 10 (captions need 4 words, or the 4-gram term is 0)
    refs = {"1": "alpha beta gamma delta", "2": "epsilon zeta eta theta", "3": "iota kappa lambda mu"}
    s = score(dict(refs), refs, **NO_PTB)
    assert s["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < s["METEOR"] <= 1.0


def test_ptb_tokenisation_separates_punctuation():
    refs = {"x": "A nodule, right upper zone."}
    with_ptb = score({"x": "a nodule right upper zone"}, refs)
    without = score({"x": "a nodule right upper zone"}, refs, **NO_PTB)
    assert with_ptb["BLEU-1"] == pytest.approx(1.0, abs=1e-6)  # case and punctuation removed by PTB
    assert without["BLEU-1"] < 1.0  # "nodule," and "zone." do not match


def test_empty_and_unicode_predictions():
    refs = {"a": "No focal abnormality.", "b": "Lésion hyperdense µ 5 mm."}
    s = score({"a": "", "b": "Lésion hyperdense µ 5 mm."}, refs)
    assert 0 < s["BLEU-1"] < 1 and 0 <= s["METEOR"] < 1 and s["ROUGE-L"] == pytest.approx(0.5, abs=1e-6)


def test_id_mismatches_are_errors():
    with pytest.raises(ValueError, match="1 reference id\\(s\\) have no prediction, e.g. \\['b'\\]"):
        score({"a": "x"}, {"a": "x", "b": "y"}, **NO_PTB)
    with pytest.raises(ValueError, match="not in the references, e.g. \\['c'\\]"):
        score({"a": "x", "c": "z"}, {"a": "x"}, **NO_PTB)
    with pytest.raises(ValueError, match="unknown preset 'imageclef2030'"):
        score({"a": "x"}, {"a": "x"}, preset="imageclef2030")


def test_prediction_files(tmp_path):
    path = tmp_path / "p.csv"
    write_csv_predictions(path, {"a": 'has, "quotes"', "b": "üñí"})
    assert read_predictions(path) == {"a": 'has, "quotes"', "b": "üñí"}
    (tmp_path / "dup.csv").write_text("ID,caption\na,x\na,y\n")
    with pytest.raises(ValueError, match="dup.csv: line 3: duplicate ID 'a'"):
        read_predictions(tmp_path / "dup.csv")
    (tmp_path / "cols.csv").write_text("name,text\na,x\n")
    with pytest.raises(ValueError, match="line 1: expected columns ID,caption"):
        read_predictions(tmp_path / "cols.csv")
    (tmp_path / "latin.csv").write_bytes("ID,caption\na,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_predictions(tmp_path / "latin.csv")


def test_references_from_manifest(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "image": "x.png", "caption": "one"}, {"id": "a", "caption": "two"},
        {"id": "b", "captions": ["three", "four"]}]) + "\n")
    assert read_references(path) == {"a": ["one", "two"], "b": ["three", "four"]}
    path.write_text('{"id": "a", "caption": "x"}\n{"id": "b"\n')
    with pytest.raises(ValueError, match="r.jsonl: line 2: invalid JSON"):
        read_references(path)


def test_format_table():
    table = format_table({"trained": {"BLEU-4": 0.5, "CIDEr": 1.23456}, "blind": {"BLEU-4": 0.1}}, ["BLEU-4", "CIDEr"])
    lines = table.splitlines()
    assert lines[0].split() == ["BLEU-4", "CIDEr"]
    assert lines[1].split() == ["trained", "0.5000", "1.2346"]
    assert lines[2].split() == ["blind", "0.1000", "-"]
    # interval cells of any width stay apart, and the columns line up
    table = format_table({"a": {"CIDEr": 10.5, "B": 0.5}}, intervals={"a": {"CIDEr": (10.0, 11.0), "B": (0.1, 0.9)}})
    lines = table.splitlines()
    assert [line.split() for line in lines] == [["CIDEr", "B"], ["a", "10.5000", "0.5000"],
                                               ["95%", "CI", "[10.0000,11.0000]", "[0.1000,0.9000]"]]
    assert len({len(line) for line in lines}) == 1
