"""Set-up steps every recipe shares: device and dtype, tokenizer + model (+ trained parts), data loaders."""

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer

from medcap import distributed
from medcap.checkpoint import describe, load_checkpoint, read_metadata, resolve_checkpoint
from medcap.data.dataset import CaptionDataset, collate_captions, count_truncated, image_transform
from medcap.models import import_medcap, import_r2gengpt
from medcap.models.llm_weights import check_dtype_runs, deferred_weights
from medcap.precision import check_master_dtype, check_training_dtype, keep_trained_parts_in, master_dtype

log = utils.get_logger("INFO")


# medcap.generation.generate's decoding keywords a recipe config may set beside max_new_tokens, with its defaults
DECODING_DEFAULTS = dict(temperature=0.0, top_k=None, top_p=None, use_cache=True, num_beams=1, length_penalty=1.0,
                         repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, penalize_prompt=True)
SAMPLING_KEYS = ("temperature", "top_k", "top_p")
# keywords passed only where a config sets them: beam search's length convention, CPU weight packing
OPTIONAL_DECODING_KEYS = ("length_normalization", "pack_weights")


def decoding_settings(cfg: DictConfig) -> dict:
    """The keyword arguments of medcap.generation.generate from a recipe config's decoding keys
    (``OPTIONAL_DECODING_KEYS`` only where the config sets them)."""
    settings = {"max_new_tokens": cfg.max_new_tokens, **{k: cfg.get(k, d) for k, d in DECODING_DEFAULTS.items()}}
    for key in OPTIONAL_DECODING_KEYS:
        if cfg.get(key) is not None:
            settings[key] = cfg[key]
    return settings


def device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    name = str(cfg.get("device", "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but torch sees no working CUDA device (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda or 'none'}); pass device=cpu to run on the CPU")
    device = utils.get_device(name)
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    check_dtype_runs(dtype, device)  # one line before any weights are read, not a kernel error mid-step
    return device, dtype


def _check_pair(model, tokenizer) -> None:
    if model.image_token_id != tokenizer.image_token_id:
        raise ValueError(f"model and tokenizer disagree on the image placeholder id: model "
                         f"{model.image_token_id}, tokenizer {tokenizer.image_token_id}; pair a model builder "
                         f"with the tokenizer of its LLM family")


def model_node_for(cfg_model: DictConfig, checkpoint: str | Path) -> DictConfig:
    """``cfg_model`` with the adapter settings of a LoRA run's checkpoint (read as data from its metadata), so
    that generating from it needs no overrides: parts the run trained with LoRA / QLoRA get adapters of the
    run's rank, alpha and targets. A config that already sets a different mode for such a part keeps it, and
    loading then says which override to use."""
    if import_medcap.is_seed_checkpoint(checkpoint):  # the seed's .pt holds no adapters
        return cfg_model
    if import_r2gengpt.is_r2gengpt_checkpoint(checkpoint):  # what it trained, read from its tensors and options
        return import_r2gengpt.model_node(cfg_model, checkpoint)
    meta = read_metadata(resolve_checkpoint(checkpoint))
    adapted = {part: mode for part, mode in meta["trainable"].items() if mode in ("lora", "qlora")}
    if not adapted:
        return cfg_model
    node = OmegaConf.create(OmegaConf.to_container(cfg_model, resolve=True))
    trainable = OmegaConf.to_container(node.get("trainable") or OmegaConf.create({}))
    lora = OmegaConf.to_container(node.get("lora") or OmegaConf.create({}))
    for part, mode in adapted.items():
        if trainable.get(part, "frozen") in ("frozen", mode):
            trainable[part] = mode
            settings = meta["lora"].get(part) or {}
            lora[part] = {k: settings[k] for k in ("rank", "alpha", "dropout", "targets") if k in settings}
    node.trainable, node.lora = trainable, lora
    log.info(f"adapters as the run trained them: trainable={trainable} lora={lora}")
    return node


def setup_model_and_tokenizer(cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                              checkpoint: str | Path | None = None):
    """Instantiate ``cfg.tokenizer`` and ``cfg.model`` (built directly in ``dtype``; adapters as the checkpoint's
    run trained them), check that both agree on the image placeholder id, and load trained parts from
    ``checkpoint`` if given. For inference; training builds through ``setup_training_model``."""
    tokenizer = config.instantiate(cfg.tokenizer)
    node = model_node_for(cfg.model, checkpoint) if checkpoint else cfg.model
    with training.set_default_dtype(dtype):
        model = config.instantiate(node)
    _check_pair(model, tokenizer)
    if checkpoint:
        log.info(f"loaded trained parts from {describe(load_checkpoint(model, checkpoint))}")
    return model.to(device), tokenizer


def setup_training_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                         checkpoint: str | Path | None = None):
    """The model to train and its tokenizer: trained parts kept in ``master_dtype`` (fp32 by default) next to
    the frozen weights in ``dtype``, its decoder layers compiled if ``compile`` (torchtune's per-layer
    ``compile_model``: parameter names unchanged), activation checkpointing if enabled, and under torchrun sharded
    with FSDP2.

    Under torchrun the weights are read once, by rank 0: it builds the model on its CPU (LLM, vision tower,
    ``checkpoint``'s trained parts); every rank builds the same model on the meta device without reading any
    weights, shards it, and receives its shards from rank 0 tensor by tensor (QLoRA's NF4 quantisation happens
    after that, on the device). Host memory per rank other than 0 stays near the size of its shards."""
    check_training_dtype(dtype)
    master = master_dtype(cfg.get("master_dtype"))
    check_master_dtype(master, dtype)  # before any weights are read
    world = distributed.world_size()
    tokenizer = config.instantiate(cfg.tokenizer)
    # the trained parts are cast to their master dtype before a checkpoint is loaded into them: loaded into the
    # bf16 model first, an fp32 checkpoint would be rounded to bf16 and a resumed run would not continue exactly
    if world == 1:
        with training.set_default_dtype(dtype):
            model = config.instantiate(cfg.model)
        keep_trained_parts_in(model, master, dtype)
        if checkpoint:
            log.info(f"loaded trained parts from {describe(load_checkpoint(model, checkpoint))}")
        model = model.to(device)
    else:
        source = None
        if distributed.is_rank_zero():
            node = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
            if (node.get("trainable") or {}).get("decoder") == "qlora":
                node.trainable.decoder = "lora"  # the same names, whole weights: NF4 after sharding
            with training.set_default_dtype(dtype):
                source = config.instantiate(node)
            keep_trained_parts_in(source, master, dtype)
            if checkpoint:
                log.info(f"loaded trained parts from {describe(load_checkpoint(source, checkpoint))}")
        with training.set_default_dtype(dtype), torch.device("meta"), deferred_weights():
            model = config.instantiate(cfg.model)
        keep_trained_parts_in(model, master, dtype)
    _check_pair(model, tokenizer)
    if cfg.get("compile", False):
        training.compile_model(model, verbose=distributed.is_rank_zero())
    if cfg.get("enable_activation_checkpointing", False):
        training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    if world > 1:
        distributed.shard(model, device)
        distributed.load_from_rank0(model, source, device)
        del source
        training.validate_no_params_on_meta_device(model)
    return model, tokenizer


def caption_dataset(node: DictConfig, tokenizer, model, with_captions: bool = True) -> CaptionDataset:
    return config.instantiate(node, tokenizer=tokenizer, tokens_per_image=model.tokens_per_image,
                              views_per_block=model.views_per_block,
                              transform=image_transform(model.vision.encoder), with_captions=with_captions)


def warn_truncated(dataset: CaptionDataset, what: str, device: torch.device) -> None:
    """Logs how many of ``dataset``'s captions are cut to fit ``max_seq_len`` or ``max_answer_tokens``, before
    training starts: a cut caption trains on its first part only. Each rank counts its share of the samples."""
    share = dataset.samples[distributed.rank()::distributed.world_size()]
    cut = int(distributed.all_reduce_sum(count_truncated(dataset, share), device))
    if cut and distributed.is_rank_zero():
        limits = f"max_seq_len={dataset.max_seq_len}" + (f" / max_answer_tokens={dataset.max_answer_tokens}"
                                                         if dataset.max_answer_tokens else "")
        log.warning(f"{what}: {cut} of {len(dataset.samples)} captions are cut to fit {limits} (the prompt and the "
                    f"image tokens are never cut; `medcap run prepare_data` shows caption lengths)")


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
