"""Data-parallel training with FSDP2 (torch's ``fully_shard``) when a recipe runs under torchrun.

Every part of the vision-language model is inside the sharded model (each decoder layer, the vision encoder,
the projector, then the root), so the gradients of the encoder and the projector are reduced across ranks
like the decoder's: all ranks train the same weights. (The medcap seed attached its vision modules after
wrapping, so nothing synchronised them.)
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def init_from_env(device_name: str) -> torch.device | None:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (NCCL on CUDA, gloo on CPU) and return this
    rank's device; otherwise ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = device_name.startswith("cuda")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return device


def shard(model: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer, the vision encoder, the projector, then the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model.vision.encoder, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model.vision.projector, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
