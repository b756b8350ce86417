"""Mixed precision for training: the frozen LLM in bf16, the parts that train (encoder, projector, adapters:
small next to the LLM) kept in fp32 and computed in bf16 under autocast. In pure bf16 an update smaller than
half a bf16 step of its weight rounds away (lr 2e-5 on weights of ~0.02 is most updates); fp16 underflows
AdamW's epsilon and needs loss scaling, so it is refused for training."""

import torch

from medcap.checkpoint import adapter_keys

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_training_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise ValueError("dtype=fp16 cannot train here: its range underflows AdamW's epsilon and small gradients "
                         "(NaN or zero updates) without loss scaling; use dtype=bf16 (trained parts are kept in "
                         "fp32) or dtype=fp32")


def master_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"master_dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_master_dtype(master: torch.dtype, compute: torch.dtype) -> None:
    """Refuse trained parts kept in a lower precision than the ``compute`` dtype: autocast only lowers precision, so
    their weights would meet inputs of the higher one."""
    if torch.finfo(master).eps > torch.finfo(compute).eps:
        names = {dtype: name for name, dtype in DTYPES.items()}
        master_name, compute_name = names.get(master, master), names.get(compute, compute)
        raise ValueError(f"master_dtype={master_name} is less precise than dtype={compute_name}: the trained parts "
                         f"cannot be kept in a lower precision than the model computes in; leave master_dtype unset "
                         f"(fp32) or use dtype={master_name}")


def keep_trained_parts_in(model, master: torch.dtype, compute: torch.dtype) -> None:
    """Cast what trains (every tensor of a fully trained part, the adapters of a LoRA one) to ``master`` and,
    when that differs from the ``compute`` dtype the rest of the model is in, have the model run under autocast
    to ``compute``. A ``master`` less precise than ``compute`` is refused (``check_master_dtype``)."""
    check_master_dtype(master, compute)
    if master == compute:
        return
    for part, module in model.parts().items():
        mode = model.trainable[part]
        if mode == "full":
            module.to(master)
        elif mode in ("lora", "qlora"):
            adapters = adapter_keys(dict(module.named_parameters()))
            for name, param in module.named_parameters():
                if name in adapters:
                    param.data = param.data.to(master)
    model.compute_dtype = compute
