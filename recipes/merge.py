"""Merge a LoRA / QLoRA run into its LLM and write a Hugging Face folder: a Llama folder that ``transformers``
loads (``LlamaForCausalLM.from_pretrained(output_dir)``) and medcap trains or generates from again
(``llm_dir``), or with ``format: llava_hf`` a whole LLaVA-1.5 folder (``LlavaForConditionalGeneration``) for a model
built by ``medcap.models.builders.llava_hf``. For a Llama folder the vision side (encoder + projector) stays in
the run's checkpoint.

The model is built from this command's own config (``model:``, the same node as the run's), never from the
checkpoint: a checkpoint's config.yaml is read as data only, to check that it describes the same model and, for
a QLoRA run, to read the dtype it trained in. The LLM is built in the output dtype (a QLoRA run's in its training
dtype, so that its NF4 base is the one it trained on) and each merged tensor is computed (in fp32), cast to the
output dtype and written one at a time.

``output_dir`` is replaced as a whole: an existing non-empty one is refused unless ``overwrite=true``, and one that
is, holds or lies inside the checkpoint or a folder the model reads (``model_dir``, ``llm_dir``...) always.

    medcap run merge --config demo/merge checkpoint=outputs/llava_stage2_lora/checkpoints output_dir=DIR
"""

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from medcap.atomic import restore_interrupted
from medcap.checkpoint import CONFIG, CheckpointError, describe, load_checkpoint, read_metadata, resolve_checkpoint
from medcap.models.hf_export import check_output_dir, save_hf_llama
from medcap.precision import keep_trained_parts_in
from medcap.runtime import log, model_node_for
from medcap.runs import PATH_KEYS
from medcap.command import run_command

FORMATS = ("llama_hf", "llava_hf")


def recorded_config(checkpoint: Path) -> dict[str, Any] | None:
    """The run's config.yaml beside the checkpoint's weights, as plain data (None without one)."""
    path = checkpoint / CONFIG
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def check_same_model(ours: DictConfig, checkpoint: Path, run: dict[str, Any] | None) -> None:
    """The checkpoint's recorded model node (``run``: its config.yaml) must name the same builder with the same
    arguments (paths aside: they may differ between machines)."""
    path = checkpoint / CONFIG
    if run is None:
        log.warning(f"{checkpoint} has no {CONFIG}: cannot check that it was trained with this model")
        return
    recorded = run.get("model") or {}
    current = OmegaConf.to_container(ours, resolve=True)
    differ = [f"model.{k}: {recorded.get(k)!r} (checkpoint) vs {current.get(k)!r} (this config)"
              for k in sorted(recorded.keys() | current.keys())
              if k not in PATH_KEYS + ("trainable", "lora") and recorded.get(k) != current.get(k)]
    if differ:
        raise ValueError(f"{path} records another model than this config builds: {'; '.join(differ[:4])}; pass the "
                         f"run's model node (e.g. --config of the training run's config, or model.* overrides)")


def check_output(cfg: DictConfig) -> None:
    """Refuse an output_dir whose replacement would delete the checkpoint (the folder named, which holds the
    one resolved), a folder the model reads or, without ``overwrite=true``, anything else already there."""
    sources = {"checkpoint folder": cfg.checkpoint}
    sources.update({f"model.{key}": cfg.model[key] for key in PATH_KEYS if cfg.model.get(key)})
    check_output_dir(cfg.output_dir, sources)
    out = Path(cfg.output_dir)
    restore_interrupted(out)  # an old folder left aside by an interrupted swap counts as there
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not cfg.get("overwrite", False):
            held = ", ".join(sorted(p.name for p in out.iterdir())[:5]) if out.is_dir() else "a file"
            raise FileExistsError(f"output_dir {out} is not empty (it holds {held}): merge replaces the whole "
                                  f"folder; pass overwrite=true to replace it, or choose another output_dir")
        log.warning(f"overwrite=true: replacing {out}")


def qlora_dtype(checkpoint: Path, run: dict[str, Any] | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a QLoRA run trained in (its config.yaml's ``dtype``; fp32, finetune's default, when it has none):
    NF4 quantises differently from bf16 and from fp32 weights, so the base must be quantised as the run's was."""
    if run is None:
        log.warning(f"{checkpoint} has no {CONFIG}: cannot tell the dtype the QLoRA run quantised its base in; "
                    f"quantising it in the merge's dtype {dtype}, which matches the run only if it trained in it")
        return dtype
    name = run.get("dtype", "fp32")
    if name not in ("bf16", "fp32"):
        raise CheckpointError(f"{checkpoint / CONFIG}: dtype is {name!r}; a run trains in bf16 or fp32")
    return training.get_dtype(name, device=torch.device("cpu"))


@config.parse
def main(cfg: DictConfig) -> None:
    fmt = cfg.get("format", "llama_hf")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not cfg.get("model"):
        raise ValueError("merge needs the run's model node (model: with _component_ and its arguments)")
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    check_output(cfg)
    run = recorded_config(checkpoint)
    check_same_model(cfg.model, checkpoint, run)
    trained = read_metadata(checkpoint)["trainable"]  # what the run trained, whatever this config's model says
    training.set_seed(seed=cfg.get("seed", 0))  # a model without llm_dir is random-init: the run's seed rebuilds it
    dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=torch.device("cpu"))  # merging runs on the CPU
    build_dtype = dtype
    if "qlora" in trained.values():
        build_dtype = qlora_dtype(checkpoint, run, dtype)
        log.info(f"QLoRA: the base is quantised in {build_dtype} as the run trained it, merged in fp32 and written "
                 f"in {dtype}")
    with training.set_default_dtype(build_dtype):
        model = config.instantiate(model_node_for(cfg.model, checkpoint))
    keep_trained_parts_in(model, torch.float32, build_dtype)  # the adapters as trained (fp32), merged in fp32
    log.info(f"trained parts from {describe(load_checkpoint(model, checkpoint))}")
    decoder = trained.get("decoder", "frozen")
    if decoder == "frozen":
        log.warning(f"{checkpoint} trained no LLM weights: the merged folder holds the original LLM")
    if fmt == "llava_hf":
        from medcap.models.llava_hf import save_llava_hf

        out = save_llava_hf(model, cfg.output_dir, source_dir=cfg.model.model_dir, dtype=dtype)
    else:
        out = save_hf_llama(model, cfg.output_dir, llm_dir=cfg.model.get("llm_dir"), dtype=dtype)
        if decoder != "frozen" and Path(out).is_dir():
            # generate would add the checkpoint's adapters again on top of a merged LLM
            log.info(f"the vision encoder and projector stay in the checkpoint; medcap generates from the checkpoint "
                     f"with the original llm_dir (it applies the adapters itself), {out} is for other tools")
    log.info(f"merged ({decoder} decoder) -> {out}")


if __name__ == "__main__":
    sys.exit(run_command(main))
