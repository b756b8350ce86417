"""Training for every method; they differ in what trains, which the config sets per part (``model.trainable``:
encoder / projector / decoder each ``frozen``, ``full``, ``lora`` or, for the decoder, ``qlora``; ``model.lora``:
rank, alpha, dropout, target layers):

- medcap (configs/medcap, configs/demo): LLM frozen, vision encoder + projector trained;
- LLaVA SFT (configs/llava): stage 1 projector only; stage 2 projector + LLM with LoRA, QLoRA or in full,
  starting from stage 1 (``init_from``);
- R2GenGPT (configs/r2gengpt): shallow (mapper), delta (LoRA on the encoder's query/value + mapper), deep
  (encoder + mapper), LLM frozen.

    medcap run finetune --config demo/finetune_vision [key=value ...]
    medcap run finetune --nproc_per_node 8 --config llava/stage2_lora      # FSDP2 data parallel
"""

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training

from medcap import distributed, prompt_clusters, runs
from medcap.optim import OptimizerInBackward
from medcap.runtime import (caption_dataset, caption_loader, device_and_dtype, log, setup_training_model,
                            warn_truncated)
from medcap.training import ResumableBatchSampler, TrainSettings, l2_regularizer, plot_loss, train
from medcap.validation import generation_figures, rank_loader, validation_decoding, validation_loss
from medcap.command import run_command


def param_groups(model, base_lr: float, lr_per_part: dict[str, float]) -> list[dict]:
    """One optimizer group per trained part, each with its own learning rate if ``lr_per_part`` names it. A name
    that is not a part is an error, a part that does not train a warning: either would leave its rate unused."""
    unknown = sorted(set(lr_per_part) - set(model.parts()))
    if unknown:
        raise ValueError(f"lr_per_part: {unknown} not among the model's parts {sorted(model.parts())}")
    groups = []
    for part, module in model.parts().items():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr_per_part.get(part, base_lr), "name": part})
        elif part in lr_per_part:
            log.warning(f"lr_per_part.{part} is not used: the {part} is frozen (model.trainable.{part})")
    if not groups:
        raise ValueError("nothing to train: every part in model.trainable is frozen")
    return groups


@config.parse
def main(cfg: DictConfig) -> None:
    rank_device = distributed.init_from_env(cfg.get("device", "cpu"))
    if distributed.is_rank_zero():
        config.log_config(recipe_name="finetune", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    device = rank_device or device
    world = distributed.world_size()
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {cfg.max_steps}")

    # A new run refuses a folder holding another run's checkpoints (resume_from=auto continues it; overwrite=true
    # replaces it). init_from: trained parts of an earlier run (e.g. LLaVA stage 1's projector), without its
    # optimizer state.
    run_id, resume = runs.start(cfg, output_dir)
    model, tokenizer = setup_training_model(cfg, device, dtype, checkpoint=resume or cfg.get("init_from"))

    train_set = caption_dataset(cfg.dataset, tokenizer, model)
    # MeGPT's dynamic prompts: each image's prompt is its cluster's (medcap.prompt_clusters); the clustering is
    # saved in every checkpoint, for generation
    clusters = embedder = None
    if cfg.get("dynamic_prompts"):
        clusters, embedder = prompt_clusters.for_training(cfg, train_set, resume, device)
        model.checkpoint_writers = [clusters.save]

    warn_truncated(train_set, "training set", device)  # with each image's prompt

    cluster_of: dict[str, int] = {}  # validation sample id -> cluster: its images are embedded once

    def dataset(node, **kwargs):
        built = caption_dataset(node, tokenizer, model, **kwargs)
        if clusters is not None:
            ids = [sample["id"] for sample in built.samples]
            if all(i in cluster_of for i in ids):
                clusters.set_prompts(built, [cluster_of[i] for i in ids])
            else:
                cluster_of.update(zip(ids, clusters.apply(built, embedder).tolist()))
        return built

    evaluations = {}
    # `val_dataset=null` on the command line sets val_dataset._component_ to null (torchtune's override rule)
    if cfg.get("val_dataset") and cfg.val_dataset.get("_component_"):
        val_set = dataset(cfg.val_dataset)
        warn_truncated(val_set, "validation set", device)  # its loss is over the kept part of each caption
        val_loader = rank_loader(val_set, tokenizer, cfg.batch_size,
                                 cfg.get("eval_max_batches"), cfg.get("num_workers", 0))
        evaluations["val_loss"] = lambda: {"val_loss": validation_loss(model, val_loader, device, dtype)}
        gen = cfg.get("val_generation")
        if gen and gen.get("weights"):
            prompts, decoding = dataset(cfg.val_dataset, with_captions=False), validation_decoding(gen)
            evaluations["val_generation"] = lambda: generation_figures(
                model, tokenizer, prompts, weights=dict(gen.weights), num_samples=gen.get("num_samples"),
                max_new_tokens=gen.get("max_new_tokens", 64), batch_size=gen.get("batch_size", cfg.batch_size),
                dtype=dtype, preset=gen.get("preset", "coco"), meteor=gen.get("meteor", False),
                fraction=gen.get("fraction"), decoding=decoding)

    embedder = None  # the frozen feature encoder is no longer needed

    def evaluate() -> dict[str, float]:
        # compile=true compiles the decoder layers for the training step; evaluation (no gradients, decoding through
        # a KV cache) runs them eagerly rather than compiling them again for each of its shapes
        with torch.compiler.set_stance("force_eager"):
            return {k: v for run in evaluations.values() for k, v in run().items()}

    groups = param_groups(model, cfg.optimizer.lr, cfg.get("lr_per_part") or {})
    accum = cfg.get("gradient_accumulation_steps", 1)
    clip = cfg.get("clip_grad_norm")
    if cfg.get("optimizer_in_bwd", False):
        if accum > 1 or clip or world > 1 or cfg.get("l2_lambda"):
            raise ValueError("optimizer_in_bwd=true steps each parameter as soon as its gradient is ready: it needs "
                             "gradient_accumulation_steps=1, clip_grad_norm=null, a single process and no l2_lambda "
                             "(the L2 term's own backward would step every parameter a second time)")
        optimizer = OptimizerInBackward(groups, lambda group: config.instantiate(cfg.optimizer, group))
    else:
        optimizer = config.instantiate(cfg.optimizer, groups)
    scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=cfg.max_steps)
    optimizer_state = None
    if world > 1:  # rank 0 saves the whole optimizer state, gathered from the shards
        optimizer_state = lambda: training.get_full_optimizer_state_dict(model, optimizer, distributed.is_rank_zero())

    data = runs.data_fingerprint([[s["id"], s["caption"], s["prompt"], [Path(p).name for p in s["images"]]]
                                  for s in train_set.samples])
    start_step, history = 0, []
    if resume:
        load_sharded = None
        if world > 1:
            load_sharded = lambda state: training.load_from_full_optimizer_state_dict(  # noqa: E731
                model, optimizer, state, device)
        start_step, history = runs.restore(resume, optimizer, scheduler, load_sharded, data=data)

    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed, start=start_step * accum,
                                    shuffle=cfg.get("shuffle", True), rank=distributed.rank(), world_size=world)
    batches = iter(caption_loader(train_set, tokenizer, cfg.batch_size, cfg.get("num_workers", 0), sampler))
    metric_logger = None
    if cfg.get("metric_logger") and distributed.is_rank_zero():
        metric_logger = config.instantiate(cfg.metric_logger)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensors count in full
    log.info(f"{len(train_set)} training samples; {world} process(es); trainable {n_trainable:,} parameters "
             f"({dict(model.trainable)})")

    settings = TrainSettings(
        max_steps=cfg.max_steps,
        gradient_accumulation_steps=accum,
        clip_grad_norm=clip,
        eval_every=cfg.get("eval_every") if evaluations else None,
        save_every=cfg.get("save_every"),
        log_every=cfg.get("log_every", 1),
        select_metric=cfg.get("select_metric"),
        select_mode=cfg.get("select_mode", "max"),
        patience=cfg.get("patience"),
        # MeGPT's L2 regularisation over the trained parameters (l2_lambda: 0 / absent for none)
        regularizer=l2_regularizer([p for g in groups for p in g["params"]], cfg.l2_lambda)
        if cfg.get("l2_lambda") else None,
        pack_weights=cfg.get("pack_weights", True),
    )
    summary = train(model, optimizer, scheduler, batches, settings, output_dir=output_dir, device=device,
                    dtype=dtype, evaluate=evaluate, metric_logger=metric_logger, cfg=cfg,
                    start_step=start_step, history=history, optimizer_state=optimizer_state, run_id=run_id,
                    data=data)
    if metric_logger is not None:
        metric_logger.close()
    if distributed.is_rank_zero():
        plot_loss(summary["history"], output_dir / "loss_curve.png")
        log.info(f"done: mean step {summary['mean_step_time_s'] or 0:.2f} s, peak memory "
                 f"{summary['peak_memory_mb']:.0f} MB; checkpoints in {output_dir / 'checkpoints'}")
    distributed.destroy()


if __name__ == "__main__":
    sys.exit(run_command(main, distributed=True))
