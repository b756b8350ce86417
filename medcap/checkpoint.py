"""Checkpoints of the trained parts only (e.g. encoder + projector), in safetensors, with the config that
produced them and, for resuming, the optimizer/scheduler/RNG state. Writes are atomic: a checkpoint folder
is written under a temporary name and renamed into place."""

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from medcap.atomic import replaced_atomically
from medcap.distributed import full_tensor, is_rank_zero
from medcap.models import import_medcap
from medcap.models.lora import adapter_names

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
STATE = "training_state.pt"


def trained_names(module, mode: str) -> set[str] | None:
    """The state-dict names a part saves: all (``None``) when fully trained, its adapters when LoRA-trained."""
    if mode == "full":
        return None
    return adapter_names(module) if mode in ("lora", "qlora") else set()


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """What the model trains, keyed ``part.name``: every parameter and buffer (e.g. BatchNorm statistics) of a
    fully trained part, the adapter weights of a LoRA-trained one, nothing of a frozen one."""
    state = {}
    for part, module in model.parts().items():
        names = trained_names(module, model.trainable[part])
        # under FSDP every rank gathers each sharded tensor (a collective), in the same order
        state.update({f"{part}.{k}": full_tensor(v).detach().contiguous() for k, v in module.state_dict().items()
                      if names is None or k in names})
    return state


def save_checkpoint(model, out_dir: str | Path, cfg: DictConfig | None = None,
                    training_state: dict[str, Any] | None = None) -> Path:
    out_dir = Path(out_dir)
    weights = trained_state_dict(model)
    if not is_rank_zero():  # the other ranks took part in gathering the weights; rank 0 writes them
        return out_dir
    # safetensors refuses tensors that share storage (tied weights): clone those.
    state = {k: v.clone() for k, v in weights.items()}
    with replaced_atomically(out_dir, folder=True) as tmp:
        save_file(state, tmp / WEIGHTS, metadata={"trainable": json.dumps(model.trainable)})
        if cfg is not None:
            OmegaConf.save(cfg, tmp / CONFIG, resolve=True)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
    return out_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a folder of ``step_*`` checkpoints (the newest complete one is taken)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    steps = sorted(p for p in path.glob("step_*") if not p.name.endswith(".tmp") and (p / WEIGHTS).is_file())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {WEIGHTS} there or step_* folders holding it")
    return steps[-1]


def load_checkpoint(model, path: str | Path) -> Path:
    """Load the trained parts saved by :func:`save_checkpoint` into ``model``: per part either every weight, or
    (a LoRA run's checkpoint) every adapter; anything else missing or unexpected is an error."""
    if import_medcap.is_seed_checkpoint(path):  # the medcap seed's meta_model_*.pt (medcap.models.import_medcap)
        return import_medcap.load(model, path)
    path = resolve_checkpoint(path)
    state = load_file(path / WEIGHTS)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, name = key.partition(".")
        by_part.setdefault(part, {})[name] = value
    parts = model.parts()
    for part, part_state in by_part.items():
        if part not in parts:
            raise ValueError(f"{path / WEIGHTS}: unknown model part {part!r}; the model has {list(parts)}")
        expected = parts[part].state_dict()
        for name, value in part_state.items():
            if name in expected and expected[name].shape != value.shape:
                raise ValueError(f"{path / WEIGHTS}: {part}.{name} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(expected[name].shape)}")
        missing, unexpected = parts[part].load_state_dict(part_state, strict=False)
        adapters = adapter_names(parts[part])
        if adapters & part_state.keys():  # adapters saved by a LoRA run: all of them, on the loaded base weights
            missing = sorted(adapters - part_state.keys())
        else:  # the whole part (trained in full); adapters the model adds start fresh
            missing = [name for name in missing if name not in adapters]
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS}: part {part!r} does not match the model: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path) / STATE, weights_only=True)


def resume_point(resume_from: str | Path | None, output_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from: the newest ``step_*`` folder of ``resume_from``, or of
    ``output_dir/checkpoints`` when it is ``"auto"`` (None there before the first checkpoint)."""
    if resume_from == "auto":
        folder = Path(output_dir) / "checkpoints"
        resume_from = folder if any(folder.glob(f"step_*/{WEIGHTS}")) else None
    return resolve_checkpoint(resume_from) if resume_from else None


def restore_training_state(path: str | Path, optimizer, scheduler, load_optimizer=None) -> tuple[int, list[dict]]:
    """Restores the optimizer (through ``load_optimizer`` when it is sharded), the scheduler and the RNGs saved
    with a checkpoint; returns (step, history) to continue from."""
    state = load_training_state(path)
    (load_optimizer or optimizer.load_state_dict)(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], json.loads(state["history"])


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states in types ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
