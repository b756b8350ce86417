"""Caption generation: batched, KV-cached, greedy or top-k/top-p sampling, stopping at the end of the turn.
Writes ``output_dir/predictions.csv`` with columns ``ID,caption``.

    medcap run generate --config demo/generate checkpoint=outputs/demo/train/checkpoints [key=value ...]
"""

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training
from tqdm import tqdm

from medcap.generation import generate
from medcap.metrics import write_csv_predictions
from medcap.runtime import caption_dataset, caption_loader, device_and_dtype, log, setup_model_and_tokenizer


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="generate", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    model, tokenizer = setup_model_and_tokenizer(cfg, device, dtype, checkpoint=cfg.get("checkpoint"))
    model.eval()
    dataset = caption_dataset(cfg.dataset, tokenizer, model, with_captions=False)
    loader = caption_loader(dataset, tokenizer, cfg.batch_size, cfg.get("num_workers", 0), padding_side="left")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    predictions, n_tokens, t0 = {}, 0, time.perf_counter()
    for batch in tqdm(loader, desc="generate", unit="batch", dynamic_ncols=True):
        prompts = [row[mask].tolist() for row, mask in zip(batch["tokens"], batch["padding_mask"])]
        outputs = generate(
            model, prompts, batch["images"].to(dtype),
            max_new_tokens=cfg.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
            temperature=cfg.get("temperature", 0.0), top_k=cfg.get("top_k"), top_p=cfg.get("top_p"),
            generator=generator, use_cache=cfg.get("use_cache", True),
        )
        for sample_id, ids in zip(batch["ids"], outputs):
            predictions[sample_id] = tokenizer.decode(ids).strip()
            n_tokens += len(ids)
    seconds = time.perf_counter() - t0

    out = Path(cfg.output_dir) / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv_predictions(out, predictions)
    log.info(f"{len(predictions)} captions, {n_tokens} tokens in {seconds:.1f} s "
             f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s) -> {out}")


if __name__ == "__main__":
    sys.exit(main())
