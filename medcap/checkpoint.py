"""Checkpoints of the trained parts only (e.g. encoder + projector, or a decoder's LoRA adapters), in
safetensors, with the config that produced them and, for resuming, the optimizer/scheduler/RNG state.

- What a part saves is chosen from its *state-dict* keys (wrappers such as activation checkpointing rename
  parameters but not state-dict keys): every key of a fully trained part, the adapter keys of a LoRA one.
- Loading refuses a checkpoint that lacks a part (or any key of a part) that its run trained, naming the part and
  the file, so a checkpoint that silently lost its adapters can never be taken for the trained model.
- Each checkpoint records its run id and step; a folder of ``step_*`` checkpoints resolves to the newest complete
  one, and says which.
- Writes are atomic: a checkpoint folder is written under a temporary name and renamed into place.
- Under FSDP the trained tensors are gathered one at a time and copied to the CPU on rank 0 only.
"""

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchtune.modules.peft import get_adapter_state_dict
from torchtune.utils import get_logger

from medcap import distributed
from medcap.atomic import replaced_atomically, restore_interrupted
from medcap.distributed import full_tensor, is_rank_zero
from medcap.models import import_medcap, import_r2gengpt

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
STATE = "training_state.pt"
ADAPTER_MODES = ("lora", "qlora")

log = get_logger("INFO")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file."""


def adapter_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """The adapter keys of a state dict (torchtune's adapter filter; nothing is copied)."""
    return set(get_adapter_state_dict(state, device=None))


def trained_keys(module, mode: str) -> list[str]:
    """The state-dict keys a part saves in ``mode``: all of them when trained in full, its adapters under LoRA."""
    if mode == "frozen":
        return []
    state = module.state_dict()
    return list(state) if mode == "full" else sorted(adapter_keys(state))


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """What the model trains, keyed ``part.name``, as CPU tensors on rank 0 (empty elsewhere): every parameter
    and buffer (e.g. BatchNorm statistics) of a fully trained part, the adapter weights of a LoRA-trained one.
    Under FSDP each sharded tensor is gathered on its own (a collective every rank joins, in the same order),
    copied to the CPU on rank 0 and freed at once, so no rank ever holds more than one gathered tensor."""
    state = {}
    for part, module in model.parts().items():
        mode = model.trainable[part]
        if mode == "frozen":
            continue
        part_state = module.state_dict()
        for key in trained_keys(module, mode):
            tensor = full_tensor(part_state[key]).detach()
            if is_rank_zero():  # a copy: tied weights must not share storage in safetensors
                state[f"{part}.{key}"] = tensor.to("cpu", copy=True).contiguous()
            del tensor
    return state


def checkpoint_metadata(model, run_id: str | None = None, step: int | None = None) -> dict[str, str]:
    lora = {part: vars(s) for part, s in getattr(model, "lora_settings", {}).items()}
    meta = {"trainable": json.dumps(model.trainable), "lora": json.dumps(lora)}
    if run_id is not None:
        meta["run_id"] = run_id
    if step is not None:
        meta["step"] = str(step)
    return meta


def save_checkpoint(model, out_dir: str | Path, cfg: DictConfig | None = None,
                    training_state: dict[str, Any] | None = None, run_id: str | None = None,
                    step: int | None = None) -> Path:
    out_dir = Path(out_dir)
    weights = trained_state_dict(model)
    if not is_rank_zero():  # the other ranks took part in gathering the weights; rank 0 writes them
        return out_dir
    with replaced_atomically(out_dir, folder=True) as tmp:
        save_file(weights, tmp / WEIGHTS, metadata=checkpoint_metadata(model, run_id, step))
        if cfg is not None:
            OmegaConf.save(cfg, tmp / CONFIG, resolve=True)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        for write in getattr(model, "checkpoint_writers", ()):  # files that belong with the weights (see finetune)
            write(tmp)
    return out_dir


def _json_field(raw: dict[str, str], key: str, weights: Path, values: type, what: str) -> dict:
    try:
        value = json.loads(raw.get(key, "{}"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{weights}: metadata field {key!r} is not valid JSON ({error})") from None
    if not isinstance(value, dict) or not all(isinstance(v, values) for v in value.values()):
        raise CheckpointError(f"{weights}: metadata field {key!r} must map each part to its {what}, found "
                              f"{raw[key][:200]!r}")
    return value


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata a checkpoint's weights file records: trainable, lora (as data), run_id, step."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    try:
        with safe_open(weights, framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({error})") from None
    step = raw.get("step")
    if step and not re.fullmatch(r"[0-9]+", step):
        raise CheckpointError(f"{weights}: metadata field 'step' is not an integer: {step[:50]!r}")
    return {"trainable": _json_field(raw, "trainable", weights, str, "mode"),
            "lora": _json_field(raw, "lora", weights, dict, "settings"),
            "run_id": raw.get("run_id"), "step": int(step) if step else None}


def weights_intact(path: Path) -> str | None:
    """None when ``path`` (a safetensors file) is whole, else what is wrong: a truncated or damaged file is
    caught from its header and its size without reading the tensors."""
    try:
        actual = path.stat().st_size
        if actual < 8:
            return f"{actual} bytes, too short for a safetensors file"
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > actual - 8:  # read before json.loads: damaged, it could ask for any amount of memory
                return f"header size {size} exceeds the file ({actual} bytes)"
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError) as error:
        return f"unreadable header ({error})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"header entry {key!r} has no data_offsets [begin, end]"
        ends.append(offsets[1])
    expected = 8 + size + max(ends, default=0)
    return None if actual == expected else f"{actual} bytes, its header describes {expected}"


def step_folders(folder: str | Path, prefix: str = "step") -> list[Path]:
    """``step_NNNNNN`` checkpoint folders in ``folder`` (``prefix`` ``best_step``: the best ones), lowest step
    first. A folder whose swap into place was interrupted is put back first; ``.tmp`` leftovers of interrupted
    saves are not checkpoints."""
    folder = Path(folder)
    for aside in folder.glob(".*.old"):
        restore_interrupted(folder / aside.name[1:-len(".old")])
    steps = {}
    for p in folder.glob(f"{prefix}_*"):
        match = re.fullmatch(rf"{prefix}_([0-9]+)", p.name)
        if match and p.is_dir():
            steps[p] = int(match[1])
    return sorted(steps, key=steps.get)


def newest_passing(folders: list[Path], problem: Callable[[Path], str | None]) -> tuple[Path | None, list[str]]:
    """(the newest of ``folders``, given lowest step first, in which ``problem`` finds nothing, or None; what it
    found in each newer one, as "name: problem"); each newer one is logged as skipped, with why."""
    problems = []
    for folder in reversed(folders):
        found = problem(folder)
        if found is None:
            return folder, problems
        log.warning(f"skipping {folder}: {found}")
        problems.append(f"{folder.name}: {found}")
    return None, problems


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a folder of ``step_*`` checkpoints (the newest complete one is taken, and each newer
    one that is not is reported with why)."""
    path = Path(path)
    restore_interrupted(path)
    if (path / WEIGHTS).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    steps = step_folders(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {WEIGHTS} there or step_* folders holding it")

    def weights_problem(folder: Path) -> str | None:
        problem = weights_intact(folder / WEIGHTS) if (folder / WEIGHTS).is_file() else "missing"
        return None if problem is None else f"{WEIGHTS}: {problem}"

    newest, problems = newest_passing(steps, weights_problem)
    if newest is not None:
        return newest
    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise CheckpointError(f"no complete checkpoint in {path}: {'; '.join(problems[:5])}{more}")


def describe(path: Path) -> str:
    """'path (run R, step S)' for log lines."""
    try:
        meta = read_metadata(path)
    except CheckpointError:
        return str(path)
    bits = [f"run {meta['run_id']}" if meta["run_id"] else None, f"step {meta['step']}" if meta["step"] else None]
    bits = [b for b in bits if b]
    return f"{path} ({', '.join(bits)})" if bits else str(path)


def _split_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, name = key.partition(".")
        by_part.setdefault(part, {})[name] = value
    return by_part


def _lora_hint(part: str, meta: dict) -> str:
    settings = meta["lora"].get(part)
    override = f"model.trainable.{part}={meta['trainable'].get(part, 'lora')}"
    if settings:
        override += " " + " ".join(f"model.lora.{part}.{k}={json.dumps(v).replace(' ', '')}"
                                   for k, v in settings.items())
    return override


def _fem_hint(missing: list[str], unexpected: list[str]) -> str:
    """What to change when one side has MeGPT's feature enhancement module and the other has not."""
    fem = "projector.fem."
    model_has, file_has = any(k.startswith(fem) for k in missing), any(k.startswith(fem) for k in unexpected)
    if model_has and not file_has:
        return "; the run trained without FEM: build the model with model.fem=null"
    if file_has and not model_has:
        return "; the run trained a FEM: build the model with its model.fem settings (configs/megpt/iuxray_fem.yaml)"
    return ""


def check_parts(model, state: dict[str, torch.Tensor], meta: dict, source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors per part, after checking them against the model and against what the run
    trained: a part the run trained must be there in full (every key), nothing may be unexpected or misshapen."""
    by_part = _split_parts(state)
    parts = model.parts()
    for part, mode in meta["trainable"].items():
        if mode != "frozen" and part in parts and not by_part.get(part):
            raise CheckpointError(f"{source}: the run trained the {part} ({mode}) but the file holds none of its "
                                  f"weights: the checkpoint is incomplete and cannot stand for the trained model")
    for part, part_state in by_part.items():
        if part not in parts:
            raise CheckpointError(f"{source}: unknown model part {part!r}; the model has {list(parts)}")
        expected = parts[part].state_dict()
        adapters = adapter_keys(expected)
        saved_adapters = adapter_keys(part_state)
        mode = meta["trainable"].get(part) or ("lora" if saved_adapters else "full")
        if mode in ADAPTER_MODES:
            if not adapters:
                raise CheckpointError(f"{source}: the {part} was trained with LoRA but the model has no adapters "
                                      f"there; build it as the run did: {_lora_hint(part, meta)}")
            required = adapters
        else:
            required = set(expected) - adapters
        missing = sorted(f"{part}.{k}" for k in required - part_state.keys())
        unexpected = sorted(f"{part}.{k}" for k in part_state.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(f"{source}: part {part!r} ({mode}) does not match the model: missing "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                                  f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
                                  f"{_fem_hint(missing, unexpected)}")
        for name, value in part_state.items():
            if expected[name].shape != value.shape:
                raise CheckpointError(f"{source}: {part}.{name} has shape {tuple(value.shape)}, the model "
                                      f"expects {tuple(expected[name].shape)}")
    return by_part


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(resolved folder, tensors, metadata) of a checkpoint; a damaged file is an error naming it."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path / WEIGHTS}: cannot read the weights ({error})") from None
    return path, state, meta


def load_checkpoint(model, path: str | Path) -> Path:
    """Load the trained parts saved by :func:`save_checkpoint` into ``model``: per part either every weight, or
    (a LoRA run's checkpoint) every adapter; a part the run trained that is missing, or anything unexpected or
    misshapen, is an error naming the file. The medcap seed's published ``meta_model_*.pt`` loads through
    ``medcap.models.import_medcap``, R2GenGPT's published ``.pth`` checkpoints through
    ``medcap.models.import_r2gengpt``."""
    if import_medcap.is_seed_checkpoint(path):
        return import_medcap.load(model, path)
    if import_r2gengpt.is_r2gengpt_checkpoint(path):
        return import_r2gengpt.load(model, path)
    path, state, meta = read_checkpoint(path)
    parts = model.parts()
    for part, part_state in check_parts(model, state, meta, path / WEIGHTS).items():
        parts[part].load_state_dict(part_state, strict=False)
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path) / STATE, weights_only=True)


def rng_state() -> dict[str, Any]:
    """torch (CPU and, where present, every CUDA device), numpy and python RNG states in types
    ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_ranks_rng_state() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (one entry in a single process); a collective under torchrun."""
    return distributed.gather_objects(rng_state())
