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
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
