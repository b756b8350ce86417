"""Retrieval: embeddings, the faiss index (exact, IVF, HNSW), neighbour rules, save/load, and the recipes that
build an index and caption with the nearest neighbour."""

import csv
import json
import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.numpy import save_file as save_numpy

from medcap import cli
from medcap.checkpoint import save_checkpoint
from medcap.data.demo_builder import build_demo
from medcap.models.builders import tiny_demo
from medcap.models.encoders import efficientnet_lite0, tiny_efficientnet
from medcap.retrieval import (CaptionIndex, ImageEmbedder, Neighbour, embedder_from_source, l2_normalize,
                              retrieval_source, write_neighbours_csv)


def small_index(captions=None, **settings):
    # a = (3, 4)/5, b = (1, 0), c = (0, 1), d = (1, 1)/sqrt 2, normalised by the index's caller
    vectors = l2_normalize(np.array([[3, 4], [1, 0], [0, 2], [1, 1]], dtype=np.float32))
    captions = captions or ["caption a", "caption b", "caption c", "caption d"]
    return CaptionIndex(vectors, ["a", "b", "c", "d"], captions, [[f"/x/{i}.png"] for i in "abcd"], settings)


QUERY = l2_normalize(np.array([[4, 3]], dtype=np.float32))  # (0.8, 0.6)


def test_inner_product_of_normalised_vectors_is_the_cosine():
    found = small_index().search(QUERY, k=4)[0]
    # by hand: d (0.8 + 0.6) / sqrt 2, a 0.8 * 0.6 + 0.6 * 0.8, b 0.8, c 0.6
    assert [n.id for n in found] == ["d", "a", "b", "c"]
    assert [n.score for n in found] == pytest.approx([1.4 / math.sqrt(2), 0.96, 0.8, 0.6], abs=1e-6)
    assert found[0].caption == "caption d" and found[0].images == ["/x/d.png"] and found[0].position == 3


def test_threshold_keeps_only_similar_neighbours():
    index = small_index()
    assert [n.id for n in index.search(QUERY, k=4, threshold=0.9)[0]] == ["d", "a"]
    assert [n.id for n in index.search(QUERY, k=4, threshold=0.8)[0]] == ["d", "a", "b"]  # the bound is kept
    assert index.search(QUERY, k=4, threshold=0.995)[0] == []


def test_query_itself_is_left_out_by_id_file_or_identical_embedding():
    index = small_index()
    query_a = index.embeddings[:1].copy()
    assert [n.id for n in index.search(query_a, k=2, exclude_identical=False)[0]] == ["a", "d"]  # itself first
    # from a = (0.6, 0.8): d 1.4 / sqrt 2, c 0.8, b 0.6
    assert [n.id for n in index.search(query_a, k=2, query_ids=["a"], exclude_identical=False)[0]] == ["d", "c"]
    assert [n.id for n in index.search(query_a, k=2, query_ids=["other"], query_images=[["/x/../x/a.png"]],
                                       exclude_identical=False)[0]] == ["d", "c"]
    assert [n.id for n in index.search(query_a, k=2)[0]] == ["d", "c"]  # identical embedding, no id needed
    near = l2_normalize(query_a + np.float32([[1e-3, 0]]))
    assert [n.id for n in index.search(near, k=1)[0]] == ["a"]  # close is not identical


def test_duplicate_captions_are_skipped_unless_asked_to_keep_them():
    index = small_index(["Nodule.", "Normal.", "Effusion.", "  nodule. "])  # a and d say the same
    assert [n.id for n in index.search(QUERY, k=3)[0]] == ["d", "b", "c"]
    assert [n.id for n in index.search(QUERY, k=3, dedupe_captions=False)[0]] == ["d", "a", "b"]


def test_search_looks_further_when_excluded_entries_fill_the_first_candidates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 8))
    near = l2_normalize(base + 0.01 * rng.normal(size=(40, 8)))  # 40 near copies, one caption
    far = l2_normalize(rng.normal(size=(5, 8)))
    index = CaptionIndex(np.concatenate([near, far]), [f"n{i}" for i in range(40)] + [f"f{i}" for i in range(5)],
                         ["same caption"] * 40 + [f"caption {i}" for i in range(5)])
    found = index.search(l2_normalize(base), k=3)[0]
    assert len(found) == 3 and found[0].id.startswith("n") and all(n.id.startswith("f") for n in found[1:])
    exact = np.argsort(-(index.embeddings[40:] @ l2_normalize(base)[0]))[:2]
    assert [n.id for n in found[1:]] == [f"f{i}" for i in exact]


def easy_set(n=400, dim=32, queries=20, seed=0):
    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.normal(size=(n, dim)))
    picked = rng.choice(n, queries, replace=False)
    q = l2_normalize(x[picked] + 0.02 * rng.normal(size=(queries, dim)))
    return x, [f"id{i}" for i in range(n)], q, [f"id{i}" for i in picked]


@pytest.mark.parametrize("settings", [{"kind": "flat"}, {"kind": "ivf", "nlist": 16, "nprobe": 4},
                                      {"kind": "hnsw", "hnsw_m": 16, "ef_search": 32}])
def test_each_index_kind_finds_the_exact_neighbour_and_survives_save_and_load(settings, tmp_path):
    x, ids, q, expected = easy_set()
    index = CaptionIndex(x, ids, [f"caption {i}" for i in ids], settings=settings, meta={"note": "test"})
    found = index.search(q, k=3)
    assert [f[0].id for f in found] == expected
    assert all(len(f) == 3 and f[0].score > f[1].score >= f[2].score for f in found)

    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "embeddings.safetensors", "entries.jsonl", "index.faiss", "meta.json"]
    loaded = CaptionIndex.load(tmp_path / "index")
    again = loaded.search(q, k=3)
    assert [[(n.id, n.score) for n in f] for f in again] == [[(n.id, n.score) for n in f] for f in found]
    assert np.array_equal(loaded.embeddings, index.embeddings) and loaded.captions == index.captions
    assert loaded.settings == index.settings and loaded.meta == {"note": "test"}
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert (meta["count"], meta["dim"], meta["index"]["kind"]) == (400, 32, settings["kind"])


def test_equally_similar_entries_come_in_the_index_order_for_every_k():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(40, 8)))
    x[5:27] = x[5]  # 22 copies of one image, each with its own caption: faiss returns such ties in varying order
    index = CaptionIndex(x, [f"id{i}" for i in range(40)], [f"caption {i}" for i in range(40)])
    query = l2_normalize(x[5:6] + 0.01 * rng.normal(size=(1, 8)))
    for k in (1, 2, 3, 12, 25):
        found = index.search(query, k=k)[0]
        # numpy oracle: a stable sort of the similarities, most similar first
        order = np.argsort(-(x @ query[0]).astype(np.float32), kind="stable")[:k]
        assert [n.position for n in found] == order.tolist() == list(range(5, 5 + min(k, 22))) + \
            order.tolist()[22:], k


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="L2-normalised"):
        CaptionIndex(np.ones((2, 2), np.float32), ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="unique"):
        CaptionIndex(l2_normalize(np.ones((2, 2))), ["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="nlist=9 clusters"):
        CaptionIndex(l2_normalize(np.eye(4)), list("abcd"), list("wxyz"), settings={"kind": "ivf", "nlist": 9})
    with pytest.raises(ValueError, match="index kind must be one of"):
        small_index(kind="lsh")
    with pytest.raises(ValueError, match=r"queries must be \[Q, 2\]"):
        small_index().search(np.ones((1, 3), np.float32), k=1)
    small_index().save(tmp_path / "index")
    small_index().save(tmp_path / "index")  # an earlier index is replaced
    (tmp_path / "index" / "entries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="entries.jsonl is missing"):
        CaptionIndex.load(tmp_path / "index")


def _write_png(path, array):
    Image.fromarray(array).convert("RGB").save(path)
    return str(path)


def planted_search(tmp_path, encoder):
    """Real images (scikit-image's samples), one of them the query, plus a slightly noised copy of the query and
    an exact copy under another name: the noised copy must rank first, the query and its exact copy left out."""
    names = ["camera", "coins", "moon", "astronaut", "coffee", "chelsea", "brick", "grass", "gravel", "rocket",
             "page", "text", "clock", "immunohistochemistry", "cell"]
    paths = {n: _write_png(tmp_path / f"{n}.png", getattr(skimage.data, n)()) for n in names}
    camera = skimage.data.camera().astype(np.float32)
    noisy = np.clip(camera + np.random.default_rng(0).normal(0, 6, camera.shape), 0, 255).astype(np.uint8)
    paths["camera_noisy"] = _write_png(tmp_path / "camera_noisy.png", noisy)
    paths["camera_copy"] = _write_png(tmp_path / "camera_copy.png", skimage.data.camera())
    embedder = ImageEmbedder(encoder, torch.device("cpu"))
    vectors = embedder.embed_samples([{"id": n, "images": [p]} for n, p in paths.items()], batch_size=6)
    assert vectors.shape == (17, encoder.embed_dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    index = CaptionIndex(vectors, list(paths), [f"a picture of {n}" for n in paths], [[p] for p in paths.values()])

    query = embedder.embed_samples([{"id": "camera", "images": [paths["camera"]]}])
    found = index.search(query, k=3, query_ids=["camera"], query_images=[[paths["camera"]]])[0]
    assert found[0].id == "camera_noisy" and found[0].score > 0.9
    assert not {"camera", "camera_copy"} & {n.id for n in found}
    assert found[0].score > found[1].score + 0.1  # clearly apart from the unrelated images
    kept = index.search(query, k=3, exclude_self=False, exclude_identical=False)[0]
    assert {kept[0].id, kept[1].id} == {"camera", "camera_copy"} and kept[0].score == pytest.approx(1, abs=1e-5)


def test_a_noised_copy_of_the_query_is_its_nearest_image(tmp_path):
    torch.manual_seed(0)
    planted_search(tmp_path, tiny_efficientnet())  # random weights, 64 px


@pytest.mark.slow
def test_a_noised_copy_of_the_query_is_its_nearest_image_with_real_weights(tmp_path):
    planted_search(tmp_path, efficientnet_lite0(grid=4))  # the packaged ImageNet EfficientNet-Lite0, 224 px


def test_embedder_sources_rebuild_the_trained_encoder(tmp_path):
    torch.manual_seed(1)
    model = tiny_demo()
    with torch.no_grad():
        for p in model.vision.encoder.parameters():
            p.mul_(1.05)  # "trained": unlike any freshly built encoder
    save_checkpoint(model, tmp_path / "ckpt")
    images = torch.rand(2, 3, 64, 64)
    expected = l2_normalize(model.vision.encoder.eval()(images).mean(1).detach().numpy())
    for source in (retrieval_source({"_component_": "medcap.models.builders.tiny_demo"}, None, tmp_path / "ckpt"),
                   retrieval_source(None, {"_component_": "medcap.models.encoders.tiny_efficientnet"},
                                    tmp_path / "ckpt")):
        embedder = embedder_from_source(source, torch.device("cpu"), torch.float32)
        assert np.allclose(embedder.embed_images([images[:1], images[1:]]), expected, atol=1e-5)
    assert source["checkpoint"] == str((tmp_path / "ckpt").resolve())
    # a sample's images are averaged before normalising
    both = embedder.embed_images([images])[0]
    pooled = model.vision.encoder(images).mean(1).mean(0).detach().numpy()
    assert np.allclose(both, pooled / np.linalg.norm(pooled), atol=1e-5)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0, n_train=16, n_val=8, n_test=8)
    return out


def tiny_build_index(demo_data, out, *extra):
    cli.run_recipe("build_index", "demo/build_index", [
        f"output_dir={out}", "checkpoint=null", "model._component_=medcap.models.builders.tiny_demo",
        "~model.max_seq_len", "~model.image_grid", f"dataset.manifest={demo_data / 'train.jsonl'}", *extra])


def test_build_index_refuses_a_folder_holding_anything_else(demo_data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000480").mkdir(parents=True)
    (run / "predictions.csv").write_text("ID,caption\n")
    with pytest.raises(ValueError, match=f"{run} holds checkpoints, predictions.csv: an index is written as a "
                                         f"whole folder, which would delete them"):
        tiny_build_index(demo_data, run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "predictions.csv"]
    with pytest.raises(ValueError, match="holds checkpoints, predictions.csv"):
        small_index().save(run)


def test_build_index_and_nearest_caption_recipes(demo_data, tmp_path):
    tiny_build_index(demo_data, tmp_path / "index")
    index = CaptionIndex.load(tmp_path / "index")
    train = [json.loads(line) for line in (demo_data / "train.jsonl").read_text().splitlines()]
    assert index.ids == [r["id"] for r in train] and index.captions == [r["caption"] for r in train]
    assert index.meta["source"]["model"]["_component_"] == "medcap.models.builders.tiny_demo"
    assert index.meta["dataset"] == str(demo_data / "train.jsonl")

    # the training split against its own index: every image's own entry is left out
    out = tmp_path / "nearest"
    cli.run_recipe("nearest_caption", "demo/nearest_caption", [
        f"index_dir={tmp_path / 'index'}", f"output_dir={out}", f"dataset.manifest={demo_data / 'train.jsonl'}"])
    with (out / "neighbours.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == index.ids and all(r["ID"] != r["neighbour_ID"] for r in rows)
    assert {r["rank"] for r in rows} == {"1"}
    with (out / "predictions.csv").open() as f:
        predictions = {r["ID"]: r["caption"] for r in csv.DictReader(f)}
    captions = dict(zip(index.ids, index.captions))
    assert all(predictions[r["ID"]] == captions[r["neighbour_ID"]] for r in rows)
    # and the same neighbours as a search over the saved embeddings
    expected = index.search(index.embeddings, 1, index.ids, index.images)
    assert [r["neighbour_ID"] for r in rows] == [f[0].id for f in expected]

    cli.run_recipe("nearest_caption", "demo/nearest_caption", [
        f"index_dir={tmp_path / 'index'}", f"output_dir={out}", f"dataset.manifest={demo_data / 'test.jsonl'}",
        "threshold=1.01", "fallback_caption=none found"])
    with (out / "predictions.csv").open() as f:
        assert {r["caption"] for r in csv.DictReader(f)} == {"none found"}
    test_ids = [json.loads(line)["id"] for line in (demo_data / "test.jsonl").read_text().splitlines()]
    assert (out / "neighbours.csv").read_text().splitlines() == (
        ["ID,rank,neighbour_ID,similarity"] + [f"{i},0,," for i in test_ids])


def test_neighbours_csv_has_a_rank_0_row_for_a_query_without_neighbours(tmp_path):
    path = tmp_path / "neighbours.csv"
    found = [[Neighbour("t1", "c", [], 0.9, 0), Neighbour("t2", "c", [], 0.5, 1)], [],
             [Neighbour("t3", "c", [], 0.25, 2)]]
    write_neighbours_csv(path, ["q1", "q2", "q3"], found)
    assert path.read_text().splitlines() == ["ID,rank,neighbour_ID,similarity", "q1,1,t1,0.900000",
                                             "q1,2,t2,0.500000", "q2,0,,", "q3,1,t3,0.250000"]


def test_a_failed_neighbours_csv_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "neighbours.csv"
    write_neighbours_csv(path, ["q1", "q2"], [[Neighbour("t1", "c", [], 0.9, 0)], [Neighbour("t2", "c", [], 0.8, 1)]])
    before = path.read_text()
    broken = [[Neighbour("t1", "c", [], 0.7, 0)], [Neighbour("t2", "c", [], None, 1)]]  # fails on the second query
    with pytest.raises(TypeError):
        write_neighbours_csv(path, ["q1", "q2"], broken)
    assert path.read_text() == before


def test_index_load_errors_name_the_folder_the_id_and_the_row(tmp_path):
    CaptionIndex(l2_normalize(np.eye(3)), ["a", "b", "c"], ["x", "y", "z"]).save(tmp_path / "dup")
    entries = tmp_path / "dup" / "entries.jsonl"
    entries.write_text(entries.read_text().replace('"id": "c"', '"id": "a"'))
    with pytest.raises(ValueError, match=r"dup/entries\.jsonl: line 3: duplicate ID 'a'"):
        CaptionIndex.load(tmp_path / "dup")
    with pytest.raises(ValueError, match=r"index ids must be unique: 'b' appears twice"):
        CaptionIndex(l2_normalize(np.eye(3)), ["a", "b", "b"], ["x", "y", "z"])

    CaptionIndex(l2_normalize(np.eye(3)), ["a", "b", "c"], ["x", "y", "z"]).save(tmp_path / "norm")
    embeddings = np.eye(3, dtype=np.float32)
    embeddings[1:] *= 2
    save_numpy({"embeddings": embeddings}, str(tmp_path / "norm" / "embeddings.safetensors"))
    with pytest.raises(ValueError, match=r"norm: index embeddings must be L2-normalised .*: row 1 \(ID 'b'\) has "
                                         r"norm 2\.0000"):
        CaptionIndex.load(tmp_path / "norm")


def trained_tiny_checkpoint(path):
    """A tiny_demo checkpoint whose weights come from the file, not from the dtype it is built in."""
    torch.manual_seed(3)
    return save_checkpoint(tiny_demo(projector="mlp2"), path)


def test_queries_are_embedded_in_the_dtype_the_index_was_built_in(demo_data, tmp_path):
    checkpoint = trained_tiny_checkpoint(tmp_path / "ckpt")
    tiny_build_index(demo_data, tmp_path / "index", "dtype=bf16", f"checkpoint={checkpoint}")
    meta_file = tmp_path / "index" / "meta.json"

    def self_neighbours(*overrides):
        """IDs that are their own nearest neighbour when the training images are searched in their own index,
        left out only as identical embeddings."""
        out = tmp_path / "nearest"
        cli.run_recipe("nearest_caption", "demo/nearest_caption", [
            f"index_dir={tmp_path / 'index'}", f"output_dir={out}", f"dataset.manifest={demo_data / 'train.jsonl'}",
            "exclude_self=false", *overrides])
        with (out / "neighbours.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 16
        return [r["ID"] for r in rows if r["ID"] == r["neighbour_ID"]]

    # embedded in fp32 (this run's dtype) a query would differ from its bf16 entry by about 1e-3
    assert self_neighbours("dtype=fp32") == []
    meta = json.loads(meta_file.read_text())
    assert (meta["dtype"], meta["source"]["checkpoint"]) == ("bfloat16", str(checkpoint.resolve()))
    del meta["dtype"]  # an index built before the dtype was recorded: queries in the run's dtype
    meta_file.write_text(json.dumps(meta))
    assert self_neighbours("dtype=bf16") == []
    meta_file.write_text(json.dumps({**meta, "dtype": "fp8"}))
    with pytest.raises(ValueError, match=r"index/meta\.json: field 'dtype' must be one of .*, found 'fp8'"):
        self_neighbours("dtype=fp32")
