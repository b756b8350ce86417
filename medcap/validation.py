"""Validation during training: the loss on the validation set, and captions generated for a subset of it scored
with the evaluation presets (e.g. R2GenGPT's checkpoint choice, 0.5 * BLEU-4 + 0.5 * CIDEr)."""

from typing import Any

import torch
from torch.utils.data import Subset

from medcap.generation import generate_batch
from medcap.metrics import evaluate as score_captions
from medcap.runtime import caption_loader
from medcap.text import IGNORE_INDEX
from medcap.training import caption_loss, model_inputs


@torch.no_grad()
def validation_loss(model, loader, device, dtype, max_batches: int | None = None) -> float:
    """Cross-entropy per caption token over the (first ``max_batches``) validation batches."""
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        total += caption_loss(model(**model_inputs(batch, device, dtype)), labels, reduction="sum").item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
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


@torch.no_grad()
def generation_figures(model, tokenizer, dataset, *, weights: dict[str, float], num_samples: int | None,
                       max_new_tokens: int, batch_size: int, dtype, preset: str = "coco",
                       meteor: bool = False) -> dict[str, Any]:
    """Greedy captions for the first ``num_samples`` of ``dataset`` (built with ``with_captions=False``), scored
    against their captions: ``val_score`` (the weighted sum) and each weighted metric as ``val_<metric>``; the
    preset's metrics and ``EditDistance`` (mean ``normalized_edit_distance``) can be weighted.
    Under FSDP every rank generates the same captions, so all ranks run the same number of forward passes."""
    model.eval()
    indices = range(len(dataset) if num_samples is None else min(num_samples, len(dataset)))
    loader = caption_loader(Subset(dataset, list(indices)), tokenizer, batch_size, padding_side="left")
    predictions = {}
    for batch in loader:
        outputs = generate_batch(model, tokenizer, batch, dtype, max_new_tokens=max_new_tokens)
        predictions.update({sample_id: tokenizer.decode(ids).strip() for sample_id, ids in zip(batch["ids"], outputs)})
    references = {dataset.samples[i]["id"]: dataset.samples[i]["caption"] for i in indices}
    kwargs = {"meteor": meteor} if preset == "coco" else {"bertscore": False}
    corpus = score_captions(predictions, references, preset=preset, **kwargs).corpus
    if EDIT_DISTANCE in weights:
        corpus[EDIT_DISTANCE] = sum(normalized_edit_distance(predictions[k], references[k]) for k in references
                                    ) / max(len(references), 1)
    return {"val_score": weighted_score(corpus, weights), **{f"val_{name}": corpus[name] for name in weights}}
