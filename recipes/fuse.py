"""LM-Fuser inference: the fuser trained by ``train_fuser`` reads the test runs' captions (``candidates``, listed in
the order used in training) and writes one caption per ID to ``output_dir/predictions.csv`` (the first run's ID
order).

    medcap run fuse --config demo/fuse checkpoint=outputs/demo_pipeline/fuser/checkpoints [key=value ...]
    medcap run fuse --config aueb/fuse fuser_dir=DIR candidates=[A.csv,B.csv,C.csv]

The model comes from this config (``model``, ``tokenizer``) and its weights from ``checkpoint``. The prompt is
built by the same function as in training: from ``prompt`` when given (AUEB's inference prompt adds a sentence
to its training prompt), else from the prompt strings of the checkpoint's ``config.yaml``, so the two cannot
drift apart. That file is read as plain YAML data: only its prompt strings, its number of candidate runs and its
model's component name (which must be this config's) are used; nothing in it is instantiated.
``checkpoint=null`` fuses with the untrained LM (a zero-shot baseline). Decoding keys are those of ``generate``,
and ``early_stopping`` for an encoder-decoder's beam search (transformers' meaning).
"""

import sys
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from medcap.checkpoint import CONFIG, resolve_checkpoint
from medcap.fuser import (check_prompts_fit, fuser_prompt_ids, generate_texts, merge_runs, prompt_settings,
                          text_lm_and_tokenizer)
from medcap.metrics import write_csv_predictions
from medcap.runtime import decoding_settings, device_and_dtype, log
from medcap.command import run_command


def read_training_config(path: Path) -> dict:
    """A checkpoint's config.yaml as plain YAML data (``yaml.safe_load``: no tags, no interpolation, nothing
    built); a file that is not a mapping is an error naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not plain YAML data ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def checked_prompt(cfg: DictConfig, checkpoint: Path | None) -> dict:
    """The prompt keys: from ``cfg.prompt`` when given, else from the checkpoint's training config, which must
    have been trained on as many runs as ``candidates`` lists, with the model component this config builds."""
    trained = None
    if checkpoint and (checkpoint / CONFIG).is_file():
        path = checkpoint / CONFIG
        trained = read_training_config(path)
        runs = trained.get("candidates")
        if isinstance(runs, list) and len(runs) != len(cfg.candidates):
            raise ValueError(f"{path}: the fuser was trained on {len(runs)} candidate runs but candidates lists "
                             f"{len(cfg.candidates)}")
        component = (trained.get("model") or {}).get("_component_") if isinstance(trained.get("model"), dict) else None
        if component is not None and component != cfg.model._component_:
            raise ValueError(f"{path}: the fuser was trained as {component!r}, but this config builds "
                             f"{cfg.model._component_!r}; set model to the trained one")
    if cfg.get("prompt"):
        return prompt_settings(OmegaConf.to_container(cfg.prompt, resolve=True), "fuse config")
    if trained is not None:
        return prompt_settings(trained.get("prompt"), str(checkpoint / CONFIG))
    return prompt_settings(None, "fuse config")


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="fuse", cfg=cfg)
    training.set_seed(seed=cfg.seed)
    device, dtype = device_and_dtype(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint) if cfg.get("checkpoint") else None
    prompt = checked_prompt(cfg, checkpoint)
    ids, candidates = merge_runs(list(cfg.candidates))
    model, tokenizer = text_lm_and_tokenizer(cfg, device, dtype, checkpoint)
    model.eval()
    log.info(f"fusing {len(cfg.candidates)} runs of {len(ids)} IDs with "
             f"{checkpoint or 'the untrained LM'}")

    layout = {k: prompt[k] for k in ("template", "candidate_line", "separator")}
    prompts = [fuser_prompt_ids(tokenizer, candidates[i], prompt["instruction"], prompt["system"], **layout)
               for i in ids]
    decoding = decoding_settings(cfg)
    check_prompts_fit(model, ids, prompts, decoding["max_new_tokens"],
                      f"built from the candidates in {', '.join(str(f) for f in cfg.candidates)}")
    t0 = time.perf_counter()
    if cfg.get("early_stopping") is not None:
        decoding["early_stopping"] = cfg.early_stopping
    captions = generate_texts(model, tokenizer, prompts, batch_size=cfg.batch_size, seed=cfg.seed, progress="fuse",
                              **decoding)
    out = Path(cfg.output_dir) / "predictions.csv"
    write_csv_predictions(out, dict(zip(ids, captions)))
    log.info(f"{len(ids)} captions in {time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    sys.exit(run_command(main))
