"""Merge a LoRA / QLoRA run into its LLM and write a Hugging Face Llama folder that ``transformers`` loads
(``LlamaForCausalLM.from_pretrained(output_dir)``) and that medcap can train or generate from again (``llm_dir``).
The vision side (encoder + projector) stays in the run's checkpoint.

    medcap run merge --config demo/merge checkpoint=outputs/llava_stage2_lora/checkpoints output_dir=DIR
"""

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from medcap.checkpoint import CONFIG, load_checkpoint, resolve_checkpoint
from medcap.models.hf_export import save_hf_llama
from medcap.runtime import log


@config.parse
def main(cfg: DictConfig) -> None:
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    run_cfg = OmegaConf.load(checkpoint / CONFIG)  # the resolved config of the run that wrote the checkpoint
    training.set_seed(seed=run_cfg.get("seed", 0))  # a model without llm_dir is random-init: the run's seed rebuilds it
    with training.set_default_dtype(training.get_dtype("fp32")):
        model = config.instantiate(run_cfg.model)  # on the CPU in fp32: merging is exact there
    load_checkpoint(model, checkpoint)
    if model.trainable["decoder"] == "frozen":
        log.warning(f"{checkpoint} trained no LLM weights: the merged folder is the original LLM")
    dtype = training.get_dtype(cfg.get("dtype", "bf16"))
    out = save_hf_llama(model, cfg.output_dir, llm_dir=run_cfg.model.get("llm_dir"), dtype=dtype)
    log.info(f"merged LLM ({model.trainable['decoder']} decoder from {checkpoint}) -> {out}")
    if model.trainable["decoder"] in ("lora", "qlora", "full") and Path(out).is_dir():
        log.info("the vision encoder and projector stay in the checkpoint: pair it with llm_dir=" + str(out))


if __name__ == "__main__":
    sys.exit(main())
