"""The browsable report (medcap.report): the HTML page's structure and data, escaping, thumbnails and paths with
spaces, sampling of large sets, the evaluate and vqa recipes writing it, and the page itself in headless
Chromium (skipped when no browser is installed): sorting through its own controls, filtering, rows loading as
the page scrolls, and a screenshot that is not blank."""

import base64
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap import cli
from medcap.data.findings import caption_for
from medcap.metrics import write_csv_predictions
from medcap.metrics.result import mean_scored
from medcap.report import (ReportOptions, System, caption_report, marked_words, report_options, sample_rows,
                           vqa_report)
from medcap.report.browser import Chromium, find_chromium

TRICKY = 'Frontal chest radiograph </script><b>bold</b> & "double" \'single\' <!-- x'


class Page(HTMLParser):
    """Every start tag of a page, the text of its metrics tables, and its JSON data block."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.cells, self._in, self._json = [], [], None, None
        self.feed(text)
        self.data = json.loads(self._json)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script" and dict(attrs).get("id") == "report-data":
            self._in = "json"
        elif tag in ("td", "th"):
            self._in = "cell"
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("script", "td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in == "json":
            self._json = data
        elif self._in == "cell":
            self.cells[-1] += data


def _image(path: Path, colour, size=(200, 160)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _captions():
    """Six demo-style samples: references, a system that gets some findings wrong, a blind system."""
    ids = [f"img {i}" for i in range(6)]
    places = ["left upper zone", "right lower zone", "left lower zone"]
    refs = {k: [caption_for("chest_xray", "nodule", places[i % 3])] for i, k in enumerate(ids)}
    good = {k: caption_for("chest_xray", "nodule" if i % 2 else "opacity", places[i % 3]) for i, k in enumerate(ids)}
    good[ids[5]] = TRICKY
    blind = {k: caption_for("chest_xray", "none", "none") for k in ids}
    a = mean_scored(ids, {"CIDEr": [0.5, 2.0, 0.1, 1.5, 0.9, 0.3], "BLEU-4": [0.6, 0.2, 0.9, 0.4, 0.1, 0.5]})
    b = mean_scored(ids, {"CIDEr": [0.4, 0.1, 0.2, 0.3, 0.0, 0.6], "BLEU-4": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]})
    return ids, refs, good, blind, a, b


def test_marked_words_keeps_the_text_and_marks_what_differs_from_the_closest_reference():
    text = "Frontal chest radiograph with a rounded nodule in the LEFT upper zone."
    refs = ["Axial CT of the head.", "Frontal chest radiograph with an ill-defined opacity in the left upper zone"]
    assert marked_words(text, refs) == ["Frontal chest radiograph with ", "a rounded nodule",
                                        " in the LEFT upper zone."]
    assert marked_words("  two  words ", ["words"]) == ["  ", "two", "  words "]
    assert marked_words("same, words", ["Same words"]) == ["same, words"]
    assert marked_words("", ["x"]) == [""]
    assert marked_words("all new", [""]) == ["", "all new"]


def test_sample_rows_keeps_the_worst_the_best_and_a_seeded_random_third():
    values = [float(v) for v in np.random.default_rng(1).permutation(100)]
    keep, note = sample_rows(values, 10, seed=0)
    kept = sorted(values[i] for i in keep)
    assert keep == sorted(keep) and len(set(keep)) == 10
    assert kept[:3] == [0, 1, 2] and kept[-3:] == [97, 98, 99] and all(3 <= v <= 96 for v in kept[3:7])
    assert note == "10 of 100 rows: the 3 worst, the 3 best and 4 at random (seed 0)"
    assert sample_rows(values, 10, seed=0)[0] == keep and sample_rows(values, 10, seed=1)[0] != keep
    assert sample_rows(values, None, 0) == (list(range(100)), "") == sample_rows(values, 100, 0)
    few = sample_rows([None, 1.0, 2.0, 3.0, 4.0], 3, 0)[0]  # a missing score counts as worst
    assert len(few) == 3 and few[0] == 0 and few[2] == 4 and few[1] in (1, 2, 3)


def test_report_options_from_config_values():
    assert report_options(False) is None and report_options(None) is None
    assert report_options(True) == ReportOptions()
    assert report_options({"max_rows": 10, "sort_by": "BLEU-4"}) == ReportOptions(max_rows=10, sort_by="BLEU-4")
    with pytest.raises(ValueError, match=r"report: unknown key\(s\) \['max_row'\]"):
        report_options({"max_row": 10})
    with pytest.raises(ValueError, match="report.max_rows must be at least 3"):
        report_options({"max_rows": 1})
    for key, bad in (("thumbnail_px", 0), ("inline_kb", -5), ("seed", -1)):
        with pytest.raises(ValueError, match=f"report.{key} must be at least"):
            report_options({key: bad})


def test_caption_page_rows_scores_findings_and_escaping(tmp_path):
    ids, refs, good, blind, a, b = _captions()
    images = {k: [_image(tmp_path / "my images" / f"{k}.png", (40 * i, 90, 160))] for i, k in enumerate(ids)}
    images[ids[4]] = [str(tmp_path / "my images" / "gone.png")]
    paired = {"resamples": 200, "seed": 3,
              "metrics": {"BLEU-4": {"difference": 0.35, "low": 0.3, "high": 0.4, "p_value": 0.0},
                          "CIDEr": {"difference": 0.6, "low": 0.1, "high": 1.2, "p_value": 0.01}}}
    page = caption_report(tmp_path / "out dir" / "report.html",
                          [System("good", good, a, {"CIDEr": (0.25, 1.5)}, "runs/good.csv"), System("blind", blind, b)],
                          refs, ReportOptions(inline_kb=0), images, paired)
    text = page.read_text(encoding="utf-8")
    parsed = Page(text)

    # nothing in a caption became markup: two scripts (data, code), no <b>, the data block holds it verbatim
    assert TRICKY not in text and "</script><b>" not in text and "<!-- x" not in text
    assert [t for t, _ in parsed.tags].count("script") == 2 and "b" not in [t for t, _ in parsed.tags]
    assert not any(a.get("src") for t, a in parsed.tags if t in ("script", "link", "img"))  # nothing fetched
    data = parsed.data
    rows = {r["id"]: r for r in data["rows"]}
    assert list(rows) == ids and data["systems"] == ["good", "blind"] and data["sort"] == "CIDEr"
    assert "".join(rows[ids[5]]["preds"][0]) == TRICKY and rows[ids[5]]["refs"] == refs[ids[5]]

    keys = [c["key"] for c in data["columns"]]
    assert keys == ["CIDEr", "CIDEr @ blind", "CIDEr difference", "BLEU-4", "BLEU-4 @ blind", "BLEU-4 difference",
                    "modality", "modality @ blind", "modality difference", "finding", "finding @ blind",
                    "finding difference"]
    scores = {k: [rows[i]["s"][keys.index(k)] for i in ids] for k in keys}
    assert scores["CIDEr"] == [0.5, 2.0, 0.1, 1.5, 0.9, 0.3] and scores["BLEU-4 @ blind"] == [0.1] * 6
    assert scores["CIDEr difference"] == pytest.approx([0.1, 1.9, -0.1, 1.2, 0.9, -0.3])
    # good: opacity (wrong) for even i, nodule (right) for odd i; sample 5 is the tricky caption, no finding
    assert scores["finding"] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0] and scores["finding @ blind"] == [0.0] * 6
    assert scores["modality"] == [1.0] * 5 + [1.0]  # the tricky caption still names the chest radiograph
    assert rows[ids[0]]["found"] == {"want": ["chest_xray", "nodule", "left upper zone"],
                                     "got": [["chest_xray", "opacity", "left upper zone"],
                                             ["chest_xray", "none", "none"]]}
    assert rows[ids[0]]["preds"][0] == ["Frontal chest radiograph with ", "an ill-defined opacity",
                                        " in the left upper zone."]

    # thumbnails beside the page, linked with percent-encoded paths; the missing image is named
    assert rows[ids[0]]["img"] == "report_thumbs/000000.jpg"
    assert rows[ids[0]]["href"] == "../my%20images/img%200.png"
    thumb = Image.open(page.parent / "report_thumbs" / "000000.jpg")
    assert thumb.format == "JPEG" and max(thumb.size) == 128
    assert "img" not in rows[ids[4]] and "gone.png" in rows[ids[4]]["noimg"]

    # the metrics at the top: values, the interval under good's CIDEr, findings accuracies, the paired table
    cells = parsed.cells
    header = cells[:cells.index("good")]
    assert header == ["", "CIDEr", "BLEU-4", "modality_acc", "finding_acc"]
    good_row = cells[cells.index("good"):cells.index("good") + 5]
    assert good_row == ["good", "0.8833[0.2500, 1.5000]", "0.4500", "1.0000", "0.3333"]
    assert cells[cells.index("blind") + 4] == "0.0000"
    # in the table's order; a p of 0 is below what 200 resamples resolve
    assert cells[-9:] == ["", "CIDEr", "BLEU-4", "difference", "+0.6000[+0.1000, +1.2000]",
                          "+0.3500[+0.3000, +0.4000]", "p (two-sided)", "0.010", "<0.01"]
    assert "good − blind: paired bootstrap over the same images (200 resamples, seed 3)" in text
    assert "runs/good.csv" in text
    with pytest.raises(ValueError, match=r"report: two systems share a name in \['good', 'good'\]"):
        caption_report(tmp_path / "x.html", [System("good", good, a), System("good", blind, b)], refs)


def test_thumbnails_are_inlined_below_the_limit_and_sort_by_is_checked(tmp_path):
    ids, refs, good, _, a, _ = _captions()
    images = {k: [_image(tmp_path / f"{k}.png", (10, 20 * i, 30))] for i, k in enumerate(ids)}
    (tmp_path / "report_thumbs").mkdir()  # left over from a run with files: removed
    page = caption_report(tmp_path / "report.html", [System("good", good, a)], refs,
                          ReportOptions(sort_by="BLEU-4", thumbnail_px=64), images)
    data = Page(page.read_text(encoding="utf-8")).data
    src = data["rows"][0]["img"]
    assert src.startswith("data:image/jpeg;base64,") and not (tmp_path / "report_thumbs").exists()
    assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (64, 51)
    assert data["sort"] == "BLEU-4" and [c["key"] for c in data["columns"]] == ["CIDEr", "BLEU-4", "modality",
                                                                                  "finding"]
    with pytest.raises(ValueError, match=r"report.sort_by: no per-sample score 'METEOR'; choose one of \['CIDEr'"):
        caption_report(tmp_path / "r.html", [System("good", good, a)], refs, ReportOptions(sort_by="METEOR"))


def test_findings_are_not_marked_for_captions_outside_the_demo_templates(tmp_path):
    scored = mean_scored(["a", "b"], {"ROUGE-L": [0.2, 0.8]})
    page = caption_report(tmp_path / "report.html", [System("run", {"a": "x", "b": "no acute finding"}, scored)],
                          {"a": ["left rib fracture"], "b": ["no acute finding", "normal chest"]})
    data = Page(page.read_text(encoding="utf-8")).data
    assert [c["key"] for c in data["columns"]] == ["ROUGE-L"] and data["sort"] == "ROUGE-L"
    assert not any("found" in r for r in data["rows"]) and data["rows"][1]["refs"] == ["no acute finding",
                                                                                       "normal chest"]


def test_max_rows_samples_a_large_set(tmp_path):
    ids = [f"s{i}" for i in range(30)]
    scored = mean_scored(ids, {"CIDEr": np.arange(30) / 10})
    page = caption_report(tmp_path / "report.html", [System("run", {k: "x" for k in ids}, scored)],
                          {k: ["y"] for k in ids}, ReportOptions(max_rows=9))
    parsed = Page(page.read_text(encoding="utf-8"))
    kept = [r["id"] for r in parsed.data["rows"]]
    assert len(kept) == 9 and kept[:3] == ["s0", "s1", "s2"] and kept[-3:] == ["s27", "s28", "s29"]
    assert "30 images; the page holds 9 of 30 rows: the 3 worst, the 3 best and 3 at random (seed 0)" in (
        page.read_text(encoding="utf-8"))


def test_vqa_page(tmp_path):
    records = [
        {"id": "q1", "question": 'Which "modality" <is> this?', "options": {"A": "CT", "B": "MRI & <PET>"},
         "raw_answer": "B", "parsed_option": "B", "correct_option": "A", "answer": "CT", "correct": False,
         "modality": "CT"},
        {"id": "q2", "question": "Fracture?", "options": None, "raw_answer": "Yes.", "parsed_option": None,
         "correct_option": None, "answer": "yes", "correct": True, "modality": "X-ray"},
    ]
    images = {"q1": [_image(tmp_path / "a b.png", (200, 0, 0))]}
    page = vqa_report(tmp_path / "vqa" / "report.html", records, {"accuracy": 0.5}, {"accuracy": (0.0, 1.0)}, images)
    text = page.read_text(encoding="utf-8")
    parsed = Page(text)
    assert "<is>" not in text and "<PET>" not in text
    q1, q2 = parsed.data["rows"]
    assert q1 == {"id": "q1", "img": q1["img"], "href": "../a%20b.png", "q": 'Which "modality" <is> this?',
                  "opts": [["A", "CT"], ["B", "MRI & <PET>"]], "key": "A", "answer": "CT", "raw": "B",
                  "parsed": "B", "ok": False, "group": "CT", "desc": None, "s": [0.0]}
    assert q1["img"].startswith("data:image/jpeg;base64,")
    assert q2["opts"] is None and q2["ok"] is True and q2["s"] == [1.0] and "img" not in q2
    assert parsed.data["sort"] == "correct"
    assert parsed.cells[:4] == ["", "accuracy", "answers", "0.5000[0.0000, 1.0000]"]


def test_a_caption_cut_inside_an_emoji_is_shown_as_written(tmp_path):
    ids, refs, good, blind, a, b = _captions()
    good[ids[0]] = "Chest radiograph \ud83d"  # a lone surrogate, as JSON readers accept it
    page = caption_report(tmp_path / "report.html", [System("good", good, a)], refs, ReportOptions())
    rows = {r["id"]: r for r in Page(page.read_text(encoding="utf-8")).data["rows"]}
    assert "".join(rows[ids[0]]["preds"][0]) == "Chest radiograph \ud83d"


def test_evaluate_recipe_writes_the_report_beside_metrics_json(tmp_path, capsys):
    data = tmp_path / "data set"
    lines = []
    findings = [("nodule", "left upper zone"), ("none", "none"), ("opacity", "right lower zone")]
    for i, (finding, place) in enumerate(findings):
        _image(data / "images" / f"x {i}.png", (30 * i, 60, 90))
        lines.append(json.dumps({"id": f"x{i}", "image": f"images/x {i}.png",
                                 "caption": caption_for("chest_xray", finding, place)}))
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    write_csv_predictions(tmp_path / "good" / "predictions.csv",
                          {"x0": caption_for("chest_xray", "nodule", "left upper zone"),
                           "x1": caption_for("chest_xray", "none", "none"), "x2": TRICKY})
    write_csv_predictions(tmp_path / "blind" / "predictions.csv",
                          {f"x{i}": "Frontal chest radiograph." for i in range(3)})
    out = tmp_path / "eval"
    args = ["run", "evaluate", "--config", "eval/coco", f"predictions={tmp_path / 'good' / 'predictions.csv'}",
            f"references={data / 'test.jsonl'}", "tokenize=false", "meteor=false", "bootstrap=100",
            f"output_dir={out}"]
    cli.main([*args, f"compare_to={tmp_path / 'blind' / 'predictions.csv'}"])
    assert f"report -> {out / 'report.html'}" in capsys.readouterr().out
    parsed = Page((out / "report.html").read_text(encoding="utf-8"))
    rows = {r["id"]: r for r in parsed.data["rows"]}
    per_sample = [line.split(",") for line in (out / "per_sample.csv").read_text().splitlines()]
    cider = per_sample[0].index("CIDEr")
    keys = [c["key"] for c in parsed.data["columns"]]
    for row in per_sample[1:]:  # the page's scores are per_sample.csv's
        assert rows[row[0]]["s"][keys.index("CIDEr")] == pytest.approx(float(row[cider]), abs=1e-6)
    assert parsed.data["systems"] == ["good", "blind"] and "".join(rows["x2"]["preds"][0]) == TRICKY
    assert rows["x1"]["href"] == "../data%20set/images/x%201.png" and rows["x1"]["img"].startswith("data:")
    assert [r["found"]["got"][0][1] for r in parsed.data["rows"]] == ["nodule", "none", "unknown"]
    assert "good − blind: paired bootstrap over the same images" in (out / "report.html").read_text()

    paired = json.loads((out / "paired.json").read_text())
    assert (paired["resamples"], paired["seed"], paired["level"]) == (100, 0, 0.95)

    # a run that fails after scoring leaves none of the earlier scoring's page, intervals or comparison beside
    # its metrics.json (the page checks sort_by against the columns it builds)
    with pytest.raises(ValueError, match="report.sort_by: no per-sample score 'BLEU4'"):
        cli.main([*args, "bootstrap=0", "report.sort_by=BLEU4"])
    assert not any((out / name).exists() for name in ("report.html", "intervals.json", "paired.json"))
    with pytest.raises(ValueError, match="bootstrap and seed must be at least 0"):
        cli.main([*args, "bootstrap=-5"])
    assert (out / "metrics.json").is_file()  # refused before anything was scored or removed
    cli.main([*args, f"compare_to={tmp_path / 'blind' / 'predictions.csv'}"])
    (out / "report_thumbs").mkdir()  # as a run with thumbnail files leaves it
    # no page, intervals or comparison of the earlier scoring is left beside the new metrics
    cli.main([*args, "bootstrap=0", "report=false"])
    assert (out / "metrics.json").is_file() and (out / "per_sample.csv").is_file()
    assert not any((out / name).exists() for name in ("report.html", "report_thumbs", "intervals.json", "paired.json"))
    printed = capsys.readouterr().out
    assert all(f"removed the earlier scoring's {out / name}" in printed
               for name in ("report.html", "report_thumbs", "intervals.json", "paired.json"))

    # two runs whose folders share a name are told apart by the folder above; the p-value of 20 resamples
    for run in ("a", "b"):
        write_csv_predictions(tmp_path / run / "run" / "run.csv", {f"x{i}": caption_for("chest_xray", "none", "none")
                                                                    if run == "a" else "Chest." for i in range(3)})
    cli.main([*args[:4], f"predictions={tmp_path / 'a' / 'run' / 'run.csv'}", *args[5:], "bootstrap=20",
              f"compare_to={tmp_path / 'b' / 'run' / 'run.csv'}"])
    printed = capsys.readouterr().out
    assert "a/run - b/run (paired bootstrap, 20 resamples, seed 0" in printed and "p=<0.1" in printed
    table = [line.split()[0] for line in printed.splitlines() if line.startswith(("a/run ", "b/run "))
             and "paired" not in line]
    assert table == ["a/run", "b/run"]
    assert Page((out / "report.html").read_text(encoding="utf-8")).data["systems"] == ["a/run", "b/run"]

    # without the submission check, an id missing from compare_to is named with its file
    write_csv_predictions(tmp_path / "short.csv", {"x0": "Chest.", "x1": "Chest."})
    with pytest.raises(ValueError, match=rf"{tmp_path / 'short.csv'}: 1 reference id\(s\) have no prediction"):
        cli.run_recipe("evaluate", "eval/coco", [*args[4:], "check_submission=false",
                                                 f"compare_to={tmp_path / 'short.csv'}"])


def test_ties_are_sampled_across_the_file_not_from_its_start():
    values = [0.0] * 300 + [1.0] * 300  # a 0/1 score, the wrong answers first in the file
    keep, _ = sample_rows(values, 30, seed=0)
    worst, best = [i for i in keep if values[i] == 0.0], [i for i in keep if values[i] == 1.0]
    assert len(worst) >= 10 and len(best) >= 10
    assert max(worst[:10]) > 100 and min(best) < 500  # not positions 0..9 and 590..599
    assert sample_rows(values, 30, seed=0)[0] == keep


def test_a_link_to_the_full_image_is_relative_to_the_folder_the_page_is_opened_by(tmp_path):
    from medcap.report.thumbnails import relative_url

    (tmp_path / "real" / "eval").mkdir(parents=True)
    (tmp_path / "proj" / "img").mkdir(parents=True)
    (tmp_path / "proj" / "outputs").symlink_to(tmp_path / "real")
    page_dir = tmp_path / "proj" / "outputs" / "eval"
    href = relative_url(tmp_path / "proj" / "img" / "a b.png", page_dir)
    assert href == "../../img/a%20b.png"
    assert (Path(os.path.normpath(page_dir / "../../img")) / "a b.png") == tmp_path / "proj" / "img" / "a b.png"


def test_vqa_evaluation_page_shows_compare_to_and_the_paired_table(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"id": f"q{i}", "answer": "MRI", "options": {"A": "CT", "B": "MRI"},
                                               "modality": "head"}) for i in range(4)) + "\n")
    write_csv_predictions(tmp_path / "good" / "p.csv", {f"q{i}": "B" for i in range(4)})
    write_csv_predictions(tmp_path / "bad" / "p.csv", {f"q{i}": "A" if i else "B" for i in range(4)})
    out = tmp_path / "eval"
    cli.run_recipe("evaluate", "eval/vqa", [f"predictions={tmp_path / 'good' / 'p.csv'}", f"references={questions}",
                                            f"compare_to={tmp_path / 'bad' / 'p.csv'}", "bootstrap=50",
                                            f"output_dir={out}"])
    text = (out / "report.html").read_text(encoding="utf-8")
    cells = Page(text).cells
    assert cells[cells.index("bad") + 1].startswith("0.2500") and cells[cells.index("good") + 1].startswith("1.0000")
    assert cells[cells.index("good") + cells[:cells.index("good")].index("n")] == "4"  # a count, not 4.0000
    assert "good − bad: paired bootstrap over the same images (50 resamples, seed 0)" in text
    assert f"bad: {tmp_path / 'bad' / 'p.csv'} (its answers are not shown)" in text
    assert "no thumbnails: no reference has an image path (field image)" in text

    # questions in a JSON list, named by question_id, get their images
    _image(tmp_path / "images" / "q 1.png", (10, 20, 30))
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question_id": f"q{i}", "answer": "MRI", "options": {"A": "CT", "B": "MRI"},
                                      "image": f"images/q {i}.png"} for i in range(4)]))
    cli.run_recipe("evaluate", "eval/vqa", [f"predictions={tmp_path / 'good' / 'p.csv'}", f"references={questions}",
                                            f"output_dir={out}"])
    rows = {r["id"]: r for r in Page((out / "report.html").read_text(encoding="utf-8")).data["rows"]}
    assert rows["q1"]["img"].startswith("data:image/jpeg;base64,") and rows["q1"]["href"] == "../images/q%201.png"
    assert "q 0.png" in rows["q0"]["noimg"]


def test_vqa_recipe_writes_the_report(tmp_path):
    from medcap.data.demo_vqa import build_demo_vqa

    data = tmp_path / "demo"
    (data / "images").mkdir(parents=True)
    lines = []
    for i, modality in enumerate(["chest_xray", "head_ct"]):
        _image(data / "images" / f"t{i}.png", (50, 80 * i, 20), (64, 64))
        lines.append(json.dumps({"id": f"demo_test_{i:04d}", "image": f"images/t{i}.png", "caption": "-",
                                 "modality": modality, "finding": "none", "location": "none"}))
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    build_demo_vqa(data, "test", seed=0)
    out = tmp_path / "vqa"
    cli.run_recipe("vqa", "demo/vqa", [
        "model._component_=medcap.models.builders.tiny_demo", "~model.max_seq_len", "~model.image_grid",
        "checkpoint=null", f"dataset.data_dir={data}", f"output_dir={out}", "bootstrap=20", "report.max_rows=4"])
    answers = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    parsed = Page((out / "report.html").read_text(encoding="utf-8"))
    assert len(answers) == 6 and len(parsed.data["rows"]) == 4  # report.max_rows=4
    by_id = {a["id"]: a for a in answers}
    for row in parsed.data["rows"]:
        answer = by_id[row["id"]]
        assert (row["raw"], row["parsed"], row["key"], row["ok"]) == (
            answer["raw_answer"], answer["parsed_option"], answer["correct_option"], answer["correct"])
        assert row["img"].startswith("data:image/jpeg")
    assert "4 of 6 rows" in (out / "report.html").read_text()


# --- the page in a real browser ------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary (apt-get install chromium)")


@needs_chromium
def test_the_page_in_headless_chromium_sorts_filters_and_loads_rows_as_it_scrolls(tmp_path):
    n = 250
    ids = [f"s{i:03d}" for i in range(n)]
    rng = np.random.default_rng(0)
    cider, bleu = rng.random(n), rng.random(n)
    images = {}
    for i, k in enumerate(ids[:20]):  # the first rows get images, in a folder with a space, beside the page
        pixels = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        images[k] = [str(tmp_path / "my images" / f"{k} a.png")]
        Path(images[k][0]).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(images[k][0])
    worst = int(np.argmin(cider))
    predictions = {k: f"prediction {k}" for k in ids}
    predictions[ids[worst]] = TRICKY
    page = caption_report(tmp_path / "out dir" / "report.html",
                          [System("run", predictions, mean_scored(ids, {"CIDEr": cider, "BLEU-4": bleu}))],
                          {k: [f"reference {k}"] for k in ids}, ReportOptions(inline_kb=0), images)
    first_id = "document.querySelector('#rows tbody tr').dataset.id"
    n_rows = "document.querySelectorAll('#rows tbody tr').length"

    with Chromium(width=1200, height=800) as browser:
        browser.open(page, "document.body && document.body.dataset.ready === '1'")
        assert browser.evaluate(first_id) == ids[worst]  # CIDEr, worst first
        rendered = browser.evaluate(n_rows)
        assert 0 < rendered < n  # the rest load as the page scrolls
        # the tricky caption is text, not markup
        cell = browser.evaluate("document.querySelector('#rows tbody tr').querySelector('td.text').textContent")
        assert TRICKY in cell and browser.evaluate("document.querySelectorAll('#rows tbody b').length") == 0

        browser.click("#rows th[data-key='BLEU-4'] button")  # the page's own control, clicked with the mouse
        assert browser.wait_for(f"{first_id} === {json.dumps(ids[int(np.argmin(bleu))])}")
        browser.click("#rows th[data-key='BLEU-4'] button")  # again: best first
        assert browser.wait_for(f"{first_id} === {json.dumps(ids[int(np.argmax(bleu))])}")
        assert browser.evaluate("document.getElementById('sort-order').textContent") == "best first"

        browser.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        browser.wait_for(f"{n_rows} > {rendered}")

        browser.click("#sort-order")  # worst first, by BLEU-4
        browser.type_text("#filter", "s01")  # ids s010..s019
        browser.wait_for("document.getElementById('count').textContent === '10 of 250 rows match'")
        shown = browser.evaluate("[...document.querySelectorAll('#rows tbody tr')].map(r => r.dataset.id)")
        assert shown == sorted(ids[10:20], key=lambda k: bleu[ids.index(k)])
        # the thumbnails beside the page load through their percent-encoded paths
        assert browser.wait_for("[...document.querySelectorAll('#rows tbody img')].every(i => i.naturalWidth > 0)"
                                " && document.querySelectorAll('#rows tbody img').length === 10")
        href = browser.evaluate("document.querySelector('#rows tbody a').href")
        assert href.startswith(page.parent.parent.as_uri() + "/my%20images/s01") and href.endswith("%20a.png")

        browser.evaluate("window.scrollTo(0, 0)")
        png = browser.screenshot()
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    assert image.shape == (800, 1200, 3)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # text, colours, thumbnails
    assert (image < 128).mean() > 0.005  # dark text is drawn, not a white page
