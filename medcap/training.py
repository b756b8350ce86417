"""The training core shared by every training recipe: what differs between methods is which parts of the
model train (see ``VisionLanguageModel.trainable``), not the loop."""

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler
from tqdm import tqdm

from medcap.checkpoint import rng_state, save_checkpoint
from medcap.text import IGNORE_INDEX


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches in a seeded order: epoch ``e`` visits ``randperm(n)`` drawn with seed ``seed + e``
    (the last incomplete batch is dropped). Starting at micro-batch ``start`` reproduces exactly the order an
    uninterrupted run would have seen from there, which is what resuming needs."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int = 0, shuffle: bool = True):
        if num_samples < batch_size:
            raise ValueError(f"the training set has {num_samples} samples, fewer than batch_size={batch_size}")
        self.num_samples, self.batch_size, self.seed, self.start, self.shuffle = num_samples, batch_size, seed, start, shuffle
        self.per_epoch = num_samples // batch_size

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        index, epoch, order = self.start, None, None
        while True:
            e, i = divmod(index, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            index += 1

    def __len__(self) -> int:
        return sys.maxsize


def caption_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy on labelled positions; ``labels`` are aligned with the input tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of the model's forward; a batch without ``images`` (a text-only LM) gives tokens only."""
    if batch.get("images") is None:
        return {"tokens": batch["tokens"].to(device)}
    return {"tokens": batch["tokens"].to(device),
            "encoder_input": {"image": {"images": batch["images"].to(device, dtype)}}}


@torch.no_grad()
def validation_loss(model, loader, device, dtype, max_batches: int | None = None) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        total += caption_loss(model(**model_inputs(batch, device, dtype)), labels, reduction="sum").item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


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
    eval_max_batches: int | None = None
    save_every: int | None = None
    log_every: int = 1


def train(model, optimizer, scheduler, batches: Iterator[dict[str, Any]], settings: TrainSettings, *,
          output_dir: str | Path, device: torch.device, dtype: torch.dtype, val_loader=None, metric_logger=None,
          cfg=None, start_step: int = 0, history: list[dict] | None = None) -> dict[str, Any]:
    """Run optimizer steps ``start_step + 1 .. max_steps``. One step = ``gradient_accumulation_steps``
    micro-batches whose summed token losses are divided by their total label count, so accumulation gives
    the same gradient as one large batch. Checkpoints (trained parts + optimizer, scheduler, RNG, step) go to
    ``output_dir/checkpoints/step_NNNNNN``. Returns a summary with the loss history and timings."""
    output_dir = Path(output_dir)
    history = list(history or [])
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step_times = []

    def checkpoint(step: int) -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "history": json.dumps(history)}
        save_checkpoint(model, output_dir / "checkpoints" / f"step_{step:06d}", cfg, state)

    progress = tqdm(range(start_step + 1, settings.max_steps + 1), desc="train", unit="step",
                    initial=start_step, total=settings.max_steps, dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(settings.gradient_accumulation_steps)]
        num_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            logits = model(**model_inputs(batch, device, dtype))
            loss = caption_loss(logits, batch["labels"].to(device), reduction="sum") / num_tokens
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, settings.clip_grad_norm if settings.clip_grad_norm else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)

        record = {"step": step, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": float(grad_norm), "step_time_s": step_times[-1],
                  "tokens_per_s": sum(b["tokens"].numel() for b in micro) / step_times[-1]}
        if val_loader is not None and settings.eval_every and (step % settings.eval_every == 0 or step == settings.max_steps):
            record["val_loss"] = validation_loss(model, val_loader, device, dtype, settings.eval_max_batches)
        history.append(record)
        progress.set_postfix(loss=f"{loss_sum:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if metric_logger is not None and (step % settings.log_every == 0 or "val_loss" in record):
            metric_logger.log_dict({k: v for k, v in record.items() if k != "step"}, step=step)
        if step == settings.max_steps or (settings.save_every and step % settings.save_every == 0):
            checkpoint(step)

    summary = {
        "steps": settings.max_steps,
        "history": history,
        "mean_step_time_s": sum(step_times[1:]) / max(len(step_times) - 1, 1) if step_times else None,
        "peak_memory_mb": peak_memory_mb(device),
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
