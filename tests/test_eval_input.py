"""What evaluate reads: a row whose field count differs from the header is an error naming the file and the line
(for predictions and references, in every preset), the submission check runs in every preset, and a UTF-8
byte-order mark (Excel's "CSV UTF-8") is accepted."""

import codecs
import json

import pytest

from medcap import cli
from medcap.metrics import check_submission, read_predictions, read_references

CAPTION_PRESETS = ["eval/coco", "eval/r2gen", "eval/imageclef", "eval/imageclef2025"]
REFERENCES = "ID,caption\na,left lower lobe nodule\nb,no acute finding\nc,right rib fracture\n"
# line 3: an unquoted comma makes 3 fields; read by name it would score "no acute finding" as perfect
COMMA = "ID,caption\na,left lower lobe nodule\nb,no acute finding, large effusion\nc,right rib fracture\n"


def evaluate(config: str, predictions, references, out, *extra: str) -> None:
    offline = {"eval/coco": ["meteor=false"], "eval/r2gen": ["meteor=false"], "eval/vqa": []}.get(
        config, ["bertscore=false"])  # no Java METEOR, no BERT model: the reading is what is tested
    cli.main(["run", "evaluate", "--config", config, f"predictions={predictions}", f"references={references}",
              "bootstrap=0", f"output_dir={out}", *offline, *extra])


@pytest.mark.parametrize("config", CAPTION_PRESETS)
def test_a_prediction_row_with_an_unquoted_comma_stops_every_caption_preset(config, tmp_path, capsys):
    refs, preds = tmp_path / "refs.csv", tmp_path / "preds.csv"
    refs.write_text(REFERENCES)
    preds.write_text(COMMA)
    with pytest.raises(SystemExit, match="not a valid submission"):
        evaluate(config, preds, refs, tmp_path / "out")
    assert (f"{preds}: line 3: expected 2 fields (ID,caption), found 3; quote fields that contain commas"
            in capsys.readouterr().err)
    with pytest.raises(ValueError, match=f"{preds}: line 3: expected 2 fields \\(ID,caption\\), found 3"):
        evaluate(config, preds, refs, tmp_path / "out", "check_submission=false")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("config", CAPTION_PRESETS)
def test_a_reference_row_with_an_unquoted_comma_is_an_error(config, tmp_path):
    refs, preds = tmp_path / "refs.csv", tmp_path / "preds.csv"
    refs.write_text(COMMA)
    preds.write_text(REFERENCES)
    with pytest.raises(ValueError, match=f"{refs}: line 3: expected 2 fields \\(ID,caption\\), found 3"):
        evaluate(config, preds, refs, tmp_path / "out")


def test_vqa_preset_refuses_a_row_with_too_many_fields_and_checks_the_submission(tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": "q1", "options": {"A": "CT", "B": "MRI"}, "answer": "A"}, {"id": "q2", "answer": "yes"}]) + "\n")
    preds = tmp_path / "preds.csv"
    preds.write_text("ID,answer\nq1,A\nq2,no, not at all\n")
    with pytest.raises(SystemExit, match="not a valid submission"):
        evaluate("eval/vqa", preds, questions, tmp_path / "out")
    assert f"{preds}: line 3: expected 2 fields (ID,answer), found 3" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{preds}: line 3: expected 2 fields"):
        evaluate("eval/vqa", preds, questions, tmp_path / "out", "check_submission=false")
    preds.write_text("ID,answer\nq1,A\nq1,B\n")  # q2 missing, q1 twice: the submission check names both
    with pytest.raises(SystemExit, match="2 problem"):
        evaluate("eval/vqa", preds, questions, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{preds}: line 3: ID 'q1' appears more than once" in err and "1 test ID(s) have no caption" in err


def test_fewer_fields_and_broken_quoting_name_the_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("ID,caption,score\na,x,1\nb,y\n")
    with pytest.raises(ValueError, match=f"{path}: line 3: expected 3 fields \\(ID,caption,score\\), found 2"):
        read_predictions(path)
    assert check_submission(path, ["a", "b"]) == [
        f"{path}: line 3: expected 3 fields (ID,caption,score), found 2; quote fields that contain commas",
        f"{path}: 1 test ID(s) have no caption, e.g. ['b']"]
    # a quote never closed would swallow every row after it into one caption
    path.write_text('ID,caption\na,"never closed\nb,y\nc,z\n')
    with pytest.raises(ValueError, match=f"{path}: line 2: malformed CSV"):
        read_predictions(path)
    assert check_submission(path, ["a", "b", "c"])[0].startswith(f"{path}: line 2: malformed CSV")
    # a caption quoted over two lines is one row, and the line numbers after it stay right
    path.write_text('ID,caption\na,"two\nlines"\nb,y,extra\n')
    with pytest.raises(ValueError, match=f"{path}: line 4: expected 2 fields"):
        read_predictions(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    bom = codecs.BOM_UTF8
    preds, refs = tmp_path / "run" / "preds.csv", tmp_path / "refs.csv"
    preds.parent.mkdir()
    preds.write_bytes(bom + REFERENCES.replace("c,right", "c,left").encode())
    refs.write_bytes(bom + REFERENCES.encode())
    assert read_predictions(preds)["a"] == "left lower lobe nodule"
    assert check_submission(preds, ["a", "b", "c"]) == []
    evaluate("eval/coco", preds, refs, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["BLEU-1"] == pytest.approx(9 / 10, abs=1e-6)  # 9 of 10 words right, lengths equal

    manifest = tmp_path / "refs.jsonl"
    manifest.write_bytes(bom + b'{"id": "a", "caption": "left lower lobe nodule"}\n')
    assert read_references(manifest) == {"a": ["left lower lobe nodule"]}
    questions = tmp_path / "questions.json"
    questions.write_bytes(bom + json.dumps([{"id": "q1", "answer": "yes"}]).encode())
    answers = tmp_path / "answers.csv"
    answers.write_bytes(bom + b"ID,answer\nq1,Yes.\n")
    evaluate("eval/vqa", answers, questions, tmp_path / "vqa")
    assert json.loads((tmp_path / "vqa" / "metrics.json").read_text())["accuracy"] == 1.0


def test_reference_captions_that_are_not_text_are_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "caption": "x"}\n{"id": "b", "caption": 12345}\n')
    with pytest.raises(ValueError, match="r.jsonl: line 2: sample 'b': field 'caption' is missing or not text "
                                         "\\(12345\\)"):
        read_references(path)
    path.write_text('{"id": "a", "captions": ["x", null]}\n')
    with pytest.raises(ValueError, match="line 1: sample 'a': field 'captions' is missing or not a non-empty list"):
        read_references(path)


def test_line_breaks_inside_captions_keep_every_caption_on_its_own_image(tmp_path):
    from medcap.metrics import evaluate as score

    # the CR LF inside the quoted caption of line 2 is kept by the CSV reader; the Java tokenizer ends a line at it
    # (and at U+2028, form feed, ...), which shifted b and c onto the next ids: b's perfect caption scored 0
    preds = tmp_path / "preds.csv"
    preds.write_bytes(b'ID,caption\r\na,"chest x ray.\r\nno mass"\r\nb,ct abdomen\r\nc,mri brain\r\n')
    refs = {"a": ["chest x ray. no mass"], "b": ["ct abdomen"], "c": ["mri brain"]}
    read = read_predictions(preds)
    assert read["a"] == "chest x ray.\r\nno mass"
    spaced = score({k: " ".join(v.split()) for k, v in read.items()}, refs, meteor=False)
    scored = score(read, refs, meteor=False)
    assert scored.per_sample["CIDEr"].tolist() == spaced.per_sample["CIDEr"].tolist()
    assert scored.per_sample["ROUGE-L"].tolist() == [1.0, 1.0, 1.0]
    for sep in ["\u2028", "\f", "\v", "\x85"]:  # in predictions and in references alike
        broken = score({"a": f"chest x ray.{sep}no mass", "b": "ct abdomen", "c": f"mri{sep}brain"},
                       {"a": [f"chest x ray.{sep}no mass"], "b": ["ct abdomen"], "c": [f"mri{sep}brain"]}, meteor=False)
        assert broken.per_sample["ROUGE-L"].tolist() == [1.0, 1.0, 1.0], repr(sep)
        assert broken.corpus == pytest.approx(spaced.corpus, abs=1e-12), repr(sep)


def test_a_predictions_file_without_a_header_is_scored_as_it_is_checked(tmp_path):
    refs, preds = tmp_path / "refs.csv", tmp_path / "preds.csv"
    refs.write_text(REFERENCES)
    preds.write_text("a,left lower lobe nodule\nb,no acute finding\nc,left rib fracture\n")  # ImageCLEF allows it
    assert check_submission(preds, ["a", "b", "c"]) == []
    evaluate("eval/imageclef", preds, refs, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ROUGE-1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert read_predictions(preds, header_optional=True)["a"] == "left lower lobe nodule"
    # elsewhere a first row without an ID column is a header with wrong names, not a row of data
    with pytest.raises(ValueError, match=f"{preds}: line 1: expected columns ID,caption"):
        read_predictions(preds)
    with pytest.raises(ValueError, match=f"{preds}: line 1: expected columns ID,caption"):
        read_references(preds)


def test_an_id_0_is_an_id_and_jsonl_errors_name_their_line(tmp_path):
    from medcap.data.records import read_manifest_samples
    from medcap.metrics.vqa import read_vqa_references

    refs = tmp_path / "r.jsonl"
    refs.write_text('{"id": 0, "caption": "zero"}\n{"id": "1", "caption": "one"}\n')
    assert read_references(refs) == {"0": ["zero"], "1": ["one"]}
    (tmp_path / "x.png").write_bytes(b"")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": 0, "image": "x.png", "caption": "zero"}\n')
    samples, problems = read_manifest_samples(manifest)
    assert problems == [] and [s["id"] for s in samples] == ["0"]
    upper = tmp_path / "M.CSV"  # a CSV whichever the case of its suffix
    upper.write_text("id,image,caption\n7,x.png,seven\n")
    samples, problems = read_manifest_samples(upper)
    assert problems == [] and [(s["id"], s["images"]) for s in samples] == [("7", [str(tmp_path / "x.png")])]
    refs.write_text('{"id": "a", "caption": "x"}\n["a"]\n')
    with pytest.raises(ValueError, match=f"{refs}: line 2: expected a JSON object, found list"):
        read_references(refs)

    questions = tmp_path / "q.jsonl"
    question = {"question": "Is it a\u2028chest?", "answer": "yes"}
    questions.write_text("\n".join(json.dumps({"id": i, **question}, ensure_ascii=False) for i in range(2)) + "\n")
    read = read_vqa_references(questions)
    assert list(read) == ["0", "1"] and read["0"]["answer"] == "yes"  # U+2028 inside a string is not a line end
    questions.write_text(json.dumps([{"qid": 7, "question": "Is it a chest?", "answer": "yes"},  # VQA-RAD's file
                                     {"question_id": "q", "option_B": "MRI", "option_A": "CT", "gt_answer": "CT"}]))
    read = read_vqa_references(questions)
    assert list(read) == ["7", "q"] and list(read["q"]["options"].items()) == [("A", "CT"), ("B", "MRI")]
    first = '{"id": "q1", "answer": "no"}\n'
    for text, error in [(first + '\n{"id": "q3", "answer": "no",}\n', "line 3: invalid JSON"),
                        (first + '["x"]\n', "line 2: a question must be a JSON object, found list"),
                        (first + '{"id": "q1", "answer": "yes"}\n', "line 2: duplicate id 'q1'"),
                        (json.dumps([{"id": "q1", "answer": "no"}, {"answer": "yes"}]),
                         "item 2: field 'id' is missing or empty"),
                        (first + '{"id": "q2", "answer": "CT", "options": ["CT", "MRI"]}\n',
                         "line 2: sample 'q2': field 'options' must be an object of {letter: text}, found list")]:
        questions.write_text(text)
        with pytest.raises(ValueError, match=f"{questions}: {error}"):
            read_vqa_references(questions)
