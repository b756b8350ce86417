"""Optimizer options of the training recipes: 8-bit paged AdamW, and the optimizer step run inside backward."""

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn


def paged_adamw_8bit(params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """bitsandbytes' PagedAdamW8bit (optimizer state in 8 bits, paged to host memory under pressure) when the
    parameters are on a CUDA device and bitsandbytes is installed (``pip install medcap[gpu]``); otherwise
    torch's AdamW, with a warning saying why."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    reason = None
    if not any(p.is_cuda for p in tensors):
        reason = "the parameters are not on a CUDA device"
    else:
        try:
            import bitsandbytes
        except ImportError:
            reason = "bitsandbytes is not installed (pip install 'medcap[gpu]')"
    if reason is None:
        return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    warnings.warn(f"paged_adamw_8bit: {reason}; using torch.optim.AdamW (32-bit state) instead", stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped (and its gradient freed) by a hook as soon as that parameter's
    gradient is complete, so the gradients of the whole model never exist at once. To the learning-rate
    scheduler and to checkpoints it looks like a single optimizer: ``param_groups`` are the inner optimizers'
    own group dicts, so the scheduler's learning rates reach them. ``step`` and ``zero_grad`` do nothing (the
    hooks did it); gradient clipping and accumulation cannot work with it."""

    def __init__(self, param_groups: list[dict[str, Any]],
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
        self.inner: list[torch.optim.Optimizer] = []
        params = []
        for group in param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                optimizer = make_optimizer([{"params": [p], **options}])
                p.register_post_accumulate_grad_hook(self._stepper(optimizer))
                self.inner.append(optimizer)
                params.append(p)
        super().__init__(params, {})
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.inner]

    @staticmethod
    def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[nn.Parameter], None]:
        def step(_: nn.Parameter) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["inner"]) != len(self.inner):
            raise ValueError(f"the checkpoint holds {len(state_dict['inner'])} per-parameter optimizer states, the "
                             f"model trains {len(self.inner)} parameters")
        for optimizer, state in zip(self.inner, state_dict["inner"]):
            optimizer.load_state_dict(state)
        # loading gives each inner optimizer new group dicts: point at those, or the scheduler's learning rates
        # would go to the old ones, which no optimizer reads any more
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.inner]


def cosine_per_epoch(optimizer: torch.optim.Optimizer, num_training_steps: int, epochs: int, eta_min: float = 0.0,
                     last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """R2GenGPT's schedule: ``CosineAnnealingLR(T_max=epochs, eta_min)`` stepped once per epoch, here stepped per
    optimizer step with the epoch taken as ``step * epochs // num_training_steps``: ``step // steps_per_epoch`` when
    ``num_training_steps`` is a multiple of ``epochs``, otherwise the epochs spread over the steps as evenly as
    whole steps allow. During epoch e each group's lr is ``eta_min + (lr - eta_min) * (1 + cos(pi e / epochs)) / 2``:
    the full lr for the first epoch, never quite eta_min (the last step runs at e = epochs - 1), eta_min from
    ``num_training_steps`` on. A group whose lr is 0 stays at 0 (torch's ``CosineAnnealingLR`` would raise it
    towards eta_min)."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be at least 1, got {num_training_steps}")

    def factor(base_lr: float) -> Callable[[int], float]:
        def at(step: int) -> float:
            if base_lr == 0:
                return 1.0
            epoch = min(step * epochs // num_training_steps, epochs)
            return (eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2) / base_lr
        return at

    lambdas = [factor(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch)
