"""LM-Fuser inference: the fuser trained by ``train_fuser`` reads the test runs' captions (``candidates``, listed in
the order used in training) and writes one caption per ID to ``output_dir/predictions.csv`` (the first run's ID
order).

    medcap run fuse --config demo/fuse checkpoint=outputs/demo_pipeline/fuser/checkpoints [key=value ...]

The prompt is built by the same function as in training; with ``prompt: null`` its instruction and system text
are those in the checkpoint's ``config.yaml``, so the two cannot drift apart. ``checkpoint=null`` fuses with the
untrained LM (a zero-shot baseline; then the default instruction unless ``prompt`` gives one). Decoding keys are
those of ``generate``.
"""

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from medcap.checkpoint import CONFIG, resolve_checkpoint
from medcap.fuser import DEFAULT_INSTRUCTION, fuser_prompt_ids, generate_texts, merge_runs, text_lm_and_tokenizer
from medcap.metrics import write_csv_predictions
from medcap.runtime import decoding_settings, device_and_dtype, log


def prompt_settings(cfg: DictConfig, checkpoint: Path | None) -> tuple[str, str | None]:
    """(instruction, system): from ``cfg.prompt`` when given, else from the checkpoint's training config."""
    trained = OmegaConf.load(checkpoint / CONFIG) if checkpoint and (checkpoint / CONFIG).is_file() else None
    if trained is not None and "candidates" in trained and len(trained.candidates) != len(cfg.candidates):
        raise ValueError(f"{checkpoint / CONFIG}: the fuser was trained on {len(trained.candidates)} candidate runs "
                         f"but candidates lists {len(cfg.candidates)}")
    prompt = cfg.get("prompt") or (trained.get("prompt") if trained is not None else None) or {}
    return prompt.get("instruction") or DEFAULT_INSTRUCTION, prompt.get("system")


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="fuse", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint) if cfg.get("checkpoint") else None
    instruction, system = prompt_settings(cfg, checkpoint)
    ids, candidates = merge_runs(list(cfg.candidates))
    model, tokenizer = text_lm_and_tokenizer(cfg, device, dtype, checkpoint)
    model.eval()
    log.info(f"fusing {len(cfg.candidates)} runs of {len(ids)} IDs with "
             f"{checkpoint or 'the untrained LM'}")

    prompts = [fuser_prompt_ids(tokenizer, candidates[i], instruction, system) for i in ids]
    t0 = time.perf_counter()
    captions = generate_texts(model, tokenizer, prompts, batch_size=cfg.batch_size, seed=cfg.seed, progress="fuse",
                              **decoding_settings(cfg))
    out = Path(cfg.output_dir) / "predictions.csv"
    write_csv_predictions(out, dict(zip(ids, captions)))
    log.info(f"{len(ids)} captions in {time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    sys.exit(main())
