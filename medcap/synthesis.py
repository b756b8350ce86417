"""The Synthesizer (AUEB, ImageCLEFmedical 2024): a text LLM rewrites one run's draft caption with the captions of
the image's nearest training neighbours in view.

Neighbours are searched in a retrieval index (``medcap run build_index``; ``search_neighbours``), or read from a
file with one entry per query image, nearest first:

- JSONL, one line per query: ``{"id": "<query ID>", "neighbours": [<neighbour>, ...]}`` where a neighbour is a
  caption string or an object with ``caption`` (``id`` and ``score`` may be there too), or with ``id`` only when
  the captions come from the index (``index_dir``). The synthesize recipe writes this file (neighbours.jsonl).
- CSV, one row per neighbour, ``rank`` 1 = nearest: ``ID,rank,caption``, or ``ID,rank,neighbour_ID`` with the
  captions from the index (the ``neighbours.csv`` that ``knn_fewshot`` writes). A query without neighbours has one
  row of rank 0 with an empty caption / neighbour_ID. Extra columns are ignored; every row has the header's
  number of fields (quote a caption holding a comma).
"""

import json
from pathlib import Path

from medcap.metrics.io import csv_rows, field_count_error, iter_jsonl, read_text

DEFAULT_INSTRUCTION = ("Improve the draft caption of a medical image. Reply with one short sentence that names "
                       "the imaging modality, the body part and the significant findings. The captions of "
                       "similar images are examples of the expected style; keep only the facts that fit the "
                       "draft.")
DEFAULT_TEMPLATE = "{instruction}\n\nCaptions of similar images:\n{neighbours}\n\nDraft caption: {draft}"


class _Captions:
    """Captions of the index entries, read the first time a neighbour is given by ID only."""

    def __init__(self, path: Path, index_dir: str | Path | None):
        self.path, self.index_dir, self.by_id = path, index_dir, None

    def __call__(self, neighbour_id: str, where: str) -> str:
        if self.index_dir is None:
            raise ValueError(f"{self.path}: {where}: neighbour {neighbour_id!r} has no caption; set index_dir to the "
                             f"retrieval index the neighbours came from")
        if self.by_id is None:
            from medcap.retrieval import CaptionIndex

            index = CaptionIndex.load(self.index_dir)
            self.by_id = dict(zip(index.ids, index.captions))
        if neighbour_id not in self.by_id:
            raise ValueError(f"{self.path}: {where}: neighbour ID {neighbour_id!r} is not in the index "
                             f"{self.index_dir}")
        return self.by_id[neighbour_id]


def _neighbour_caption(item, captions: _Captions, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("caption"), str):
        return item["caption"]
    if isinstance(item, dict) and "caption" not in item and isinstance(item.get("id"), str):
        return captions(item["id"], where)
    raise ValueError(f"{captions.path}: {where}: expected a caption string or an object with field 'caption' "
                     f"(or 'id'), found {json.dumps(item)[:80]}")


def _read_jsonl(path: Path, captions: _Captions) -> dict[str, list[str]]:
    neighbours: dict[str, list[str]] = {}
    for line_no, sample_id, row in iter_jsonl(path):
        items = row.get("neighbours")
        if not isinstance(items, list):
            raise ValueError(f"{path}: line {line_no}: sample {sample_id!r}: field 'neighbours' must be a list")
        if sample_id in neighbours:
            raise ValueError(f"{path}: line {line_no}: duplicate ID {sample_id!r}")
        neighbours[sample_id] = [
            _neighbour_caption(item, captions, f"line {line_no}: sample {sample_id!r}: neighbour {rank}")
            for rank, item in enumerate(items, 1)]
    return neighbours


def _read_csv(path: Path, captions: _Captions) -> dict[str, list[str]]:
    rows = csv_rows(path, read_text(path))
    _, header = next(rows, (1, []))
    fields = [name.strip() for name in header]
    text_column = "caption" if "caption" in fields else "neighbour_ID" if "neighbour_ID" in fields else None
    if "ID" not in fields or "rank" not in fields or text_column is None:
        raise ValueError(f"{path}: line 1: expected columns ID,rank,caption or ID,rank,neighbour_ID, found {fields}")
    ranked: dict[str, dict[int, str | None]] = {}
    for line, values in rows:
        if len(values) != len(header):
            raise ValueError(field_count_error(path, line, values, header))
        row = dict(zip(fields, values))
        sample_id = row["ID"].strip()
        if not sample_id:
            raise ValueError(f"{path}: line {line}: field 'ID' is empty")
        where = f"{path}: line {line}: sample {sample_id!r}"
        try:
            rank = int(row["rank"])
        except ValueError:
            rank = None
        if rank is None or rank < 0:
            raise ValueError(f"{where}: field 'rank' must be an integer >= 0, found {row['rank']!r}")
        by_rank = ranked.setdefault(sample_id, {})
        if rank in by_rank:
            raise ValueError(f"{where}: rank {rank} appears twice")
        if 0 in by_rank or (rank == 0 and by_rank):
            raise ValueError(f"{where}: rank 0 (no neighbours) and rank {rank or max(by_rank)} for the same ID")
        value = row[text_column]
        if rank == 0:  # a query without neighbours, as write_neighbours_csv records it
            if value.strip():
                raise ValueError(f"{where}: rank 0 (no neighbours) with {text_column} {value!r}")
            by_rank[0] = None
        else:
            by_rank[rank] = value if text_column == "caption" else \
                captions(value.strip(), f"line {line}: sample {sample_id!r}")
    return {i: [by_rank[r] for r in sorted(by_rank) if r] for i, by_rank in ranked.items()}


def read_neighbours(path: str | Path, index_dir: str | Path | None = None) -> dict[str, list[str]]:
    """{query ID: neighbour captions, nearest first} from a ``.jsonl`` or ``.csv`` file (formats: see above);
    neighbours given by ID take their captions from the retrieval index in ``index_dir``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"neighbours file not found: {path}")
    captions = _Captions(path, index_dir)
    if path.suffix == ".csv":
        return _read_csv(path, captions)
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, captions)
    raise ValueError(f"{path}: expected a .jsonl or .csv neighbours file")


def search_neighbours(index_dir: str | Path, samples: list[dict], k: int, device, dtype, batch_size: int = 32,
                      trusted_components: list[str] | tuple = (), **options) -> dict[str, list[dict]]:
    """{query ID: up to ``k`` neighbours as ``{"id", "caption", "score"}``, nearest first}: the query samples'
    images (``samples`` of a CaptionDataset) embedded with the encoder the index names, then searched;
    ``options``: ``CaptionIndex.search``'s (exclude_self, exclude_identical, dedupe_captions, threshold)."""
    from medcap.retrieval import CaptionIndex, index_embedder

    index = CaptionIndex.load(index_dir)
    embedder = index_embedder(index, index_dir, device, dtype, trusted_components)
    found = index.search_samples(embedder, samples, k, batch_size, **options)
    return {s["id"]: [{"id": n.id, "caption": n.caption, "score": round(n.score, 6)} for n in row]
            for s, row in zip(samples, found)}


DEFAULT_NEIGHBOUR_LINE = "{rank}. {caption}"


def check_template(template: str, draft_turn: bool = False, fallback: bool = False) -> None:
    """A template must show the neighbours (a ``fallback`` template, used without any, need not) and the draft,
    unless the draft comes in a turn of its own (``draft_turn``)."""
    fields = ([] if fallback else ["{neighbours}"]) + ([] if draft_turn else ["{draft}"])
    for field in fields:
        if field not in template:
            kind = "fallback template" if fallback else "template"
            raise ValueError(f"the synthesis {kind} must contain {field}; got {template!r}")


def synthesis_prompt(draft: str, neighbours: list[str], num_neighbours: int,
                     instruction: str = DEFAULT_INSTRUCTION, template: str = DEFAULT_TEMPLATE,
                     neighbour_line: str = DEFAULT_NEIGHBOUR_LINE, image: str = "",
                     fallback: str | None = None, draft_turn: bool = False) -> str:
    """The user text: ``template`` with ``{instruction}``, ``{neighbours}`` (the first ``num_neighbours``
    neighbour captions, one ``neighbour_line`` each, ``{rank}`` from 1, joined by newlines), ``{draft}`` and
    ``{image}`` (the image's ID). ``fallback`` is the template for an image without neighbours (AUEB's prompt
    then asks for the caption without a neighbouring one). Whitespace runs inside captions become single spaces."""
    shown = neighbours[:num_neighbours]
    if not shown and fallback is not None:
        template = fallback
    else:
        check_template(template, draft_turn)
    listed = "\n".join(neighbour_line.format(rank=n, caption=" ".join(c.split())) for n, c in enumerate(shown, 1))
    return template.format(instruction=instruction.strip(), neighbours=listed, draft=" ".join(draft.split()),
                           image=image)


def synthesis_prompt_ids(tokenizer, text: str, draft: str, system: str | None = None,
                         draft_turn: bool = False) -> list[int]:
    """The chat prompt: one user turn with ``text``, or with ``draft_turn`` (AUEB) the draft caption as a user
    turn of its own before it (Llama 3 chat format only)."""
    if not draft_turn:
        return tokenizer.prompt_ids(text, 0, system)
    from medcap.text.llama import Llama3ChatTokenizer, llama3_user_turns_ids

    if not isinstance(tokenizer, Llama3ChatTokenizer):
        raise ValueError(f"draft_turn=true (the draft as a user turn of its own) is written for the Llama 3 chat "
                         f"format; the tokenizer is {type(tokenizer).__name__}")
    return llama3_user_turns_ids(tokenizer, [" ".join(draft.split()), text], system)


def clean_output(text: str, first_line_only: bool = True) -> str:
    """The caption in an LLM's reply: its first non-empty line (with ``first_line_only``), without a leading
    ``Caption:`` label or surrounding quotes."""
    text = text.strip()
    if first_line_only:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    for label in ("improved caption:", "caption:"):
        if text.lower().startswith(label):
            text = text[len(label):].strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
