"""Merge a LoRA / QLoRA run into its LLM and write a Hugging Face folder: a Llama folder that ``transformers``
loads (``LlamaForCausalLM.from_pretrained(output_dir)``) and medcap trains or generates from again
(``llm_dir``), or with ``format: llava_hf`` a whole LLaVA-1.5 folder (``LlavaForConditionalGeneration``) for a model
built by ``medcap.models.builders.llava_hf``. For a Llama folder the vision side (encoder + projector) stays in
the run's checkpoint.

The model is built from this command's own config (``model:``, the same node as the run's), never from the
checkpoint: a checkpoint's config.yaml is read as data only, to check that it describes the same model. The LLM
is built in the output dtype and each merged tensor is computed (in fp32) and written one at a time.

    medcap run merge --config demo/merge checkpoint=outputs/llava_stage2_lora/checkpoints output_dir=DIR
"""

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from medcap.checkpoint import CONFIG, describe, load_checkpoint, resolve_checkpoint
from medcap.precision import keep_trained_parts_in
from medcap.runtime import log, model_node_for
from medcap.runs import PATH_KEYS
from medcap.command import run_command

FORMATS = ("llama_hf", "llava_hf")


def check_same_model(ours: DictConfig, checkpoint: Path) -> None:
    """The checkpoint's recorded model node, read as plain data, must name the same builder with the same
    arguments (paths aside: they may differ between machines)."""
    path = checkpoint / CONFIG
    if not path.is_file():
        log.warning(f"{checkpoint} has no {CONFIG}: cannot check that it was trained with this model")
        return
    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("model") or {}
    current = OmegaConf.to_container(ours, resolve=True)
    differ = [f"model.{k}: {recorded.get(k)!r} (checkpoint) vs {current.get(k)!r} (this config)"
              for k in sorted(recorded.keys() | current.keys())
              if k not in PATH_KEYS + ("trainable", "lora") and recorded.get(k) != current.get(k)]
    if differ:
        raise ValueError(f"{path} records another model than this config builds: {'; '.join(differ[:4])}; pass the "
                         f"run's model node (e.g. --config of the training run's config, or model.* overrides)")


@config.parse
def main(cfg: DictConfig) -> None:
    fmt = cfg.get("format", "llama_hf")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not cfg.get("model"):
        raise ValueError("merge needs the run's model node (model: with _component_ and its arguments)")
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    check_same_model(cfg.model, checkpoint)
    training.set_seed(seed=cfg.get("seed", 0))  # a model without llm_dir is random-init: the run's seed rebuilds it
    dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=torch.device("cpu"))  # merging runs on the CPU
    with training.set_default_dtype(dtype):
        model = config.instantiate(model_node_for(cfg.model, checkpoint))
    keep_trained_parts_in(model, torch.float32, dtype)  # the adapters as trained (fp32), merged in fp32
    log.info(f"trained parts from {describe(load_checkpoint(model, checkpoint))}")
    if model.trainable["decoder"] == "frozen":
        log.warning(f"{checkpoint} trained no LLM weights: the merged folder holds the original LLM")
    if fmt == "llava_hf":
        from medcap.models.llava_hf import save_llava_hf

        out = save_llava_hf(model, cfg.output_dir, source_dir=cfg.model.model_dir, dtype=dtype)
    else:
        from medcap.models.hf_export import save_hf_llama

        out = save_hf_llama(model, cfg.output_dir, llm_dir=cfg.model.get("llm_dir"), dtype=dtype)
        if model.trainable["decoder"] != "frozen" and Path(out).is_dir():
            log.info("the vision encoder and projector stay in the checkpoint: pair it with llm_dir=" + str(out))
    log.info(f"merged ({model.trainable['decoder']} decoder) -> {out}")


if __name__ == "__main__":
    sys.exit(run_command(main))
