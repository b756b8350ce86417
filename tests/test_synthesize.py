"""Synthesizer: neighbours files, the prompt, cleaning the reply, and the recipe end to end on a tiny LM."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import medcap.synthesis
from medcap import cli
from medcap.metrics import read_predictions
from medcap.retrieval import CaptionIndex, ImageEmbedder, l2_normalize
from medcap.synthesis import clean_output, read_neighbours, search_neighbours, synthesis_prompt

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_neighbours_from_jsonl_strings_or_objects(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [
        {"id": "q1", "neighbours": ["near", "far"]},
        {"id": "q2", "neighbours": [{"id": "t9", "caption": "nearest", "score": 0.9}, {"caption": "next"}]},
        {"id": "q3", "neighbours": []},
    ])
    assert read_neighbours(path) == {"q1": ["near", "far"], "q2": ["nearest", "next"], "q3": []}


def test_neighbours_from_csv_are_sorted_by_rank(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("ID,rank,caption,score\nq1,2,second,0.5\nq1,1,first,0.9\nq2,1,only,0.7\nq1,10,tenth,0.1\n")
    assert read_neighbours(path) == {"q1": ["first", "second", "tenth"], "q2": ["only"]}


@pytest.mark.parametrize("rows, message", [
    (['{"id": "q1", "neighbours": ["a"]}', '{"id": "q1", "neighbours": ["b"]}'], r"line 2: duplicate ID 'q1'"),
    (['{"neighbours": ["a"]}'], r"line 1: field 'id' is missing"),
    (['{"id": "q1", "neighbours": "a"}'], r"line 1: sample 'q1': field 'neighbours' must be a list"),
    (['{"id": "q1", "neighbours": ["a", {"text": "b"}]}'], r"line 1: sample 'q1': neighbour 2: expected a caption"),
    (['{"id": "q1", "neighbours": ["a"]', ], r"line 1: invalid JSON"),
])
def test_bad_jsonl_neighbours_name_the_file_line_and_id(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl: " + message):
        read_neighbours(path)


def test_bad_csv_neighbours_name_the_file_line_and_id(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("ID,rank,caption\nq1,1,a\nq1,one,b\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: sample 'q1': field 'rank' must be an integer"):
        read_neighbours(path)
    path.write_text("ID,rank,caption\nq1,1,a\nq1,1,b\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: sample 'q1': rank 1 appears twice"):
        read_neighbours(path)
    path.write_text("ID,caption\nq1,a\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 1: expected columns ID,rank,caption or ID,rank,neighbour_ID"):
        read_neighbours(path)


class MeanColour(nn.Module):
    """A retrieval encoder for tests: one token per image, its mean normalised colour."""

    image_size, mean, std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # the embedder reads the dtype from a parameter

    def forward(self, images):
        return images.mean(dim=(2, 3))[:, None, :]


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture
def colour_index(tmp_path):
    """An index of three plain-coloured training images (captions name the colour) and a manifest of queries:
    a dark red and a pale blue image."""
    paths = {}
    for name, rgb in {**COLOURS, "q_red": (190, 30, 20), "q_blue": (40, 60, 220)}.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 8), rgb).save(paths[name])
    embedder = ImageEmbedder(MeanColour(), torch.device("cpu"))
    train = [{"id": f"t_{n}", "images": [str(paths[n])]} for n in COLOURS]
    source = {"encoder": {"_component_": "tests.test_synthesize.MeanColour"}, "checkpoint": None}
    CaptionIndex(embedder.embed_samples(train), [s["id"] for s in train], [f"All {n}." for n in COLOURS],
                 [s["images"] for s in train], meta={"source": source}).save(tmp_path / "index")
    manifest = write_jsonl(tmp_path / "queries.jsonl", [{"id": q, "image": f"{q}.png", "caption": "?"}
                                                        for q in ("q_red", "q_blue")])
    return tmp_path / "index", manifest


def test_neighbour_ids_take_their_captions_from_the_index(tmp_path, colour_index):
    index_dir, _ = colour_index
    path = tmp_path / "knn.csv"  # as knn_fewshot writes it
    path.write_text("ID,rank,neighbour_ID,similarity\nq1,2,t_blue,0.5\nq1,1,t_red,0.9\nq2,1,t_green,0.7\n")
    assert read_neighbours(path, index_dir) == {"q1": ["All red.", "All blue."], "q2": ["All green."]}
    jsonl = write_jsonl(tmp_path / "ids.jsonl", [{"id": "q1", "neighbours": [{"id": "t_green"}, "free text"]}])
    assert read_neighbours(jsonl, index_dir) == {"q1": ["All green.", "free text"]}
    with pytest.raises(ValueError, match=r"knn\.csv: line 2: sample 'q1': neighbour 't_blue' has no caption; set "
                                         r"index_dir"):
        read_neighbours(path)
    path.write_text("ID,rank,neighbour_ID\nq1,1,t_pink\n")
    with pytest.raises(ValueError, match=r"knn\.csv: line 2: sample 'q1': neighbour ID 't_pink' is not in the index"):
        read_neighbours(path, index_dir)


def test_prompt_shows_the_top_n_neighbours_and_the_draft():
    text = synthesis_prompt("CT  of the\nhead.", ["one", "two", "three"], 2, instruction="Rewrite.")
    assert text == "Rewrite.\n\nCaptions of similar images:\n1. one\n2. two\n\nDraft caption: CT of the head."
    custom = synthesis_prompt("d", ["n"], 1, instruction="I", template="{draft} | {neighbours} | {instruction}")
    assert custom == "d | 1. n | I"
    with pytest.raises(ValueError, match=r"must contain \{neighbours\}"):
        synthesis_prompt("d", ["n"], 1, template="{draft} only")


@pytest.mark.parametrize("reply, expected", [
    ("Chest radiograph with a nodule.", "Chest radiograph with a nodule."),
    ("\n  Caption: CT of the head.\nThis caption states...", "CT of the head."),
    ('"MRI of the knee."', "MRI of the knee."),
    ("Improved caption: 'Ultrasound of the liver.'", "Ultrasound of the liver."),
    ("   \n ", ""),
])
def test_clean_output_keeps_the_caption(reply, expected):
    assert clean_output(reply) == expected


def test_clean_output_can_keep_every_line():
    assert clean_output("line one\nline two", first_line_only=False) == "line one\nline two"


IDS = ["b2", "a1", "c3", "d4", "e5"]


@pytest.fixture
def inputs(tmp_path):
    drafts = tmp_path / "drafts.csv"
    with drafts.open("w", newline="") as f:
        csv.writer(f).writerows([["ID", "caption"]] + [[i, f"Chest radiograph {n}."] for n, i in enumerate(IDS)])
    neighbours = write_jsonl(tmp_path / "neighbours.jsonl",
                             [{"id": i, "neighbours": [f"neighbour {i} {r}" for r in range(4)]} for i in IDS])
    return drafts, neighbours


def tiny_config(tmp_path: Path, **changes) -> Path:
    cfg = OmegaConf.load(ROOT / "configs" / "demo" / "synthesize.yaml")
    cfg.model = {"_component_": "medcap.fuser.tiny_smollm2_lm", "max_seq_len": 256, "seed": 0, "trainable": "frozen"}
    cfg.max_new_tokens = 5
    cfg.batch_size = 2
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = tmp_path / "synthesize.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_synthesize_recipe_writes_every_id_once(tmp_path, inputs):
    drafts, neighbours = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "neighbours.jsonl").write_text("{}\n")  # an earlier run's search, not this run's neighbours
    cli.run_recipe("synthesize", str(tiny_config(tmp_path, drafts=str(drafts), neighbours=str(neighbours),
                                                  output_dir=str(out), num_neighbours=2)), [])
    assert not (out / "neighbours.jsonl").exists()
    predictions = read_predictions(out / "predictions.csv")
    assert list(predictions) == IDS
    rows = [json.loads(line) for line in (out / "synthesis.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == IDS
    assert rows[1]["neighbours"] == ["neighbour a1 0", "neighbour a1 1"]
    assert rows[1]["draft"] == "Chest radiograph 1."
    for row in rows:  # the caption is the cleaned reply, or the draft when nothing was left
        assert predictions[row["id"]] == (clean_output(row["reply"]) or row["draft"])
        assert predictions[row["id"]]


def colour_config(tmp_path, colour_index, **extra):
    """(config, output folder) of a run searching the colour index for two queries' neighbours."""
    index_dir, manifest = colour_index
    drafts = tmp_path / "drafts.csv"
    drafts.write_text("ID,caption\nq_blue,A draft.\nq_red,Another draft.\n")
    out = tmp_path / "out"
    return tiny_config(tmp_path, drafts=str(drafts), index_dir=str(index_dir), output_dir=str(out), num_neighbours=2,
                       **extra, **{"dataset.manifest": str(manifest)}), out


def test_synthesize_searches_the_index_for_the_planted_neighbours(tmp_path, colour_index):
    config, out = colour_config(tmp_path, colour_index)
    # the index's meta.json names an encoder outside medcap's builders: built only when the user trusts it
    with pytest.raises(ValueError, match=r"index/meta.json: encoder._component_ = 'tests.test_synthesize.MeanColour' "
                                         r"is not allowed"):
        cli.run_recipe("synthesize", str(config), [])
    cli.run_recipe("synthesize", str(config), ["trusted_components=[tests.test_synthesize.MeanColour]"])
    found = {r["id"]: r["neighbours"] for r in map(json.loads, (out / "neighbours.jsonl").read_text().splitlines())}
    # cosine similarities by hand (colours normalised to [-1, 1]): dark red .977 red, -.19 green, -.26 blue;
    # pale blue .992 blue, -.29 green, -.45 red
    assert [n["id"] for n in found["q_red"]] == ["t_red", "t_green"]
    assert [n["id"] for n in found["q_blue"]] == ["t_blue", "t_green"]
    assert found["q_red"][0]["score"] == pytest.approx(0.977, abs=2e-3)
    rows = {r["id"]: r for r in map(json.loads, (out / "synthesis.jsonl").read_text().splitlines())}
    assert rows["q_red"]["neighbours"][0] == "All red." and rows["q_blue"]["neighbours"][0] == "All blue."
    assert list(read_predictions(out / "predictions.csv")) == ["q_blue", "q_red"]
    # the search's file read back as this run's neighbours stays
    cli.run_recipe("synthesize", str(config), ["trusted_components=[tests.test_synthesize.MeanColour]",
                                               f"neighbours={out / 'neighbours.jsonl'}"])
    assert (out / "neighbours.jsonl").is_file() and list(read_predictions(out / "predictions.csv")) == [
        "q_blue", "q_red"]


def test_a_prompt_too_long_for_the_decoder_names_the_id_and_the_drafts(tmp_path, inputs):
    drafts, neighbours = inputs
    config = tiny_config(tmp_path, drafts=str(drafts), neighbours=str(neighbours), output_dir=str(tmp_path / "o"),
                         max_new_tokens=250)
    with pytest.raises(ValueError, match=rf"ID '{IDS[0]}': the prompt of the draft in .*drafts\.csv and 3 "
                                         r"neighbours is \d+ tokens, and with max_new_tokens=250 needs \d+, more than "
                                         rf"the decoder's max_seq_len 256, and {len(IDS) - 1} more IDs$"):
        cli.run_recipe("synthesize", str(config), [])
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_synthesize_names_an_id_without_neighbours(tmp_path, inputs):
    drafts, _ = inputs
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"id": i, "neighbours": ["n"]} for i in IDS if i != "c3"])
    config = tiny_config(tmp_path, drafts=str(drafts), neighbours=str(partial), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"partial\.jsonl: no neighbours for ID 'c3' \(in .*drafts\.csv\)"):
        cli.run_recipe("synthesize", str(config), [])


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # utf-8-sig: a byte-order mark, as Excel saves it
def test_csv_neighbours_keep_what_is_inside_quoted_captions(tmp_path, encoding):
    captions = ["Chest X-ray.\nNo effusion.", "CT of the abdomen\u2028with contrast.", "MRI\x85of the brain.",
                'A "quoted", comma.', "plain"]
    path = tmp_path / "n.csv"
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "rank", "caption"])
        writer.writerows(["q1", rank, caption] for rank, caption in enumerate(captions, 1))
    assert read_neighbours(path) == {"q1": captions}


@pytest.mark.parametrize("text, message", [
    ("ID,rank,caption\nq1,1,a\nq1,2\n", r"line 3: expected 3 fields \(ID,rank,caption\), found 2"),
    ("ID,rank,caption\nq1,1,CT scan, of the chest\n", r"line 2: expected 3 fields \(ID,rank,caption\), found 4"),
    ('ID,rank,caption\nq1,1,"never closed\nq1,2,b\n', r"line 2: malformed CSV"),
], ids=["short row", "unquoted comma", "unclosed quote"])
def test_csv_neighbours_rows_must_have_the_header_s_fields(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.csv: " + message):
        read_neighbours(path)


def test_csv_rank_0_is_an_id_without_neighbours(tmp_path, colour_index):
    index_dir, _ = colour_index
    path = tmp_path / "knn.csv"  # as knn_fewshot writes a query without neighbours
    path.write_text("ID,rank,neighbour_ID,similarity\nq1,0,,\nq2,1,t_red,0.9\n")
    assert read_neighbours(path, index_dir) == {"q1": [], "q2": ["All red."]}
    for text, message in (("q1,0,t_red,0.9\n", r"line 2: sample 'q1': rank 0 \(no neighbours\) with neighbour_ID"),
                          ("q1,1,t_red,0.9\nq1,0,,\n", r"line 3: sample 'q1': rank 0 \(no neighbours\) and rank 1"),
                          ("q1,0,,\nq1,1,t_red,0.9\n", r"line 3: sample 'q1': rank 0 \(no neighbours\) and rank 1"),
                          ("q1,-1,t_red,0.9\n", r"line 2: sample 'q1': field 'rank' must be an integer >= 0")):
        path.write_text("ID,rank,neighbour_ID,similarity\n" + text)
        with pytest.raises(ValueError, match=r"knn\.csv: " + message):
            read_neighbours(path, index_dir)


def test_an_id_without_neighbours_gets_the_fallback_template(tmp_path, inputs):
    drafts, _ = inputs
    path = tmp_path / "neighbours.csv"
    path.write_text("ID,rank,caption\n" + "".join(f"{i},0,\n" if i == "a1" else f"{i},1,near {i}\n" for i in IDS))
    out = tmp_path / "out"
    config = tiny_config(tmp_path, drafts=str(drafts), neighbours=str(path), output_dir=str(out), num_neighbours=2,
                         instruction="Rewrite.", template="{instruction} {neighbours} | {draft}",
                         fallback_template="Caption: {draft}")
    cli.run_recipe("synthesize", str(config), [])
    rows = {r["id"]: r for r in map(json.loads, (out / "synthesis.jsonl").read_text().splitlines())}
    assert (rows["a1"]["neighbours"], rows["a1"]["prompt"]) == ([], "Caption: Chest radiograph 1.")
    assert (rows["b2"]["neighbours"], rows["b2"]["prompt"]) == (["near b2"],
                                                                "Rewrite. 1. near b2 | Chest radiograph 0.")
    # an ID with no row at all is still an error
    path.write_text("ID,rank,caption\n" + "".join(f"{i},0,\n" for i in IDS if i != "c3"))
    with pytest.raises(ValueError, match=r"neighbours\.csv: no neighbours for ID 'c3' \(in .*drafts\.csv\)"):
        cli.run_recipe("synthesize", str(config), [])


def test_search_names_an_index_without_a_source(tmp_path):
    CaptionIndex(l2_normalize(np.eye(3)), ["a", "b", "c"], ["x", "y", "z"]).save(tmp_path / "index")
    with pytest.raises(ValueError, match=r"index: meta\.json names no source encoder; rebuild it with medcap run "
                                         r"build_index"):
        search_neighbours(tmp_path / "index", [{"id": "q", "images": []}], 1, torch.device("cpu"), torch.float32)


def searched_run(tmp_path, colour_index):
    """A config that searches the colour index for two queries, run once: its outputs as written."""
    config, out = colour_config(tmp_path, colour_index, trusted_components=["tests.test_synthesize.MeanColour"])
    cli.run_recipe("synthesize", str(config), [])
    written = {name: (out / name).read_text() for name in ("neighbours.jsonl", "synthesis.jsonl")}
    assert all(text.count("\n") == 2 for text in written.values())
    return config, out, written


def test_a_run_failing_while_writing_neighbours_keeps_the_previous_files(tmp_path, colour_index, monkeypatch):
    config, out, before = searched_run(tmp_path, colour_index)
    search = medcap.synthesis.search_neighbours

    def unwritable_second_query(*args, **kwargs):
        found = search(*args, **kwargs)
        found["q_blue"][0]["score"] = object()  # the manifest's second query
        return found

    monkeypatch.setattr(medcap.synthesis, "search_neighbours", unwritable_second_query)
    with pytest.raises(TypeError, match="not JSON serializable"):
        cli.run_recipe("synthesize", str(config), [])
    assert {name: (out / name).read_text() for name in before} == before


def test_a_run_failing_while_writing_replies_keeps_the_previous_files(tmp_path, colour_index, monkeypatch):
    config, out, before = searched_run(tmp_path, colour_index)
    cleaned = []

    def interrupted_at_the_second_reply(reply, first_line_only=True):
        cleaned.append(reply)
        if len(cleaned) == 2:
            raise RuntimeError("interrupted")
        return clean_output(reply, first_line_only)

    monkeypatch.setattr(medcap.synthesis, "clean_output", interrupted_at_the_second_reply)
    with pytest.raises(RuntimeError, match="interrupted"):
        cli.run_recipe("synthesize", str(config), [])
    assert {name: (out / name).read_text() for name in before} == before


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_configs_take_the_documented_prompt_keys(name):
    path = cli.find_config(f"{name}/synthesize")
    cli.check_override_keys(path, ["fallback_template=Caption: {draft}", "draft_turn=true", "neighbour_line={caption}"])
    cfg = OmegaConf.load(path)
    assert (cfg.fallback_template, cfg.draft_turn, cfg.neighbour_line) == (None, False, None)  # the recipe's defaults
