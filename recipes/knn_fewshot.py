"""kNN few-shot captioning (the AUEB ImageCLEF 2024 recipe): for each image of ``dataset``, its ``k`` most
similar images in a retrieval index (``medcap run build_index``) become in-context examples, then the model
captions the image. Writes ``predictions.csv`` (``ID,caption``) and ``neighbours.csv`` (the examples used).

    medcap run knn_fewshot --config demo/knn_fewshot
    medcap run knn_fewshot --config demo/knn_fewshot mode=captions k=5 threshold=0.5

``mode``:
- ``turns``: each neighbour is an earlier exchange of the chat: user = its image + the prompt, assistant = its
  caption; the query image + the prompt come last. The model sees k + 1 images per query.
- ``captions``: only the neighbours' captions, listed in the prompt text (``captions_template``,
  ``caption_line``), with the query image.

Neighbours leave out the query itself and repeated captions (``exclude_self``, ``exclude_identical``,
``dedupe_captions``) and those below ``threshold`` (cosine); an image left with none gets ``fallback_prompt``
(null: the plain prompt). ``nearest_first: false`` puts the most similar example last, next to the query
(neighbours.csv lists them nearest first all the same, rank 0 for an image without any). The query images are
embedded with the encoder the index names, in the dtype the index was embedded in; when that is this config's
model + checkpoint in this run's dtype, its vision encoder is reused. ``clean_captions: aueb`` applies AUEB's
clean-up to the captions (``medcap.retrieval.aueb_caption_cleanup``); the raw ones then go to
``raw_predictions.csv``. Decoding keys are those of ``generate``.

    medcap run knn_fewshot --config aueb/knn_fewshot model_dir=DIR data_dir=DIR index_dir=INDEX
"""

import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchtune import config, training
from tqdm import tqdm

from medcap.atomic import remove_earlier
from medcap.data.dataset import collate_captions
from medcap.data.images import load_image
from medcap.generation import generate_batch
from medcap.metrics import write_csv_predictions
from medcap.retrieval import (CAPTION_LINE, CAPTIONS_TEMPLATE, CLEANUPS, META_FILE, CaptionIndex, ImageEmbedder,
                              embedding_dtype, fewshot_prompt, index_embedder, retrieval_source, search_options,
                              write_neighbours_csv)
from medcap.runtime import caption_dataset, decoding_settings, device_and_dtype, log, setup_model_and_tokenizer
from medcap.command import run_command


class FewShotPrompts(Dataset):
    """One item per query: prompt ids with its examples, and the images in placeholder order (the examples'
    first in ``turns`` mode, then the query's)."""

    def __init__(self, samples, neighbours, tokenizer, transform, image_tokens, prompt: str, mode: str,
                 system: str | None, captions_template: str, caption_line: str, max_len: int,
                 fallback_prompt: str | None = None):
        self.samples, self.neighbours, self.transform, self.mode = samples, neighbours, transform, mode
        self.prompts = []
        for s, found in zip(samples, neighbours):
            text = fallback_prompt if fallback_prompt and not found else s["prompt"] or prompt
            ids = fewshot_prompt(tokenizer, text, [n.caption for n in found],
                                 [image_tokens(n.images, f"neighbour {n.id!r} of sample {s['id']!r}") for n in found],
                                 image_tokens(s["images"], f"sample {s['id']!r}"), mode, system, captions_template,
                                 caption_line)
            if len(ids) > max_len:
                raise ValueError(f"{s['source']}: sample {s['id']!r}: the prompt with {len(found)} examples needs "
                                 f"{len(ids)} tokens, more than the model's max_seq_len less max_new_tokens "
                                 f"({max_len}); lower k or use mode=captions")
            self.prompts.append(ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        paths = [p for n in self.neighbours[index] for p in n.images] if self.mode == "turns" else []
        paths += s["images"]
        try:
            images = torch.stack([self.transform(load_image(p)) for p in paths])
        except (OSError, ValueError) as e:
            raise ValueError(f"{s['source']}: sample {s['id']!r}: field {s['image_field']!r} (or a neighbour's "
                             f"image): {e}") from None
        return {"id": s["id"], "tokens": self.prompts[index], "images": images}


def query_embedder(index: CaptionIndex, cfg: DictConfig, model, device, dtype) -> ImageEmbedder:
    source = index.meta.get("source")
    if (source is not None and source == retrieval_source(cfg.model, None, cfg.get("checkpoint"), cfg.seed)
            and embedding_dtype(index.meta, dtype, Path(cfg.index_dir) / META_FILE) == dtype):
        return ImageEmbedder(model.vision.encoder, device, source)  # the captioner's own trained encoder
    return index_embedder(index, cfg.index_dir, device, dtype, cfg.get("trusted_components") or ())


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="knn_fewshot", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=cfg.get("checkpoint"))
    model.eval()
    index = CaptionIndex.load(cfg.index_dir)
    dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=False)
    samples = dataset.samples[:cfg.max_samples] if cfg.get("max_samples") else dataset.samples

    embedder = query_embedder(index, cfg, model, device, dtype)
    neighbours = index.search_samples(embedder, samples, cfg.k, cfg.batch_size, cfg.get("num_workers", 0),
                                      **search_options(cfg))
    # neighbours.csv keeps the search order (rank 1 = nearest); only the prompts may show it reversed
    examples = neighbours if cfg.get("nearest_first", True) else [found[::-1] for found in neighbours]

    views, per_image = model.views_per_block, model.tokens_per_image

    def image_tokens(paths: list[str], what: str) -> int:
        if len(paths) % views:
            raise ValueError(f"{what}: {len(paths)} images do not form blocks of views_per_block={views}")
        return per_image * len(paths) // views

    settings = decoding_settings(cfg)
    cleanup = cfg.get("clean_captions")
    if cleanup is not None and cleanup not in CLEANUPS:
        raise ValueError(f"clean_captions must be null or one of {sorted(CLEANUPS)}, got {cleanup!r}")
    prompts = FewShotPrompts(samples, examples, tokenizer, dataset.transform, image_tokens, dataset.prompt,
                             cfg.get("mode", "turns"), dataset.system, cfg.get("captions_template", CAPTIONS_TEMPLATE),
                             cfg.get("caption_line", CAPTION_LINE),
                             max_len=model.decoder.max_seq_len - settings["max_new_tokens"],
                             fallback_prompt=cfg.get("fallback_prompt"))
    loader = DataLoader(prompts, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.get("num_workers", 0),
                        collate_fn=partial(collate_captions, pad_id=tokenizer.pad_id, padding_side="left"))
    predictions, n_tokens, t0 = {}, 0, time.perf_counter()
    for batch_index, batch in enumerate(tqdm(loader, desc="knn_fewshot", unit="batch", dynamic_ncols=True)):
        outputs = generate_batch(model, tokenizer, batch, dtype, seed=cfg.seed + batch_index, **settings)
        predictions.update((i, tokenizer.decode(out).strip()) for i, out in zip(batch["ids"], outputs))
        n_tokens += sum(len(out) for out in outputs)
    seconds = time.perf_counter() - t0

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cleanup is not None:
        write_csv_predictions(out / "raw_predictions.csv", predictions)
        predictions = {i: CLEANUPS[cleanup](caption) for i, caption in predictions.items()}
    for path in remove_earlier([out / "raw_predictions.csv"] if cleanup is None else []):
        log.info(f"removed the earlier run's {path} (this one cleans no captions)")
    write_csv_predictions(out / "predictions.csv", predictions)
    write_neighbours_csv(out / "neighbours.csv", [s["id"] for s in samples], neighbours)
    shots = sum(len(found) for found in neighbours) / max(len(samples), 1)
    without = sum(not found for found in neighbours)
    log.info(f"{len(predictions)} captions ({shots:.2f} examples each, {without} without any, mode "
             f"{cfg.get('mode', 'turns')}), {n_tokens} tokens in {seconds:.1f} s -> {out / 'predictions.csv'}")


if __name__ == "__main__":
    sys.exit(run_command(main))
