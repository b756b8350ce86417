"""Data-parallel training with FSDP2 (torch's ``fully_shard``) when a recipe runs under torchrun.

Every part of the vision-language model is inside the sharded model (each decoder layer, the vision encoder,
the projector, then the root), so the gradients of the encoder and the projector are reduced across ranks
like the decoder's: all ranks train the same weights. (The medcap seed attached its vision modules after
wrapping, so nothing synchronised them.) BatchNorm normalises with each rank's own batch; its running statistics
are averaged over the ranks after every optimizer step (``average_batchnorm_stats``), so every rank holds the same
buffers too.
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
    """``fully_shard`` each decoder layer, the vision encoder, the projector, then the whole model. With fp32
    trained parts next to a bf16 LLM (``model.compute_dtype``), FSDP2 gathers parameters in the compute dtype
    and reduces gradients in fp32 onto the fp32 shards; BatchNorm layers kept in fp32 are sharded on their own and
    gathered in fp32, as autocast runs them in one process (their running statistics stay fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    compute = getattr(model, "compute_dtype", None)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else \
        MixedPrecisionPolicy()
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": policy}
    if hasattr(model, "vision") and getattr(model.vision.encoder, "channels_last", False):
        model.vision.encoder.set_channels_last(False)  # FSDP2 shards only contiguous (NCHW) parameters
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and compute is not None and any(
                p.dtype != compute for p in module.parameters()):
            fully_shard(module, **{**options, "mp_policy": MixedPrecisionPolicy()})
    for layer in model.decoder.layers:
        fully_shard(layer, **options)
    if hasattr(model, "vision"):
        fully_shard(model.vision.encoder, **options)
        fully_shard(model.vision.projector, **options)
    fully_shard(model, **options)
    return model


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """Set the running mean and variance of every BatchNorm in train mode to their mean over the ranks: one
    all-reduce, on gloo and NCCL alike. Not SyncBatchNorm (which refuses CPU tensors): each rank still normalises
    with its own batch's statistics."""
    if not dist.is_initialized():
        return
    stats = [buffer for module in model.modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
             for buffer in (module.running_mean, module.running_var)]
    if not stats:
        return
    flat = torch.cat([s.float().flatten() for s in stats])
    dist.all_reduce(flat)
    flat /= world_size()
    for s, value in zip(stats, flat.split([s.numel() for s in stats])):
        s.copy_(value.view_as(s))


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


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (the value itself in one process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every rank's ``value`` in rank order, on every rank (``[value]`` in one process)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def everywhere(flag: bool, model: nn.Module) -> bool:
    """``flag`` on every rank, for a loop that decides when to stop: a sharded model's forward is a collective,
    so every rank must run as many forward passes as the others (True only when it is True everywhere). A model
    that is not sharded decides for itself."""
    from torch.distributed.fsdp import FSDPModule

    if not dist.is_initialized() or not isinstance(model, FSDPModule):
        return flag
    t = torch.tensor(int(flag), device=next(model.parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _canonical(name: str) -> str:
    # activation checkpointing wraps layers; state-dict keys and the unwrapped model's names lack this part
    return name.replace("_checkpoint_wrapped_module.", "")


@torch.no_grad()
def load_from_rank0(model: nn.Module, source: nn.Module | None, device: torch.device) -> None:
    """Fill a sharded ``model`` whose weights are not loaded (built on the meta device: see
    ``medcap.runtime``) with the weights of ``source``, the same model built and loaded on rank 0's CPU
    (``None`` on the other ranks). One tensor at a time, rank 0 broadcasts it and every rank keeps its shard; NF4
    weights (QLoRA) are quantised on the device after the broadcast, as torchtune does. Non-persistent buffers
    (RoPE tables, relative-position indices) come from rank 0 too."""
    from torchao.dtypes.nf4tensor import NF4Tensor
    from torch.distributed.tensor import distribute_tensor
    from torchtune.training import load_from_full_model_state_dict

    source_state = source.state_dict() if source is not None else {}
    targets = model.state_dict()
    loaded = {}
    for key, target in targets.items():
        full = _broadcast_tensor(source_state.get(key), target, device, key)
        if isinstance(target, DTensor) and isinstance(target._local_tensor, NF4Tensor):
            load_from_full_model_state_dict(model, {key: full}, device, strict=False)
            continue
        if isinstance(target, DTensor):
            full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        loaded[key] = nn.Parameter(full, requires_grad=target.requires_grad) if isinstance(target, nn.Parameter) \
            else full
    model.load_state_dict(loaded, strict=False, assign=True)
    persistent = set(targets)
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in list(model.named_buffers()):
        key = _canonical(name)
        if key in persistent:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf in owner._non_persistent_buffers_set:
            value = _broadcast_tensor(source_buffers.get(key), buffer, device, key)
            owner.register_buffer(leaf, value, persistent=False)
    with torch.device(device):  # RoPE modules built on meta also keep a "cache built" flag: rebuild them
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()


def _broadcast_tensor(value: Tensor | None, like: Tensor, device: torch.device, key: str) -> Tensor:
    """Rank 0's ``value`` (a whole tensor shaped as ``like``) on ``device`` on every rank."""
    if is_rank_zero():
        if value is None:
            raise KeyError(f"rank 0's model has no {key!r} to broadcast")
        value = full_tensor(value)
        full = value.to(device=device, dtype=like.dtype).contiguous()  # e.g. a channels-last conv weight
    else:
        full = torch.empty(like.shape, dtype=like.dtype, device=device)
    dist.broadcast(full, src=0)
    return full
