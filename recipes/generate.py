"""Caption generation: batched and KV-cached; greedy, top-k/top-p sampling or beam search (length penalty,
repetition penalty, no-repeat n-grams, min/max new tokens), stopping at the end of the turn. Writes
``output_dir/predictions.csv`` with columns ``ID,caption`` in the data set's order.

    medcap run generate --config demo/generate checkpoint=outputs/demo/train/checkpoints [key=value ...]
    medcap run generate --nproc_per_node 2 --config demo/generate ...   # each process generates a share

Under torchrun every process loads the model and generates every WORLD_SIZE-th batch; rank 0 gathers the
captions and writes the one CSV. A batch is the same batch wherever it runs, and sampling is seeded per batch
(seed + batch index), so the file equals the single-process one.
"""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config, training, utils
from tqdm import tqdm

from medcap import prompt_clusters
from medcap.command import run_command
from medcap.generation import generate_batch, rank_batches
from medcap.metrics import write_csv_predictions
from medcap.runtime import (caption_dataset, caption_loader, decoding_settings, device_and_dtype, log,
                            setup_model_and_tokenizer)


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="generate", cfg=cfg)
    # before the process group exists: torchtune adds the rank to the seed once it does, and every process must
    # build the same model (random parts included)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    distributed = training.is_distributed()
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        run(cfg, device, dtype)
    finally:
        if distributed:
            dist.destroy_process_group()


def run(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> None:
    world_size, rank = utils.get_world_size_and_rank()
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=cfg.get("checkpoint"))
    model.eval()
    dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=False)
    prompt_clusters.for_generation(cfg, dataset, device)  # MeGPT's per-image prompts, if the checkpoint has them
    batches = rank_batches(len(dataset), cfg.batch_size, world_size, rank)
    loader = caption_loader(dataset, tokenizer, cfg.batch_size, cfg.get("num_workers", 0),
                            batch_sampler=[indices for _, indices in batches], padding_side="left")
    settings = decoding_settings(cfg)

    done, n_tokens, t0 = [], 0, time.perf_counter()
    progress = tqdm(loader, desc="generate", unit="batch", dynamic_ncols=True, disable=rank != 0)
    for (batch_index, _), batch in zip(batches, progress):
        outputs = generate_batch(model, tokenizer, batch, dtype, seed=cfg.seed + batch_index, **settings)
        done.append((batch_index, [(i, tokenizer.decode(ids).strip()) for i, ids in zip(batch["ids"], outputs)]))
        n_tokens += sum(len(ids) for ids in outputs)
    seconds = time.perf_counter() - t0

    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object((done, n_tokens), gathered, dst=0)
        if rank != 0:
            return
        done = [item for part, _ in gathered for item in part]
        n_tokens = sum(count for _, count in gathered)
    predictions = {sample_id: caption for _, rows in sorted(done, key=lambda d: d[0]) for sample_id, caption in rows}

    out = Path(cfg.output_dir) / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv_predictions(out, predictions)
    processes = f" on {world_size} processes" if world_size > 1 else ""
    log.info(f"{len(predictions)} captions, {n_tokens} tokens in {seconds:.1f} s{processes} "
             f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s) -> {out}")


if __name__ == "__main__":
    sys.exit(run_command(main, distributed=True))
