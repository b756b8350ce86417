"""The training core shared by every training recipe: what differs between methods is which parts of the
model train (see ``VisionLanguageModel.trainable``), not the loop."""

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler
from tqdm import tqdm

from medcap import distributed
from medcap.atomic import replaced_atomically, write_json
from medcap.checkpoint import all_ranks_rng_state, save_checkpoint
from medcap.models.linear import pack_products, unpack_products
from medcap.text import IGNORE_INDEX


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches in a seeded order: epoch ``e`` visits ``randperm(n)`` drawn with seed ``seed + e``
    (the last incomplete batch is dropped). Starting at micro-batch ``start`` reproduces exactly the order an
    uninterrupted run would have seen from there, which is what resuming needs. With ``world_size`` ranks each
    global batch holds ``batch_size * world_size`` samples and rank ``rank`` takes its contiguous share, so the
    ranks together see the batches a single process with the global batch size would."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"the training set has {num_samples} samples, fewer than batch_size={batch_size}"
                             + (f" x {world_size} ranks" if world_size > 1 else ""))
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.shuffle = start, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_samples // global_batch

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        index, epoch, order = self.start, None, None
        global_batch = self.batch_size * self.world_size
        while True:
            e, i = divmod(index, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            first = i * global_batch + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()
            index += 1

    def __len__(self) -> int:
        return sys.maxsize


def caption_loss(model, inputs: dict[str, Any], labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy on labelled positions (``labels`` aligned with the input tokens). The model
    projects to the vocabulary only at the positions that predict a label, and only those logits go to fp32."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    logits = model(**inputs, output_at=F.pad(labelled, (0, 1), value=False))
    return F.cross_entropy(logits.float(), targets[labelled], reduction=reduction)


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of the model's forward; a batch without ``images`` (a text-only LM) gives tokens only."""
    if batch.get("images") is None:
        return {"tokens": batch["tokens"].to(device)}
    return {"tokens": batch["tokens"].to(device),
            "encoder_input": {"image": {"images": batch["images"].to(device, dtype)}}}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class TrainSettings:
    max_steps: int
    gradient_accumulation_steps: int = 1
    clip_grad_norm: float | None = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 1
    select_metric: str | None = None  # a key ``evaluate`` returns (val_loss, val_score...): keeps checkpoints/best
    select_mode: str = "max"  # "max" or "min"
    patience: int | None = None  # stop after this many evaluations without a better select_metric
    # a scalar added to each step's loss (once per step, after the micro-batches), logged as reg_loss
    regularizer: Callable[[], Tensor] | None = None
    pack_weights: bool = True  # on a CPU: frozen fp32 decoder weights multiplied through packed copies


def l2_regularizer(params: list[Tensor], weight: float) -> Callable[[], Tensor]:
    """MeGPT's L2 term: ``weight`` * the sum of squares of ``params`` (the trained parameters), added to the loss:
    coupled L2, whose gradient 2 * weight * w goes through the optimizer (unlike AdamW's decoupled decay)."""
    if weight < 0:
        raise ValueError(f"l2_lambda must be >= 0, got {weight}")
    return lambda: weight * sum(p.float().square().sum() for p in params)


def best_so_far(history: list[dict], key: str, mode: str) -> tuple[float | None, int]:
    """The best value of ``key`` in ``history`` and how many evaluations have come since it (resuming picks the
    early-stopping count up from the history)."""
    best, since = None, 0
    for record in history:
        if key in record:
            value = record[key]
            if best is None or (value > best if mode == "max" else value < best):
                best, since = value, 0
            else:
                since += 1
    return best, since


def pack_frozen_products(model, device: torch.device, enabled: bool = True) -> bool:
    """On a CPU, without compiled layers: the frozen fp32 decoder weights' products, forward and input gradient,
    run on packed copies (``medcap.models.linear.pack_products``), as ``train`` has them; otherwise (or not
    ``enabled``) the decoder's packed copies are dropped. Whether it packed."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return False
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in decoder.modules())
    if not enabled or device.type != "cpu" or compiled:
        unpack_products(decoder)
        return False
    pack_products(decoder, backward=True, compute_dtype=getattr(model, "compute_dtype", None))
    return True


def train(model, optimizer, scheduler, batches: Iterator[dict[str, Any]], settings: TrainSettings, *,
          output_dir: str | Path, device: torch.device, dtype: torch.dtype,
          evaluate: Callable[[], dict[str, float]] | None = None, metric_logger=None, cfg=None,
          start_step: int = 0, history: list[dict] | None = None, optimizer_state: Callable[[], dict] | None = None,
          run_id: str | None = None, data: str | None = None) -> dict[str, Any]:
    """Run optimizer steps ``start_step + 1 .. max_steps``. One step = ``gradient_accumulation_steps``
    micro-batches whose summed token losses are divided by their total label count (over all ranks when
    distributed), so accumulation and data parallelism give the gradient of one large batch.

    Every ``eval_every`` steps ``evaluate()`` adds its figures (validation loss, generation metrics...) to the
    history; with ``select_metric`` the best evaluation so far is also saved to ``checkpoints/best`` and
    ``patience`` evaluations without improvement stop training early (decided on rank 0 and broadcast, so every
    rank stops at the same step; resumed from its last checkpoint, a run that stopped early trains no further).
    Distributed, BatchNorm running statistics are averaged over the ranks after each step. Checkpoints (trained
    parts + optimizer, scheduler, every rank's RNG, step, history, run id, ``data``: the training set's
    ``runs.data_fingerprint``) go to
    ``output_dir/checkpoints/step_NNNNNN``. Returns a summary with the loss history and
    timings."""
    if settings.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {settings.max_steps}")
    output_dir = Path(output_dir)
    history = list(history or [])
    params = [p for p in model.parameters() if p.requires_grad]
    world = distributed.world_size()
    model.train()
    pack_frozen_products(model, device, settings.pack_weights)
    step_times = []
    best, since_best = best_so_far(history, settings.select_metric, settings.select_mode) \
        if settings.select_metric else (None, 0)
    # the saved history holds the evaluations that stopped a run early (at least one without improvement): resumed,
    # it stays stopped
    stopped = settings.patience is not None and since_best >= max(settings.patience, 1)

    def checkpoint(path: Path, step: int) -> None:
        state = {"step": step, "optimizer": optimizer_state() if optimizer_state else optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": all_ranks_rng_state(), "world_size": world,
                 "history": json.dumps(history), "run_id": run_id, "data": data}
        save_checkpoint(model, path, cfg, state, run_id=run_id, step=step)
        distributed.barrier()

    if stopped and distributed.is_rank_zero():
        tqdm.write(f"early stop at step {start_step}, as resumed: {settings.select_metric} has not improved on "
                   f"{best:.4f} for {since_best} evaluations (patience={settings.patience}); nothing to train")
    progress = tqdm(range(start_step + 1, settings.max_steps + 1) if not stopped else [], desc="train", unit="step",
                    initial=start_step, total=settings.max_steps, dynamic_ncols=True,
                    disable=not distributed.is_rank_zero())
    step = start_step
    for step in progress:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(settings.gradient_accumulation_steps)]
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        num_tokens = distributed.all_reduce_sum(local_tokens, device)
        loss_sum = 0.0
        for batch in micro:
            # FSDP averages gradients over ranks: scale by the world size to get the global token mean
            token_loss = caption_loss(model, model_inputs(batch, device, dtype), batch["labels"].to(device),
                                      reduction="sum")
            loss = token_loss * world / num_tokens
            loss.backward()
            loss_sum += loss.item() / world
        loss_sum = distributed.all_reduce_sum(loss_sum, device)
        reg_loss = None
        if settings.regularizer is not None:
            reg = settings.regularizer()
            reg.backward()
            reg_loss = float(distributed.full_tensor(reg.detach()))
        grad_norm = None
        if settings.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
            grad_norm = float(distributed.full_tensor(grad_norm))
        lr = optimizer.param_groups[0]["lr"]  # the one this step uses (the scheduler then sets the next one's)
        optimizer.step()
        distributed.average_batchnorm_stats(model)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)

        record = {"step": step, "loss": loss_sum, "lr": lr,
                  "step_time_s": step_times[-1],
                  "tokens_per_s": world * sum(b["tokens"].numel() for b in micro) / step_times[-1]}
        if reg_loss is not None:  # "loss" stays the caption loss; the objective was their sum
            record["reg_loss"], record["total_loss"] = reg_loss, loss_sum + reg_loss
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        evaluated = evaluate is not None and settings.eval_every and (
            step % settings.eval_every == 0 or step == settings.max_steps)
        if evaluated:
            record.update(evaluate())
            model.train()
            # drops the copies a validation generation made of trained weights (stale after a step)
            pack_frozen_products(model, device, settings.pack_weights)
        history.append(record)
        progress.set_postfix(loss=f"{loss_sum:.3f}", **({"reg": f"{reg_loss:.3g}"} if reg_loss is not None else {}),
                             **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if metric_logger is not None and (step % settings.log_every == 0 or evaluated):
            metric_logger.log_dict({k: v for k, v in record.items() if k != "step"}, step=step)
        stop = improved = False
        if evaluated and settings.select_metric:
            if settings.select_metric not in record:
                raise KeyError(f"select_metric={settings.select_metric!r} is not among the evaluation's figures "
                               f"{sorted(k for k in record if k.startswith('val'))}")
            value = record[settings.select_metric]
            improved = best is None or (value > best if settings.select_mode == "max" else value < best)
            improved = distributed.broadcast_object(improved)  # rank 0 decides for all: no rank is left waiting
            if improved:
                best, since_best = value, 0
                save_best(output_dir / "checkpoints", step, checkpoint)
            else:
                since_best += 1
                stop = distributed.broadcast_object(settings.patience is not None and since_best >= settings.patience)
        if stop or step == settings.max_steps or (settings.save_every and step % settings.save_every == 0):
            checkpoint(output_dir / "checkpoints" / f"step_{step:06d}", step)
        if stop:
            progress.write(f"early stop at step {step}: {settings.select_metric} has not improved on {best:.4f} "
                           f"for {since_best} evaluations")
            break

    if getattr(model, "decoder", None) is not None:
        unpack_products(model.decoder)  # the copies end with the training: a later generation makes its own
    summary = {
        "steps": step,
        "max_steps": settings.max_steps,
        "stopped_early": step < settings.max_steps,
        "best": None if best is None else {settings.select_metric: best},
        "history": history,
        "mean_step_time_s": sum(step_times[1:]) / max(len(step_times) - 1, 1) if step_times else None,
        "peak_memory_mb": peak_memory_mb(device),
    }
    if distributed.is_rank_zero():
        write_json(output_dir / "train_summary.json", summary)
    return summary


def save_best(checkpoints: Path, step: int, write: Callable[[Path, int], None]) -> None:
    """Write the best checkpoint as ``best_step_NNNNNN`` and point the link ``checkpoints/best`` at it by an
    atomic rename, so ``best`` always names a complete checkpoint, even while it is being replaced."""
    name = f"best_step_{step:06d}"
    write(checkpoints / name, step)
    if not distributed.is_rank_zero():
        return
    link = checkpoints / "best"
    tmp = checkpoints / "best.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    previous = link.resolve() if link.is_symlink() else None
    if link.is_dir() and not link.is_symlink():  # a folder written by an older medcap
        shutil.rmtree(link)
    os.replace(tmp, link)
    if previous is not None and previous.name != name and previous.parent == checkpoints.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def plot_loss(history: list[dict], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    val = [h for h in history if "val_loss" in h]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
