"""Training runs in an output folder: one run per folder unless it resumes, resume from the newest complete
checkpoint (saying which, and why others were skipped), and refuse a resume whose config changes what the data
order or the model depends on."""

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medcap import distributed
from medcap.atomic import restore_interrupted
from medcap.checkpoint import (CONFIG, STATE, WEIGHTS, CheckpointError, newest_passing, read_metadata,
                               set_rng_state, step_folders, weights_intact)
from medcap.runtime import log

# What the data order and the model depend on: a resumed run must keep these (paths may move between machines; the
# samples themselves are compared by their fingerprint, saved with each checkpoint).
RESUME_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "shuffle", "dataset", "model", "tokenizer",
               "dynamic_prompts")
PATH_KEYS = ("data_dir", "llm_dir", "vision_dir", "vision_checkpoint", "model_dir", "path", "manifest",
             "llm_path", "gguf_path")


def new_run_id() -> str:
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    return distributed.broadcast_object(run_id)  # every rank records rank 0's


def checkpoint_problem(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint that a run can resume from, else why not."""
    for name in (WEIGHTS, STATE, CONFIG):
        if not (folder / name).is_file():
            return f"no {name}"
    problem = weights_intact(folder / WEIGHTS)
    if problem:
        return f"{WEIGHTS}: {problem}"
    try:
        torch.load(folder / STATE, weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
        return f"{STATE}: {str(error).splitlines()[0][:200]}"
    return None


def existing_checkpoints(checkpoints: Path) -> list[Path]:
    """Everything in a checkpoints folder that another run wrote (complete or not), ``.tmp`` leftovers aside."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if not p.name.endswith(".tmp"))


def newest_complete(checkpoints: Path) -> Path | None:
    """The newest ``step_*`` checkpoint that is complete; each newer one that is not is reported with why."""
    return newest_passing(step_folders(checkpoints), checkpoint_problem)[0]


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete ``best_step_*`` checkpoint (``resume_from=auto`` takes only ``step_*`` ones)."""
    return next((f for f in reversed(step_folders(checkpoints, "best_step")) if checkpoint_problem(f) is None), None)


def _resume_best(checkpoints: Path) -> str:
    best = best_checkpoint(checkpoints)
    return f"resume_from={best} to resume from the best one, " if best else ""


def start(cfg: DictConfig, output_dir: Path, data_keys: tuple[str, ...] = ()) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from or None) for a training run into ``output_dir``. ``data_keys``: the
    recipe's own keys that, besides ``RESUME_KEYS``, decide its samples or their order (see ``check_resumable``).

    ``resume_from=auto`` resumes from the newest complete ``step_*`` checkpoint in ``output_dir/checkpoints``
    (none: a new run); ``resume_from=DIR`` from the newest complete one there. A new run refuses a folder that holds
    another run's checkpoints unless ``overwrite=true``, which deletes them first (with ``resume_from=auto`` too, when
    none of them is complete)."""
    checkpoints = output_dir / "checkpoints"
    resume_from = cfg.get("resume_from")
    overwrite = cfg.get("overwrite", False)
    resume = None
    if resume_from == "auto":
        resume = newest_complete(checkpoints)
        if resume is None and step_folders(checkpoints) and not overwrite:
            raise CheckpointError(f"resume_from=auto: no complete checkpoint in {checkpoints} (see the "
                                  f"warnings); pass {_resume_best(checkpoints)}overwrite=true to start a new run "
                                  f"there, or fix or remove them")
    elif resume_from:
        folder = Path(resume_from)
        restore_interrupted(folder)
        resume = folder if checkpoint_problem(folder) is None else newest_complete(folder)
        if resume is None:
            raise CheckpointError(f"resume_from={resume_from}: no complete checkpoint there "
                                  f"({checkpoint_problem(folder)})")
    if resume is not None:
        check_resumable(cfg, resume, data_keys)
        meta = read_metadata(resume)
        log.info(f"resuming run {meta['run_id']} from {resume} (step {meta['step']})")
        return meta["run_id"] or new_run_id(), resume
    old = existing_checkpoints(checkpoints)
    if old:
        if not overwrite:
            names = ", ".join(p.name for p in old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
            if resume_from == "auto":
                raise CheckpointError(f"resume_from=auto: {checkpoints} holds no step_* checkpoint to resume (it "
                                      f"holds {names}); pass {_resume_best(checkpoints)}overwrite=true to replace "
                                      f"them, or choose another output_dir")
            raise CheckpointError(f"{checkpoints} holds another run's checkpoints ({names}); a new run would mix "
                                  f"with them: pass resume_from=auto to continue it, overwrite=true to replace it, "
                                  f"or choose another output_dir")
        distributed.barrier()
        if distributed.is_rank_zero():
            log.warning(f"overwrite=true: deleting {checkpoints}")
            shutil.rmtree(checkpoints)
        distributed.barrier()
    return new_run_id(), None


def _without_paths(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_paths(v) for k, v in node.items() if k not in PATH_KEYS}
    return node


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys())
                for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}")]
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _file_names(node: Any) -> Any:
    """A list of file paths (the fuser's ``candidates``) compared by the last three parts of each path, in order
    (``greedy/val/predictions.csv``: the folders above may differ between machines)."""
    if isinstance(node, list) and all(isinstance(v, str) for v in node):
        return [Path(*Path(v).parts[-3:]).as_posix() for v in node]
    return node


def check_resumable(cfg: DictConfig, checkpoint: Path, data_keys: tuple[str, ...] = ()) -> None:
    """Refuse to resume with a config whose data order or model differs from the checkpoint's (paths aside; a
    list of files in ``data_keys`` is compared by ``_file_names``)."""
    saved = OmegaConf.to_container(OmegaConf.load(checkpoint / CONFIG), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = [d for key in (*RESUME_KEYS, *data_keys)
               for d in _differences(_file_names(_without_paths(saved.get(key))),
                                     _file_names(_without_paths(current.get(key))), key)]
    saved_world = torch.load(checkpoint / STATE, weights_only=True, mmap=True).get("world_size", 1)
    if saved_world != distributed.world_size():
        changed.append(f"world size: {saved_world} -> {distributed.world_size()} processes")
    if changed:
        raise CheckpointError(f"cannot resume from {checkpoint}: the data order or the model would change: "
                              f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}; resume with the "
                              f"run's settings, or start a new run in another output_dir")


def data_fingerprint(rows: list) -> str:
    """What a run trains on, as text to compare on resume: the number of samples and a hash of ``rows`` (per
    sample, in order, what decides its tokens: ID, target text, prompt, image file names)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=True).encode() + b"\n")
    return f"{len(rows)} samples, sha256 {digest.hexdigest()[:16]}"


def restore(path: Path, optimizer, scheduler, load_optimizer=None,
            data: str | None = None) -> tuple[int, list[dict]]:
    """Restores the optimizer (through ``load_optimizer`` when it is sharded), the scheduler and this rank's RNG
    states saved with a checkpoint; returns (step, history) to continue from. ``data``: this run's
    ``data_fingerprint``, refused when it is not the checkpoint's (another manifest, references or prompts)."""
    state = torch.load(path / STATE, weights_only=True)
    saved = state.get("data")
    if data is not None and saved is not None and saved != data:
        raise CheckpointError(f"cannot resume from {path}: its run trained on other samples ({saved}; this run has "
                              f"{data}); resume with the run's data, or start a new run in another output_dir")
    (load_optimizer or optimizer.load_state_dict)(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    set_rng_state(rng[distributed.rank()] if isinstance(rng, list) else rng)
    return state["step"], json.loads(state["history"])
