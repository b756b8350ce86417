"""Validation during training: the loss on the validation set, and captions generated for a subset of it scored
with the evaluation presets (e.g. R2GenGPT's checkpoint choice, 0.5 * BLEU-4 + 0.5 * CIDEr)."""

from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from medcap import distributed
from medcap.generation import generate_batch
from medcap.metrics import evaluate as score_captions
from medcap.runtime import DECODING_DEFAULTS, OPTIONAL_DECODING_KEYS, SAMPLING_KEYS, caption_loader
from medcap.text import IGNORE_INDEX
from medcap.training import caption_loss, model_inputs


class RankBatches(Sampler[list[int]]):
    """This rank's share of the batches of a data set read in order (batch ``i`` goes to rank ``i % world``),
    topped up with repeats of batch 0 so that every rank runs the same number of forward passes (FSDP's
    collectives need that); only the first ``real`` batches count."""

    def __init__(self, num_samples: int, batch_size: int, max_batches: int | None = None):
        batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
        batches = batches[:max_batches] if max_batches is not None else batches
        world, rank = distributed.world_size(), distributed.rank()
        mine = batches[rank::world]
        per_rank = -(-len(batches) // world)
        self.real = len(mine)
        self.batches = mine + batches[:1] * (per_rank - len(mine))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rank_loader(dataset, tokenizer, batch_size: int, max_batches: int | None = None, num_workers: int = 0,
                padding_side: str = "right") -> DataLoader:
    return caption_loader(dataset, tokenizer, batch_size, num_workers,
                          batch_sampler=RankBatches(len(dataset), batch_size, max_batches), padding_side=padding_side)


@torch.no_grad()
def validation_loss(model, loader, device, dtype, max_batches: int | None = None) -> float:
    """Cross-entropy per caption token over the (first ``max_batches``) validation batches, summed over ranks
    when the loader deals them out (``rank_loader``)."""
    model.eval()
    real = getattr(loader.batch_sampler, "real", None)
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if real is None and max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        loss = caption_loss(model, model_inputs(batch, device, dtype), labels, reduction="sum").item()
        if real is None or i < real:  # the top-up batches only keep the ranks in step
            total += loss
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    total, count = distributed.all_reduce_sum(total, device), distributed.all_reduce_sum(count, device)
    return total / max(count, 1)

EDIT_DISTANCE = "EditDistance"  # a val_generation.weights key (lower is better: select_mode min)


def normalized_edit_distance(prediction: str, reference: str) -> float:
    """Character Levenshtein distance / the longer string's length (AUEB's early-stopping criterion; 0 for two
    empty strings)."""
    if len(prediction) < len(reference):
        prediction, reference = reference, prediction
    if not prediction:
        return 0.0
    row = list(range(len(reference) + 1))
    for i, a in enumerate(prediction, 1):
        previous, row[0] = row[0], i
        for j, b in enumerate(reference, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (a != b))
    return row[-1] / len(prediction)


def weighted_score(corpus: dict[str, float], weights: dict[str, float]) -> float:
    missing = sorted(set(weights) - set(corpus))
    if missing:
        raise KeyError(f"val_generation.weights names {missing}, which the preset does not compute; it gives "
                       f"{sorted(corpus)}")
    return sum(w * corpus[name] for name, w in weights.items())


def validation_decoding(node) -> dict[str, Any]:
    """The decoding keys of ``runtime.DECODING_DEFAULTS`` (and ``OPTIONAL_DECODING_KEYS``) a
    ``val_generation`` node sets; the others keep ``generate``'s defaults (greedy). Validation captions are not
    sampled: a node asking for sampling is refused."""
    sampling = [key for key in SAMPLING_KEYS if node.get(key)]
    if sampling:
        raise ValueError(f"val_generation sets {sampling}: validation captions are decoded greedily or by beam "
                         f"search (num_beams), not sampled; remove {sampling[0]}")
    keys = [key for key in DECODING_DEFAULTS if key not in SAMPLING_KEYS] + list(OPTIONAL_DECODING_KEYS)
    return {key: node[key] for key in keys if node.get(key) is not None}


@torch.no_grad()
def generation_figures(model, tokenizer, dataset, *, weights: dict[str, float], num_samples: int | None,
                       max_new_tokens: int, batch_size: int, dtype, preset: str = "coco",
                       meteor: bool = False, fraction: float | None = None,
                       decoding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Captions for the first ``num_samples`` (or the first ``fraction``, rounded down, as Lightning's
    ``limit_val_batches: 0.5``) of ``dataset`` (built with ``with_captions=False``), scored against their captions:
    ``val_score`` (the weighted sum) and each weighted metric as ``val_<metric>``; the preset's metrics and
    ``EditDistance`` (mean ``normalized_edit_distance``) can be weighted. Greedy unless ``decoding`` holds other
    keyword arguments of ``medcap.generation.generate`` (R2GenGPT validated with its test-time beam search).
    Under torchrun each rank generates its share of the batches (``RankBatches``) and rank 0 scores them all."""
    model.eval()
    count = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"val_generation.fraction must be in (0, 1], got {fraction}")
        count = min(count, max(1, int(len(dataset) * fraction)))
    indices = list(range(count))
    loader = rank_loader(Subset(dataset, indices), tokenizer, batch_size, padding_side="left")
    predictions = {}
    for i, batch in enumerate(loader):
        outputs = generate_batch(model, tokenizer, batch, dtype, max_new_tokens=max_new_tokens, **(decoding or {}))
        if i < loader.batch_sampler.real:
            predictions.update({sample_id: tokenizer.decode(ids).strip()
                                for sample_id, ids in zip(batch["ids"], outputs)})
    predictions = {k: v for part in distributed.gather_objects(predictions) for k, v in part.items()}
    if not distributed.is_rank_zero():
        return distributed.broadcast_object(None)
    references = {dataset.samples[i]["id"]: dataset.samples[i]["caption"] for i in indices}
    kwargs = {"meteor": meteor} if preset == "coco" else {"bertscore": False}
    corpus = score_captions(predictions, references, preset=preset, **kwargs).corpus
    if EDIT_DISTANCE in weights:
        corpus[EDIT_DISTANCE] = sum(normalized_edit_distance(predictions[k], references[k]) for k in references
                                    ) / max(len(references), 1)
    figures = {"val_score": weighted_score(corpus, weights), **{f"val_{name}": corpus[name] for name in weights}}
    return distributed.broadcast_object(figures)
