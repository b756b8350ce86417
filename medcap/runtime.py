"""Set-up steps every recipe shares: device and dtype, tokenizer + model (+ trained parts), data loaders."""

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, training, utils

from medcap.checkpoint import load_checkpoint
from medcap.data.dataset import CaptionDataset, collate_captions, image_transform
from medcap.models.llm_weights import check_dtype_runs

log = utils.get_logger("INFO")


def decoding_settings(cfg: DictConfig) -> dict:
    """The keyword arguments of medcap.generation.generate from a recipe config's decoding keys."""
    return dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.get("temperature", 0.0), top_k=cfg.get("top_k"),
        top_p=cfg.get("top_p"), use_cache=cfg.get("use_cache", True), num_beams=cfg.get("num_beams", 1),
        length_penalty=cfg.get("length_penalty", 1.0), repetition_penalty=cfg.get("repetition_penalty", 1.0),
        no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0), min_new_tokens=cfg.get("min_new_tokens", 0),
        penalize_prompt=cfg.get("penalize_prompt", True),
    )


def device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    check_dtype_runs(dtype, device)  # one line before any weights are read, not a kernel error mid-step
    return device, dtype


def setup_model_and_tokenizer(cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                              checkpoint: str | Path | None = None):
    """Instantiate ``cfg.tokenizer`` and ``cfg.model`` (built directly in ``dtype``), check that both agree on
    the image placeholder id, and load trained parts from ``checkpoint`` if given."""
    tokenizer = config.instantiate(cfg.tokenizer)
    with training.set_default_dtype(dtype):
        model = config.instantiate(cfg.model)
    if model.image_token_id != tokenizer.image_token_id:
        raise ValueError(f"model and tokenizer disagree on the image placeholder id: model "
                         f"{model.image_token_id}, tokenizer {tokenizer.image_token_id}; pair a model builder "
                         f"with the tokenizer of its LLM family")
    if checkpoint:
        loaded = load_checkpoint(model, checkpoint)
        log.info(f"loaded trained parts from {loaded}")
    return model.to(device), tokenizer


def caption_dataset(node: DictConfig, tokenizer, model, with_captions: bool = True) -> CaptionDataset:
    return config.instantiate(node, tokenizer=tokenizer, tokens_per_image=model.tokens_per_image,
                              views_per_block=model.views_per_block,
                              transform=image_transform(model.vision.encoder), with_captions=with_captions)


def caption_loader(dataset: CaptionDataset, tokenizer, batch_size: int, num_workers: int = 0,
                   batch_sampler=None, padding_side: str = "right") -> DataLoader:
    collate = partial(collate_captions, pad_id=tokenizer.pad_id, padding_side=padding_side)
    # An own generator: starting an iterator draws a seed from it, which would otherwise shift the global RNG
    # (dropout masks) and make a resumed run differ from an uninterrupted one.
    generator = torch.Generator().manual_seed(0)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                          generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      generator=generator)
