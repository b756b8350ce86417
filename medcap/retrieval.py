"""Image retrieval for the kNN methods (nearest-caption baseline, kNN few-shot, synthesizer).

- ``ImageEmbedder``: an image encoder's tokens mean-pooled, averaged over a sample's images, L2-normalised, so
  that an inner product is a cosine similarity. ``embedder_from_source`` builds it from the vision encoder of a
  medcap model (+ checkpoint) or from any configured encoder module.
- ``CaptionIndex``: embeddings, ids, captions and image paths of a caption set, with a faiss index over the
  embeddings (``flat``: exact inner product; ``ivf`` and ``hnsw``: approximate, for large sets), saved to and
  loaded from a folder. ``search`` returns each query's k neighbours, leaving out the query image itself (same
  id, a shared image file, or an embedding identical to 1e-6), repeated captions and those under a similarity
  threshold. ``index_embedder`` rebuilds the index's encoder for the queries, in the dtype the index was embedded
  in (meta.json's ``dtype``), so that the query's own indexed copy comes out identical.
- ``fewshot_prompt``: a query's prompt with its neighbours as in-context examples, as earlier chat turns with
  their images (``turns``) or as a list of captions in the prompt text (``captions``).
- ``CaptionSets``: several caption data sets as one (AUEB searched train + valid); ``aueb_caption_cleanup``: the
  AUEB few-shot captions' clean-up.
"""

import csv
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.numpy import save_file as save_numpy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchtune import config, training, utils

from medcap.atomic import replaced_atomically
from medcap.models.tensor_files import read_json, read_safetensors
from medcap.safe_config import check_components
from medcap.checkpoint import WEIGHTS, load_checkpoint, resolve_checkpoint
from medcap.data.dataset import image_transform, load_sample_images

log = utils.get_logger("INFO")

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, EMBEDDINGS_FILE = "index.faiss", "embeddings.safetensors"
ENTRIES_FILE, META_FILE = "entries.jsonl", "meta.json"
EMBEDDING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                    "float64": torch.float64}  # meta.json's "dtype": what the index's encoder ran in
IDENTICAL_TOLERANCE = 1e-6  # largest coordinate difference of two embeddings taken for the same image
MODES = ("turns", "captions")
CAPTIONS_TEMPLATE = "Similar images were described as:\n{captions}\n{prompt}"
CAPTION_LINE = "{rank}. {caption}"


# ---------------------------------------------------------------------------------------------------- embeddings

def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("cannot normalise an all-zero embedding")
    return x / norms


class SampleImages(Dataset):
    """The images of each sample record (``medcap.data.records``), transformed and stacked [n_images, 3, H, W]."""

    def __init__(self, samples: list[dict[str, Any]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tensor:
        return load_sample_images(self.samples[index], self.transform)


class ImageEmbedder:
    """Embeds samples with ``encoder`` (``forward(images [B, 3, H, W]) -> [B, N, D]``, with ``image_size``,
    ``mean`` and ``std``): the N tokens are averaged, then a sample's images, then the result is L2-normalised.
    ``source`` describes where the encoder came from (saved in the index's meta.json)."""

    def __init__(self, encoder: nn.Module, device: torch.device, source: dict[str, Any] | None = None):
        for attribute in ("image_size", "mean", "std"):
            if not hasattr(encoder, attribute):
                raise ValueError(f"the retrieval encoder {type(encoder).__name__} has no {attribute!r}: it needs "
                                 f"image_size, mean and std (see medcap.models.encoders)")
        self.encoder = encoder.to(device).eval()
        self.device = device
        self.dtype = next(encoder.parameters()).dtype
        self.transform = image_transform(encoder)
        self.source = source or {}

    @torch.inference_mode()
    def embed_images(self, images: list[Tensor]) -> np.ndarray:
        """[len(images), D] float32, one row per sample from its images [n_i, 3, H, W]."""
        counts = [len(x) for x in images]
        tokens = self.encoder(torch.cat(images).to(self.device, self.dtype))  # [sum n_i, N, D]
        pooled = tokens.float().mean(dim=1)
        per_sample = torch.stack([chunk.mean(0) for chunk in pooled.split(counts)])
        return l2_normalize(per_sample.cpu().numpy())

    def embed_samples(self, samples: list[dict[str, Any]], batch_size: int = 32, num_workers: int = 0,
                      desc: str = "embed") -> np.ndarray:
        loader = DataLoader(SampleImages(samples, self.transform), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=list)
        rows, t0 = [], time.perf_counter()
        for batch in loader:
            rows.append(self.embed_images(batch))
        log.info(f"{desc}: {len(samples)} samples in {time.perf_counter() - t0:.1f} s")
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def retrieval_source(model_node=None, encoder_node=None, checkpoint: str | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Where retrieval embeddings come from, as saved in meta.json: ``encoder`` (any encoder module; a
    checkpoint's ``encoder.*`` weights are loaded into it) if given, else the vision encoder of ``model`` after
    loading ``checkpoint``. The checkpoint is resolved to its step folder, as an absolute path; ``seed`` is the
    torch seed set before building, so that weights no file provides come out the same when it is rebuilt."""
    if encoder_node is None and model_node is None:
        raise ValueError("set either model (its vision encoder embeds the images) or encoder")
    resolved = str(resolve_checkpoint(checkpoint).resolve()) if checkpoint else None
    if encoder_node is not None:
        return {"encoder": _plain(encoder_node), "checkpoint": resolved, "seed": seed}
    return {"model": _plain(model_node), "checkpoint": resolved, "seed": seed}


def _load_encoder_weights(encoder: nn.Module, checkpoint: str) -> None:
    path = Path(checkpoint) / WEIGHTS
    state = read_safetensors(path)
    weights = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not weights:
        log.warning(f"{path} holds no encoder weights (the encoder was frozen): the encoder is used as built")
        return
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: its encoder.* weights do not fit the configured encoder (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); a LoRA-trained encoder needs model: instead of encoder:")


def embedder_from_source(source: dict[str, Any], device: torch.device, dtype: torch.dtype,
                         read_from: str | Path | None = None, trusted: list[str] | tuple = ()) -> ImageEmbedder:
    """Builds the encoder ``retrieval_source`` describes, in ``dtype`` on ``device``. ``read_from``: the file the
    description was read from (an index's meta.json), whose components must be medcap's model builders or named
    in ``trusted``."""
    where = str(read_from or "retrieval source")
    if not isinstance(source, (dict, DictConfig)):
        raise ValueError(f"{where}: the source encoder must be a mapping, found {type(source).__name__}")
    for key in ("encoder", "model"):
        # a string would be parsed as YAML by OmegaConf.create below: a config node the check never saw
        if source.get(key) is not None and not isinstance(source[key], (dict, DictConfig)):
            raise ValueError(f"{where}: source.{key} must be a config mapping (_component_ and arguments), found "
                             f"{type(source[key]).__name__}")
    if read_from is not None:
        check_components({k: source.get(k) for k in ("encoder", "model")}, str(read_from), list(trusted))
    torch.manual_seed(source.get("seed", 0))
    with training.set_default_dtype(dtype):
        if source.get("encoder") is not None:
            encoder = config.instantiate(OmegaConf.create(source["encoder"]))
            if source.get("checkpoint"):
                _load_encoder_weights(encoder, source["checkpoint"])
        else:
            model = config.instantiate(OmegaConf.create(source["model"]))
            if source.get("checkpoint"):
                load_checkpoint(model, source["checkpoint"])
            encoder = model.vision.encoder
    return ImageEmbedder(encoder, device, source)


# --------------------------------------------------------------------------------------------------------- index

@dataclass
class Neighbour:
    id: str
    caption: str
    images: list[str]
    score: float  # cosine similarity to the query
    position: int  # row in the index


def build_faiss_index(embeddings: np.ndarray, kind: str = "flat", nlist: int = 64, nprobe: int = 8,
                      hnsw_m: int = 32, ef_search: int = 64) -> faiss.Index:
    """Inner-product index over ``embeddings`` [N, D] (normalised: inner product = cosine). ``ivf``: ``nlist``
    k-means clusters, ``nprobe`` of them searched per query; ``hnsw``: graph with ``hnsw_m`` links per node,
    ``ef_search`` candidates kept while searching."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        if not 1 <= nlist <= len(x):
            raise ValueError(f"ivf: nlist={nlist} clusters need 1 <= nlist <= the {len(x)} embeddings")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    index.add(x)
    return index


def _caption_key(caption: str) -> str:
    return " ".join(caption.split()).lower()


def check_index_folder(folder: str | Path) -> Path:
    """``folder`` when a new index may replace what it holds: nothing, or an earlier index's four files. Saving
    replaces the whole folder, so a folder with anything else (a run's checkpoints, predictions) is refused."""
    folder = Path(folder)
    if folder.is_dir():
        index_files = {INDEX_FILE, EMBEDDINGS_FILE, ENTRIES_FILE, META_FILE}
        other = sorted(p.name for p in folder.iterdir() if p.name not in index_files)
        if other:
            shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise ValueError(f"{folder} holds {shown}: an index is written as a whole folder, which would delete "
                             f"them; choose a new or empty output_dir (or one holding only an earlier index)")
    return folder


class CaptionIndex:
    """A caption set's embeddings [N, D] (L2-normalised), ids, captions and image paths, searchable with faiss.
    ``settings``: the index kind and its options (``build_faiss_index``); ``meta``: what produced it."""

    def __init__(self, embeddings: np.ndarray, ids: list[str], captions: list[str],
                 images: list[list[str]] | None = None,
                 settings: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                 index: faiss.Index | None = None):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or not (len(embeddings) == len(ids) == len(captions)):
            raise ValueError(f"embeddings {embeddings.shape}, {len(ids)} ids and {len(captions)} captions do not match")
        if len(set(ids)) != len(ids):
            counts = Counter(ids)
            duplicate = next(i for i in ids if counts[i] > 1)
            raise ValueError(f"index ids must be unique: {duplicate!r} appears twice")
        if not len(ids):
            raise ValueError("an index needs at least one entry")
        norms = np.linalg.norm(embeddings, axis=1)
        bad = np.flatnonzero(~np.isclose(norms, 1.0, atol=1e-4))
        if len(bad):
            raise ValueError(f"index embeddings must be L2-normalised (l2_normalize) so that inner product is cosine: "
                             f"row {bad[0]} (ID {ids[bad[0]]!r}) has norm {norms[bad[0]]:.4f}")
        self.embeddings, self.ids, self.captions = embeddings, list(ids), list(captions)
        self.images = [list(x) for x in images] if images is not None else [[] for _ in ids]
        self.settings = {"kind": "flat", **(settings or {})}
        self.meta = dict(meta or {})
        self.index = index if index is not None else build_faiss_index(embeddings, **self.settings)
        if self.index.ntotal != len(ids):
            raise ValueError(f"the faiss index holds {self.index.ntotal} vectors for {len(ids)} entries")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    # -- disk

    def save(self, folder: str | Path) -> Path:
        """Writes index.faiss, embeddings.safetensors, entries.jsonl (id, caption, images) and meta.json into a
        temporary folder renamed into place (an earlier index there is replaced whole; a folder holding anything
        else is refused: see ``check_index_folder``)."""
        folder = check_index_folder(folder)
        meta = {**self.meta, "count": len(self), "dim": self.dim, "index": self.settings,
                "similarity": "inner product of L2-normalised embeddings (cosine)"}
        with replaced_atomically(folder, folder=True) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            save_numpy({"embeddings": self.embeddings}, str(tmp / EMBEDDINGS_FILE))
            with (tmp / ENTRIES_FILE).open("w", encoding="utf-8") as f:
                for i, c, im in zip(self.ids, self.captions, self.images):
                    f.write(json.dumps({"id": i, "caption": c, "images": im}, ensure_ascii=False) + "\n")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionIndex":
        folder = Path(folder)
        for name in (INDEX_FILE, EMBEDDINGS_FILE, ENTRIES_FILE, META_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a caption index: {name} is missing "
                                        f"(build one with `medcap run build_index`)")
        meta = read_json(folder / META_FILE)
        embeddings = read_safetensors(folder / EMBEDDINGS_FILE, as_numpy=True)["embeddings"]
        ids, captions, images, lines = [], [], [], {}
        with (folder / ENTRIES_FILE).open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    ids.append(str(row["id"]))
                    captions.append(row["caption"])
                    images.append(row.get("images", []))
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{folder / ENTRIES_FILE}: line {line_no}: expected an object with id and "
                                     f"caption ({e})") from None
                if ids[-1] in lines:
                    raise ValueError(f"{folder / ENTRIES_FILE}: line {line_no}: duplicate ID {ids[-1]!r} (line "
                                     f"{lines[ids[-1]]} has it too)")
                lines[ids[-1]] = line_no
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as error:  # faiss' message names neither the file nor what is wrong in plain words
            raise ValueError(f"{folder / INDEX_FILE}: not a readable faiss index "
                             f"({str(error).strip().splitlines()[-1][:200]})") from None
        settings = meta.get("index", {"kind": "flat"})
        if settings.get("kind") == "ivf":  # the query-time options, as configured when it was built
            faiss.extract_index_ivf(index).nprobe = settings.get("nprobe", 8)
        elif settings.get("kind") == "hnsw":
            index.hnsw.efSearch = settings.get("ef_search", 64)
        if not (index.ntotal == len(embeddings) == len(ids)):
            raise ValueError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors, {EMBEDDINGS_FILE} "
                             f"{len(embeddings)} and {ENTRIES_FILE} {len(ids)} entries")
        meta = {k: v for k, v in meta.items() if k not in ("count", "dim", "index", "similarity")}
        try:
            return cls(embeddings, ids, captions, images, settings, meta, index)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None

    # -- queries

    def search_samples(self, embedder: ImageEmbedder, samples: list[dict[str, Any]], k: int, batch_size: int = 32,
                       num_workers: int = 0, **options) -> list[list[Neighbour]]:
        """``search`` for the images of ``samples`` (records of a CaptionDataset) embedded with ``embedder``, their
        ids and image files given so that a sample is never its own neighbour."""
        queries = embedder.embed_samples(samples, batch_size, num_workers, desc="embed queries")
        return self.search(queries, k, [s["id"] for s in samples], [s["images"] for s in samples], **options)

    def search(self, queries: np.ndarray, k: int, query_ids: list[str] | None = None,
               query_images: list[list[str]] | None = None, exclude_self: bool = True,
               exclude_identical: bool = True, dedupe_captions: bool = True,
               threshold: float | None = None) -> list[list[Neighbour]]:
        """Up to ``k`` neighbours per query (rows of ``queries``, L2-normalised), most similar first.

        Left out: with ``exclude_self``, entries with the query's id (``query_ids``) or sharing an image file
        with it (``query_images``); with ``exclude_identical``, entries whose embedding equals the query's to
        ``IDENTICAL_TOLERANCE`` (the same image under another id or path); with ``dedupe_captions``, an entry
        whose caption (case and spacing ignored) a more similar neighbour already has; with ``threshold``,
        entries whose cosine similarity is below it. Equally similar entries come in the index's order (faiss' own
        order of a tie changes with how many candidates it is asked for). Faiss is asked for more candidates until k
        are kept, and the k-th is not cut from its ties, or the index is exhausted."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}")
        n = len(queries)
        for name, values in (("query_ids", query_ids), ("query_images", query_images)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} items for {n} queries")
        own_files = [{str(Path(p).resolve()) for p in ims} for ims in query_images] if query_images else None
        entry_files = [{str(Path(p).resolve()) for p in ims} for ims in self.images] if own_files else None

        results: list[list[Neighbour] | None] = [None] * n
        pending, fetch = list(range(n)), min(len(self), 2 * k + 8)
        while pending:
            scores, positions = self.index.search(queries[pending], fetch)
            still = []
            for row, q in enumerate(pending):
                # pos -1: an approximate index found fewer than fetch candidates
                found = [(s, p) for s, p in zip(scores[row].tolist(), positions[row].tolist()) if p >= 0]
                kept, seen, exhausted = [], set(), fetch >= len(self) or len(found) < fetch
                least = min((s for s, _ in found), default=None)
                for score, pos in sorted(found, key=lambda sp: (-sp[0], sp[1])):
                    if threshold is not None and score < threshold:
                        exhausted = True  # the rest are less similar still
                        break
                    if exclude_self and query_ids is not None and self.ids[pos] == query_ids[q]:
                        continue
                    if exclude_self and own_files and own_files[q] & entry_files[pos]:
                        continue
                    if exclude_identical and np.abs(self.embeddings[pos] - queries[q]).max() <= IDENTICAL_TOLERANCE:
                        continue
                    key = _caption_key(self.captions[pos])
                    if dedupe_captions and key in seen:
                        continue
                    seen.add(key)
                    kept.append(Neighbour(self.ids[pos], self.captions[pos], self.images[pos], float(score), pos))
                    if len(kept) == k:
                        break
                # the k-th kept ties with the least similar candidate fetched: an earlier entry may tie beyond it
                cut_in_a_tie = len(kept) == k and kept[-1].score == least
                if exhausted or (len(kept) == k and not cut_in_a_tie):
                    results[q] = kept
                else:
                    still.append(q)
            pending, fetch = still, min(len(self), fetch * 2)
        return results


def write_neighbours_csv(path: str | Path, query_ids: list[str], neighbours: list[list[Neighbour]]) -> None:
    """``ID,rank,neighbour_ID,similarity``, one row per neighbour kept, in ``neighbours``' order (rank from 1); a
    query with none has one row of rank 0 with the other fields empty. Written to a temporary file renamed into
    place."""
    with replaced_atomically(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "rank", "neighbour_ID", "similarity"])
        for query_id, found in zip(query_ids, neighbours):
            writer.writerows([query_id, rank, n.id, f"{n.score:.6f}"] for rank, n in enumerate(found, 1))
            if not found:
                writer.writerow([query_id, 0, "", ""])


def embedding_dtype(meta: dict[str, Any], default: torch.dtype, where: str | Path = META_FILE) -> torch.dtype:
    """The dtype an index's images were embedded in (``dtype`` in its meta.json, ``where``), or ``default`` for an
    index built before it was recorded. Queries embedded in another dtype differ from an indexed copy of the same
    image by far more than ``IDENTICAL_TOLERANCE`` (about 1e-3 from bf16 to fp32)."""
    name = meta.get("dtype")
    if name is None:
        return default
    if not isinstance(name, str) or name not in EMBEDDING_DTYPES:
        raise ValueError(f"{where}: field 'dtype' must be one of {sorted(EMBEDDING_DTYPES)}, found {name!r}")
    return EMBEDDING_DTYPES[name]


def index_embedder(index: CaptionIndex, folder: str | Path, device: torch.device, dtype: torch.dtype,
                   trusted: list[str] | tuple = ()) -> ImageEmbedder:
    """The encoder that embedded ``index`` (loaded from ``folder``), rebuilt for its queries in the dtype the index
    was embedded in (``dtype`` when its meta.json does not say)."""
    meta_file = Path(folder) / META_FILE
    if index.meta.get("source") is None:
        raise ValueError(f"{folder}: meta.json names no source encoder; rebuild it with medcap run build_index")
    return embedder_from_source(index.meta["source"], device, embedding_dtype(index.meta, dtype, meta_file),
                                read_from=meta_file, trusted=trusted)


def search_options(cfg) -> dict[str, Any]:
    """``CaptionIndex.search``'s filters from a recipe config (defaults: leave out the query itself and repeated
    captions, no threshold)."""
    return dict(exclude_self=cfg.get("exclude_self", True), exclude_identical=cfg.get("exclude_identical", True),
                dedupe_captions=cfg.get("dedupe_captions", True), threshold=cfg.get("threshold"))


# ----------------------------------------------------------------------------------------------- few-shot prompts

def fewshot_prompt(tokenizer, prompt: str, neighbour_captions: list[str], neighbour_image_tokens: list[int],
                   query_image_tokens: int, mode: str = "turns", system: str | None = None,
                   captions_template: str = CAPTIONS_TEMPLATE, caption_line: str = CAPTION_LINE) -> list[int]:
    """Prompt ids for captioning a query image with its neighbours as examples, up to the assistant header.

    ``turns``: one exchange per neighbour (user: the neighbour's image placeholders + ``prompt``; assistant: its
    caption), then the query's placeholders + ``prompt``; the images go to the model in that order, neighbours
    first. ``captions``: one user turn, the query's placeholders + ``captions_template`` filled with
    ``{captions}`` (one ``caption_line`` per neighbour, ``{rank}`` from 1) and ``{prompt}``. Without neighbours
    both are the plain prompt."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(neighbour_captions) != len(neighbour_image_tokens):
        raise ValueError(f"{len(neighbour_captions)} neighbour captions for {len(neighbour_image_tokens)} "
                         f"neighbour image token counts")
    if not neighbour_captions:
        return tokenizer.prompt_ids(prompt, query_image_tokens, system)
    if mode == "captions":
        lines = "\n".join(caption_line.format(rank=i, caption=c.strip()) for i, c in enumerate(neighbour_captions, 1))
        return tokenizer.prompt_ids(captions_template.format(captions=lines, prompt=prompt), query_image_tokens,
                                    system)
    ids: list[int] = []
    for i, (caption, count) in enumerate(zip(neighbour_captions, neighbour_image_tokens)):
        user = tokenizer.prompt_ids(prompt, count, system) if i == 0 else tokenizer.followup_ids(prompt, count)
        ids += user + tokenizer.answer_ids(caption)
    return ids + tokenizer.followup_ids(prompt, query_image_tokens)


# ----------------------------------------------------------------------------------------------- AUEB's choices

class CaptionSets:
    """Several caption data sets as one, e.g. the train and valid splits that AUEB searched for neighbours:
    ``datasets`` are config nodes (``_component_`` + arguments) built here in order; ``samples`` are theirs
    concatenated. An ID in two of them is an error naming both."""

    def __init__(self, datasets: list):
        if not datasets:
            raise ValueError("CaptionSets needs at least one data set")
        sets = [config.instantiate(OmegaConf.create(node)) if isinstance(node, (dict, DictConfig)) else node
                for node in datasets]
        self.samples, seen = [], {}
        for dataset in sets:
            for sample in dataset.samples:
                if sample["id"] in seen:
                    raise ValueError(f"ID {sample['id']!r} is in {seen[sample['id']]} and in {dataset.name}")
                seen[sample["id"]] = dataset.name
                self.samples.append(sample)
        self.name = " + ".join(d.name for d in sets)


_LIST_MARKER = re.compile(r"\b(\d+\.|\w+\.)\s")
_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def aueb_caption_cleanup(text: str) -> str:
    """AUEB's clean-up of its few-shot captions, as its code does it: the text after the last ``ASSISTANT:``,
    every match of ``\\b(\\d+\\.|\\w+\\.)\\s`` removed (list markers such as ``1. ``, but the pattern also takes
    the word that ends each sentence followed by a space), then sentences (split after a period) that repeat an
    earlier one dropped, the rest joined by single spaces."""
    if "ASSISTANT:" in text:
        text = text.rsplit("ASSISTANT:", 1)[1]
    text = _LIST_MARKER.sub("", text.strip())
    kept: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if sentence not in kept:
            kept.append(sentence)
    return " ".join(kept)


CLEANUPS = {"aueb": aueb_caption_cleanup}
