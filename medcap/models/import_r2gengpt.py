"""R2GenGPT's published checkpoints (``checkpoint_epoch*_step*_bleu*_cider*.pth``, e.g. its MIMIC-CXR delta
checkpoint) loaded onto a ``llama2_7b_swin`` model built as the run was (``r2gengpt/mimic_delta`` for a delta file).

R2GenGPT saved ``torch.save({'model': <its trainable parameters>, 'config': <hyperparameters>, 'epoch': ...,
'step': ...})``, the parameters under its module names:

- ``visual_encoder.*``: transformers' ``SwinModel``; in delta mode wrapped by peft (LoRA on ``query`` / ``value``),
  so only the adapters are there, as ``visual_encoder.base_model.model.encoder.layers.{i}.blocks.{j}.attention.self
  .{query,value}.lora_{A,B}.default.weight``; in deep mode every Swin parameter (``visual_encoder.embeddings...``);
- ``llama_proj.{weight,bias}`` (Linear 1024 -> 4096) and ``layer_norm.{weight,bias}``: the mapper.

Here Swin is timm's, whose ``qkv`` is one fused projection: peft's ``query`` adapter is ``lora_a[s]`` / ``lora_b[s]``
of ``FusedLoRALinear`` for the slot ``s`` of q among the adapted thirds (the same for ``value``); peft and
``FusedLoRALinear`` both add ``alpha / rank * B(A(dropout(x)))`` to that third. Full Swin weights are renamed with
``hf_vision.hf_swin_to_timm``. The mapper is ``projector`` ``linear_ln`` (``0`` = Linear, ``1`` = LayerNorm).

The file is read with ``torch.load(weights_only=True)``: only tensors, plain containers and (for ``config``) Lightning's
``AttributeDict``, read as a plain dict, are accepted; anything else (pickled code) is refused
before it runs. Every trainable parameter of the model must come from the file and every tensor of the file must go
somewhere: missing and surplus keys are named.
"""

import re
from pathlib import Path

import torch
from torch import Tensor

from medcap.models.hf_vision import hf_swin_to_timm
from medcap.models.lora import FUSED_QKV, FusedLoRALinear
from medcap.models.tensor_files import load_weights_only, not_tensors

SUFFIXES = (".pth",)
TOP_LEVEL = {"model"}
OPTIONAL_TOP_LEVEL = {"config", "epoch", "step"}
_PEFT_LORA = re.compile(r"visual_encoder\.base_model\.model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\."
                        r"(query|value)\.lora_([AB])\.default\.weight")
_MAPPER = {"llama_proj.weight": "0.weight", "llama_proj.bias": "0.bias", "layer_norm.weight": "1.weight",
           "layer_norm.bias": "1.bias"}
_QKV = {"query": "q", "value": "v"}


class LightningAttributeDict:
    """What R2GenGPT's ``config`` entry (Lightning's ``AttributeDict``, a dict subclass holding its argparse
    options) is read as: a plain dict (the weights-only unpickler fills only plain dicts), nothing more."""

    def __new__(cls, *args, **kwargs):
        return dict(*args, **kwargs)


# the names Lightning 2.x and older releases pickle AttributeDict under
_ATTRIBUTE_DICT_NAMES = ("lightning.fabric.utilities.data.AttributeDict",
                         "lightning_fabric.utilities.data.AttributeDict",
                         "pytorch_lightning.utilities.parsing.AttributeDict")


def is_r2gengpt_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix in SUFFIXES and path.is_file()


def read(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The ``model`` state dict of the file (tensors only) and its ``config`` (R2GenGPT's options; {} if absent)."""
    # mapped: model_node reads only names and shapes, load then reads the tensors once
    state = load_weights_only(path, "tensors and R2GenGPT's hyperparameters",
                              safe_globals=[(LightningAttributeDict, name) for name in _ATTRIBUTE_DICT_NAMES])
    if not isinstance(state, dict) or not TOP_LEVEL <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected R2GenGPT's checkpoint, a dict with key 'model' (its trainable "
                         f"parameters); found {found}")
    surplus = sorted(set(state) - TOP_LEVEL - OPTIONAL_TOP_LEVEL)
    if surplus:
        raise ValueError(f"{path}: unexpected top-level keys {surplus} (R2GenGPT saves model, config, epoch, step)")
    model_state = state["model"]
    bad = not_tensors(model_state, "model")
    if bad:
        raise ValueError(f"{path}: 'model' must be a state dict of tensors; not a tensor: {bad[:5]}")
    config = state.get("config") or {}
    return model_state, config if isinstance(config, dict) else {}


def _settings_problems(model, config: dict) -> list[str]:
    """What the file's R2GenGPT options say about the run that the tensors alone do not: the LoRA scale
    (alpha / rank) and global_only."""
    problems = []
    encoder = model.vision.encoder
    if "global_only" in config and bool(config["global_only"]) != (getattr(encoder, "output", "patch") == "pooled"):
        problems.append(f"the run had global_only={config['global_only']}: set model.global_only accordingly")
    if config.get("vis_use_lora") and "vis_r" in config and "vis_alpha" in config:
        for module in encoder.modules():
            if isinstance(module, FusedLoRALinear) and (module.rank, module.alpha) != (config["vis_r"],
                                                                                      config["vis_alpha"]):
                problems.append(f"the run's Swin adapters had rank {config['vis_r']}, alpha {config['vis_alpha']}; "
                                f"the model's have rank {module.rank}, alpha {module.alpha} (model.lora.encoder)")
                break
    return problems


def model_node(cfg_model, path: str | Path):
    """``cfg_model`` (a config's ``model`` node) completed from the file, as a medcap checkpoint's metadata would:
    without ``trainable``, what the run trained (encoder ``lora`` for peft adapters, ``full`` for Swin weights,
    else ``frozen``; projector ``full``); for adapters without ``lora.encoder``, the run's rank (from the tensors),
    alpha and dropout (its ``vis_alpha`` / ``lora_dropout`` options) on the thirds it adapted; ``global_only`` from its
    options. Keys the config sets are kept (loading then checks them)."""
    from omegaconf import OmegaConf

    state, config = read(path)
    adapters = [m for m in map(_PEFT_LORA.fullmatch, state) if m]
    full_swin = any(k.startswith("visual_encoder.") and not k.startswith("visual_encoder.base_model.") for k in state)
    node = OmegaConf.create(OmegaConf.to_container(cfg_model, resolve=True))
    if node.get("trainable") is None:
        encoder = "lora" if adapters else "full" if full_swin else "frozen"
        node.trainable = {"encoder": encoder, "projector": "full", "decoder": "frozen"}
    if adapters and node.trainable.get("encoder") == "lora" and not (node.get("lora") or {}).get("encoder"):
        if "vis_alpha" not in config:
            raise ValueError(f"{path}: the file holds LoRA adapters but not R2GenGPT's options (vis_alpha): set "
                             f"model.lora.encoder (rank, alpha, targets [q, v]) as the run had them")
        rank = int(state[adapters[0].group(0)].shape[0]) if adapters[0][4] == "A" else \
            int(state[adapters[0].group(0)].shape[1])
        targets = sorted({_QKV[m[3]] for m in adapters})
        lora = OmegaConf.to_container(node.get("lora") or OmegaConf.create({}))
        lora["encoder"] = {"rank": rank, "alpha": config["vis_alpha"], "dropout": config.get("lora_dropout", 0.0),
                           "targets": targets}
        node.lora = lora
    if "global_only" in config and node.get("global_only") is None:
        node.global_only = bool(config["global_only"])
    return node


def _adapter_target(encoder, layer: int, block: int, which: str, matrix: str) -> tuple[str, FusedLoRALinear | None]:
    """(medcap name, the fused qkv layer or None when the model has no adapters there) of one peft tensor."""
    try:
        qkv = encoder.model.layers[layer].blocks[block].attn.qkv
    except (AttributeError, IndexError):
        return f"encoder: no Swin block layers.{layer}.blocks.{block}", None
    if not isinstance(qkv, FusedLoRALinear) or FUSED_QKV[_QKV[which]] not in qkv.slices:
        return f"encoder: no {_QKV[which]} adapter at layers.{layer}.blocks.{block}", None
    slot = qkv.slices.index(FUSED_QKV[_QKV[which]])
    return f"model.layers.{layer}.blocks.{block}.attn.qkv.lora_{matrix.lower()}.{slot}.weight", qkv


def renamed(model, state: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """({part: {medcap name: tensor}}, [file keys with no place in the model])."""
    encoder = model.vision.encoder
    out: dict[str, dict[str, Tensor]] = {"encoder": {}, "projector": {}}
    surplus, swin = [], {}
    for key, value in state.items():
        lora = _PEFT_LORA.fullmatch(key)
        if key in _MAPPER:
            out["projector"][_MAPPER[key]] = value
        elif lora:
            name, qkv = _adapter_target(encoder, int(lora[1]), int(lora[2]), lora[3], lora[4])
            if qkv is None:
                surplus.append(f"{key} ({name})")
            else:
                out["encoder"][name] = value
        elif key.startswith("visual_encoder.") and not key.startswith("visual_encoder.base_model."):
            swin[key.removeprefix("visual_encoder.")] = value
        else:
            surplus.append(key)
    out["encoder"].update({f"model.{k}": v for k, v in hf_swin_to_timm(swin).items()})
    return out, surplus


def load(model, path: str | Path) -> Path:
    """Load the file's trainable parameters into the model's encoder (adapters or full Swin) and projector;
    the decoder is untouched. Every trainable parameter of encoder and projector must be in the file."""
    path = Path(path)
    parts = model.parts()
    for part in ("encoder", "projector"):
        if part not in parts:
            raise ValueError(f"{path}: an R2GenGPT checkpoint needs a model with an {part}")
    if type(parts["projector"]).__name__ == "EnhancedProjector":
        raise ValueError(f"{path}: the model has MeGPT's FEM (model.fem), which an R2GenGPT checkpoint does not "
                         f"hold: build it without fem")
    if type(parts["projector"]).__name__ != "Sequential" or len(parts["projector"]) != 2:
        raise ValueError(f"{path}: R2GenGPT's mapper is Linear + LayerNorm: build the model with projector: linear_ln")
    state, config = read(path)
    by_part, surplus = renamed(model, state)
    problems = _settings_problems(model, config) + [f"surplus {k}" for k in surplus]
    for part, tensors in by_part.items():
        params = dict(parts[part].named_parameters())
        trainable = {k for k, p in params.items() if p.requires_grad}
        problems += [f"missing {part}.{k}" for k in sorted(trainable - tensors.keys())]
        problems += [f"surplus {part}.{k} (not trained by this model's config)"
                     for k in sorted(tensors.keys() - trainable)]
        problems += [f"{part}.{k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}"
                     for k, v in tensors.items() if k in trainable and v.shape != params[k].shape]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"{path} does not fit the model (build it as the run was, e.g. r2gengpt/mimic_delta for a "
                         f"delta checkpoint): {'; '.join(problems[:6])}{more}")
    for part, tensors in by_part.items():
        params = dict(parts[part].named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
    return path
