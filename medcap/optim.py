"""Optimizer options of the training recipes: 8-bit paged AdamW, and the optimizer step run inside backward."""

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

    def __init__(self, param_groups: list[dict[str, Any]], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
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
