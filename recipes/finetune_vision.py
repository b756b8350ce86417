"""Frozen-LLM vision finetuning (medcap's method): the LLM stays frozen, the vision encoder and/or the projector
train on image-caption pairs. Which parts train is ``model.trainable`` in the config.

    medcap run finetune_vision --config demo/finetune_vision [key=value ...]
"""

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, training
from torchtune.modules import TransformerSelfAttentionLayer

from medcap.checkpoint import load_training_state, resolve_checkpoint, set_rng_state
from medcap.runtime import caption_dataset, caption_loader, device_and_dtype, log, setup_model_and_tokenizer
from medcap.training import ResumableBatchSampler, TrainSettings, plot_loss, train


def param_groups(model, base_lr: float, lr_per_part: dict[str, float]) -> list[dict]:
    """One optimizer group per trained part, each with its own learning rate if ``lr_per_part`` names it."""
    groups = []
    for part, module in model.parts().items():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr_per_part.get(part, base_lr), "name": part})
    if not groups:
        raise ValueError("nothing to train: every part in model.trainable is frozen")
    return groups


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="finetune_vision", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Resume: the newest checkpoint under resume_from (or output_dir/checkpoints with resume_from=auto).
    resume = cfg.get("resume_from")
    if resume == "auto":
        candidates = output_dir / "checkpoints"
        resume = candidates if any(candidates.glob("step_*/model.safetensors")) else None
    init = resolve_checkpoint(resume) if resume else cfg.get("init_from")
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=init)
    if cfg.get("enable_activation_checkpointing", False):
        training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})

    train_set = caption_dataset(cfg.dataset, tokenizer, model)
    val_loader = None
    # `val_dataset=null` on the command line sets val_dataset._component_ to null (torchtune's override rule)
    if cfg.get("val_dataset") and cfg.val_dataset.get("_component_"):
        val_loader = caption_loader(caption_dataset(cfg.val_dataset, tokenizer, model), tokenizer,
                                    cfg.batch_size, cfg.get("num_workers", 0))

    optimizer = config.instantiate(cfg.optimizer, param_groups(model, cfg.optimizer.lr, cfg.get("lr_per_part") or {}))
    scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=cfg.max_steps)
    start_step, history = 0, []
    if resume:
        state = load_training_state(resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, history = state["step"], json.loads(state["history"])
        log.info(f"resuming from {resume} at step {start_step}")

    accum = cfg.get("gradient_accumulation_steps", 1)
    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed, start=start_step * accum,
                                    shuffle=cfg.get("shuffle", True))
    batches = iter(caption_loader(train_set, tokenizer, cfg.batch_size, cfg.get("num_workers", 0), sampler))
    metric_logger = config.instantiate(cfg.metric_logger) if cfg.get("metric_logger") else None
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{len(train_set)} training samples; trainable {n_trainable:,} of "
             f"{sum(p.numel() for p in model.parameters()):,} parameters ({dict(model.trainable)})")

    settings = TrainSettings(
        max_steps=cfg.max_steps,
        gradient_accumulation_steps=accum,
        clip_grad_norm=cfg.get("clip_grad_norm"),
        eval_every=cfg.get("eval_every"),
        eval_max_batches=cfg.get("eval_max_batches"),
        save_every=cfg.get("save_every"),
        log_every=cfg.get("log_every", 1),
    )
    summary = train(model, optimizer, scheduler, batches, settings, output_dir=output_dir, device=device,
                    dtype=dtype, val_loader=val_loader, metric_logger=metric_logger, cfg=cfg,
                    start_step=start_step, history=history)
    if metric_logger is not None:
        metric_logger.close()
    plot_loss(summary["history"], output_dir / "loss_curve.png")
    log.info(f"done: mean step {summary['mean_step_time_s'] or 0:.2f} s, peak memory "
             f"{summary['peak_memory_mb']:.0f} MB; checkpoints in {output_dir / 'checkpoints'}")


if __name__ == "__main__":
    sys.exit(main())
