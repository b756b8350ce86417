"""LM-Fuser training: a text LM learns to write the gold caption from the captions several runs wrote for the same
image. ``candidates`` lists the runs' ``ID,caption`` CSVs on the validation split (same IDs in every file; the
order of the list is the order of the captions in the prompt, and ``fuse`` must list the test runs in the same
order); ``references`` holds the gold captions (CSV or JSONL manifest). The loss covers the target caption only.
The LM is a decoder (``medcap.fuser.TextLM``: ``max_seq_len`` bounds prompt + caption) or an encoder-decoder
(``medcap.seq2seq.hf_seq2seq_lm``, Flan-T5 as AUEB: ``max_seq_len`` bounds the source and the target each);
the samples it cut are logged as a warning.

    medcap run train_fuser --config demo/train_fuser [key=value ...]
    medcap run train_fuser --config aueb/train_fuser fuser_dir=DIR data_dir=DIR candidates=[A.csv,B.csv,C.csv]

The shared training core does the loop (medcap.training.train): AdamW, the configured schedule, gradient
accumulation and clipping, checkpoints of the whole LM in safetensors (with ``config.yaml``, whose prompt
strings ``fuse`` can take), exact resume (``resume_from=auto``). ``epochs`` (when set) fixes ``max_steps`` from
the training set's size. ``holdout`` IDs are kept out of training for a validation loss. One process.
"""

import sys
from functools import partial
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config, training

from medcap import runs
from medcap.fuser import (FuserDataset, merge_runs, prompt_settings, split_ids, text_lm_and_tokenizer,
                          truncation_warnings)
from medcap.metrics import read_references
from medcap.precision import check_master_dtype, check_training_dtype, keep_trained_parts_in, master_dtype
from medcap.runtime import caption_loader, device_and_dtype, log
from medcap.training import ResumableBatchSampler, TrainSettings, plot_loss, train
from medcap.validation import validation_loss
from medcap.command import run_command


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="train_fuser", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the prompt as used, defaults filled in, goes into the checkpoints' config.yaml (fuse may read it)
    prompt = prompt_settings(cfg.get("prompt"), "train_fuser config")
    cfg.prompt = prompt

    check_training_dtype(dtype)
    master = master_dtype(cfg.get("master_dtype"))
    check_master_dtype(master, dtype)  # before any weights are read
    # what decides the samples and their order besides runs.RESUME_KEYS: a resumed run's batches must be the same
    run_id, resume = runs.start(cfg, output_dir, data_keys=("candidates", "holdout", "max_seq_len", "prompt"))
    model, tokenizer = text_lm_and_tokenizer(cfg, device, dtype, checkpoint=resume or cfg.get("init_from"))
    keep_trained_parts_in(model, master, dtype)

    ids, candidates = merge_runs(list(cfg.candidates))
    references = read_references(cfg.references)
    train_ids, held_ids = split_ids(ids, cfg.get("holdout", 0), cfg.seed)
    data = partial(FuserDataset, tokenizer, candidates, references, cfg.max_seq_len,
                   instruction=prompt["instruction"], system=prompt["system"], references_file=cfg.references,
                   template=prompt["template"], candidate_line=prompt["candidate_line"], separator=prompt["separator"])
    train_set = data(ids=train_ids)
    held_set = data(ids=held_ids) if held_ids else None
    samples = train_set.samples + (held_set.samples if held_set is not None else [])
    for line in truncation_warnings(samples, cfg.max_seq_len):  # fuse reads every candidate: say what was cut
        log.warning(line)
    evaluate = None
    if held_set is not None:
        val_loader = caption_loader(held_set, tokenizer, cfg.batch_size)
        evaluate = lambda: {"val_loss": validation_loss(model, val_loader, device, dtype)}  # noqa: E731

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: model.trainable is frozen")
    accum = cfg.get("gradient_accumulation_steps", 1)
    per_epoch = len(train_set) // cfg.batch_size
    if cfg.get("epochs"):  # AUEB trained its fuser for 4 epochs
        cfg.max_steps = max(1, cfg.epochs * per_epoch // accum)
    elif not cfg.get("max_steps"):
        raise ValueError("set max_steps, or epochs to derive it from the training set's size")
    optimizer = config.instantiate(cfg.optimizer, params)
    scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=cfg.max_steps)
    data = runs.data_fingerprint([[s["id"], s["tokens"], s["labels"]] for s in train_set.samples])
    start_step, history = 0, []
    if resume:
        start_step, history = runs.restore(resume, optimizer, scheduler, data=data)

    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed, start=start_step * accum)
    batches = iter(caption_loader(train_set, tokenizer, cfg.batch_size, batch_sampler=sampler))
    epochs = cfg.max_steps * accum / sampler.per_epoch
    log.info(f"{len(train_set)} training samples from {len(cfg.candidates)} runs ({len(held_ids)} IDs held out); "
             f"{cfg.max_steps} steps = {epochs:.1f} epochs; trainable {sum(p.numel() for p in params):,} parameters")

    settings = TrainSettings(max_steps=cfg.max_steps, gradient_accumulation_steps=accum,
                             clip_grad_norm=cfg.get("clip_grad_norm"),
                             eval_every=cfg.get("eval_every") if evaluate else None,
                             save_every=cfg.get("save_every"), log_every=cfg.get("log_every", 1))
    # `metric_logger=null` on the command line sets metric_logger._component_ to null (torchtune's override rule)
    logger_node = cfg.get("metric_logger")
    metric_logger = config.instantiate(logger_node) if logger_node and logger_node.get("_component_") else None
    summary = train(model, optimizer, scheduler, batches, settings, output_dir=output_dir, device=device, dtype=dtype,
                    evaluate=evaluate, metric_logger=metric_logger, cfg=cfg, start_step=start_step, history=history,
                    run_id=run_id, data=data)
    if metric_logger is not None:
        metric_logger.close()
    plot_loss(summary["history"], output_dir / "loss_curve.png")
    log.info(f"done: mean step {summary['mean_step_time_s'] or 0:.2f} s, peak memory "
             f"{summary['peak_memory_mb']:.0f} MB; checkpoints in {output_dir / 'checkpoints'}")


if __name__ == "__main__":
    sys.exit(run_command(main))
