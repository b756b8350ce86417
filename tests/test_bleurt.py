"""BLEURT from a local checkpoint in the BERT layout: the pair order (reference first), the best score over
several references, refused layouts, and the evaluate recipe with ``bleurt.model``."""

import json

import pytest
import torch

from medcap import cli
from medcap.metrics import evaluate, write_csv_predictions
from medcap.metrics.bleurt import Bleurt

WORDS = ["no", "acute", "finding", "left", "right", "rib", "fracture", "nodule", "lower", "lobe"]


def _tiny_bleurt_dir(path, num_labels=1, model_type=None):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        initializer_range=0.5)  # large weights: scores far apart, so the checks can fail
    BertForSequenceClassification(config).save_pretrained(path)
    if model_type:
        config_file = path / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": model_type}))
    return path


@pytest.fixture(scope="module")
def bleurt_dir(tmp_path_factory):
    return _tiny_bleurt_dir(tmp_path_factory.mktemp("bleurt"))


def _by_hand(folder, reference: str, candidate: str) -> float:
    from transformers import BertForSequenceClassification

    vocab = (folder / "vocab.txt").read_text().split()
    ref, cand = [vocab.index(w) for w in reference.split()], [vocab.index(w) for w in candidate.split()]
    ids = [2, *ref, 3, *cand, 3]
    types = [0] * (len(ref) + 2) + [1] * (len(cand) + 1)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0, 0].item()


def test_pairs_are_reference_then_candidate(bleurt_dir):
    scorer = Bleurt(bleurt_dir, batch_size=2)
    refs = ["left lower lobe nodule", "no acute finding", "right rib fracture"]
    cands = ["left rib fracture", "no acute finding", "nodule"]
    got = scorer.pairs(refs, cands)  # two batches, padded
    want = [_by_hand(bleurt_dir, r, c) for r, c in zip(refs, cands)]
    assert got == pytest.approx(want, abs=1e-5)
    swapped = _by_hand(bleurt_dir, cands[0], refs[0])
    assert abs(got[0] - swapped) > 1e-4  # the order matters, so the test above pins it


def test_best_over_references_and_evaluate(bleurt_dir):
    scorer = Bleurt(bleurt_dir)
    refs = {"a": ["no acute finding", "right rib fracture"], "b": ["left lower lobe nodule"]}
    preds = {"a": "left rib fracture", "b": "nodule"}
    per_sample = scorer.score([preds["a"], preds["b"]], [refs["a"], refs["b"]])["BLEURT"]
    pair = scorer.pairs(["no acute finding", "right rib fracture", "left lower lobe nodule"],
                        ["left rib fracture", "left rib fracture", "nodule"])
    assert per_sample == pytest.approx([max(pair[0], pair[1]), pair[2]])
    scores = evaluate(preds, refs, preset="coco", meteor=False, bleurt=scorer).corpus
    assert scores["BLEURT"] == pytest.approx(per_sample.mean()) and "CIDEr" in scores


def test_refused_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Bleurt(tmp_path)
    with pytest.raises(ValueError, match="bleurt-pytorch"):
        Bleurt(_tiny_bleurt_dir(tmp_path / "port", model_type="bleurt"))
    with pytest.raises(ValueError, match="2 labels"):
        Bleurt(_tiny_bleurt_dir(tmp_path / "classifier", num_labels=2))


def test_evaluate_recipe_with_bleurt(tmp_path, bleurt_dir, capsys):
    refs = tmp_path / "refs.csv"
    write_csv_predictions(refs, {"a": "left lower lobe nodule", "b": "no acute finding"})
    preds = tmp_path / "run" / "predictions.csv"
    write_csv_predictions(preds, {"a": "left lower lobe nodule", "b": "right rib fracture"})
    out = tmp_path / "eval"
    cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={preds}", f"references={refs}",
              "bertscore=false", "bootstrap=0", f"bleurt.model={bleurt_dir}", f"output_dir={out}"])
    metrics = json.loads((out / "metrics.json").read_text())
    pair = Bleurt(bleurt_dir).pairs(["left lower lobe nodule", "no acute finding"],
                                    ["left lower lobe nodule", "right rib fracture"])
    assert metrics["BLEURT"] == pytest.approx(pair.mean(), abs=1e-6)
    assert (out / "per_sample.csv").read_text().splitlines()[0] == "ID,ROUGE-1,ROUGE-L,BLEU-1,BLEURT"
    cli.main(["run", "evaluate", "--config", "eval/imageclef", f"predictions={preds}", f"references={refs}",
              "bertscore=false", "bootstrap=0", f"output_dir={tmp_path / 'eval2'}"])
    assert "BLEURT: skipped" in capsys.readouterr().out
