"""LoRA and QLoRA adapters for the parts of a vision-language model.

- Separate projections (the decoder's ``q_proj`` / ``v_proj`` / ..., any ``nn.Linear`` named in ``targets``)
  become torchtune ``LoRALinear``s built around the loaded weight; with ``quantize_base`` (QLoRA) that weight is
  stored in NF4 and every other linear of the decoder layers is frozen in NF4 too.
- Fused projections (timm's ``qkv`` in Swin and ViT, ``nn.MultiheadAttention`` in open_clip's own ViTs) take
  ``targets`` ``q`` / ``k`` / ``v``: a LoRA pair is added to each chosen third of the output, as R2GenGPT's
  delta mode adapts the query and value of the Swin attention.

Parameter names stay those of the plain model (``...q_proj.weight``, ``...qkv.weight``), so weights saved
from a model without adapters load into one with adapters and the reverse.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4
from torchtune.modules.peft import LoRALinear

from medcap.models import linear as products

FUSED_QKV = {"q": 0, "k": 1, "v": 2}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


@dataclass
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


class AdaptedLinear(LoRALinear):
    # UPDATED: torchtune.modules.peft.LoRALinear - built around an already loaded nn.Linear (its weight kept, or
    # quantised to NF4 for QLoRA) instead of drawing a fresh random base weight that would then be overwritten.
    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float, quantize_base: bool) -> "AdaptedLinear":
        with torch.device("meta"):
            self = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                       use_bias=linear.bias is not None)
        weight = linear.weight.detach()
        self.lora_a.to_empty(device=weight.device).to(weight.dtype)
        self.lora_b.to_empty(device=weight.device).to(weight.dtype)
        self.initialize_parameters()
        self._quantize_base = quantize_base
        self.weight = nn.Parameter(nf4(weight) if quantize_base else weight, requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return self

    # UPDATED: torchtune.modules.peft.LoRALinear.forward - a plain (not NF4) base weight without bias multiplies a
    # decoding step's few rows through medcap.models.linear.linear, as the decoder's other linears do.
    def forward(self, x: Tensor) -> Tensor:
        if self._quantize_base or self.use_bias:
            return super().forward(x)
        out = products.linear(x, self.weight, self)
        if self.disabled:
            return out
        return out + (self.alpha / self.rank) * self.lora_b(self.lora_a(self.dropout(x)))

    def merged_weight(self) -> Tensor:
        base = dequantize(self.weight)
        return base + (self.alpha / self.rank) * (self.lora_b.weight @ self.lora_a.weight).to(base.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA's base layers without adapters)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(nf4(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        out = linear_nf4(input=x, weight=self.weight)
        return out if self.bias is None else out + self.bias


class FusedLoRALinear(nn.Module):
    """A frozen fused projection (``out = [q | k | v]``) with a LoRA pair on each chosen slice of the output."""

    def __init__(self, linear: nn.Linear, slices: list[int], num_slices: int, rank: int, alpha: float,
                 dropout: float):
        super().__init__()
        if linear.out_features % num_slices:
            raise ValueError(f"a fused projection of {linear.out_features} outputs does not split into {num_slices}")
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.slices, self.num_slices, self.rank, self.alpha = sorted(slices), num_slices, rank, alpha
        self.width = linear.out_features // num_slices
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_a = nn.ModuleList(nn.Linear(linear.in_features, rank, bias=False, **factory) for _ in self.slices)
        self.lora_b = nn.ModuleList(nn.Linear(rank, self.width, bias=False, **factory) for _ in self.slices)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for a, b in zip(self.lora_a, self.lora_b):  # as LoRALinear: the adapted layer starts equal to the base
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def merged_weight(self) -> Tensor:
        return with_slice_updates(self.weight, self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        dropped = self.dropout(x)
        pieces = list(out.split(self.width, dim=-1))
        for s, a, b in zip(self.slices, self.lora_a, self.lora_b):
            pieces[s] = pieces[s] + (self.alpha / self.rank) * b(a(dropped))
        return torch.cat(pieces, dim=-1)


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (open_clip's own ViT towers, e.g. CLIP ViT-L/14-336) with LoRA on slices of
    its fused input projection ``in_proj_weight``. The update is applied to the weight (``W + scale * B @ A`` in
    the chosen slices), so LoRA dropout, which acts on the layer input, cannot be expressed here."""

    @classmethod
    def wrap(cls, mha: nn.MultiheadAttention, slices: list[int], rank: int, alpha: float) -> "LoRAMultiheadAttention":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("LoRA supports nn.MultiheadAttention with one fused input projection only")
        weight = mha.in_proj_weight
        with torch.device("meta"):
            self = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                       batch_first=mha.batch_first)
        self.in_proj_weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.in_proj_bias = None if mha.in_proj_bias is None else nn.Parameter(mha.in_proj_bias.detach(),
                                                                               requires_grad=False)
        self.out_proj = mha.out_proj.requires_grad_(False)
        self.slices, self.rank, self.alpha, self.width = sorted(slices), rank, alpha, mha.embed_dim
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.ModuleList(nn.Linear(mha.embed_dim, rank, bias=False, **factory) for _ in self.slices)
        self.lora_b = nn.ModuleList(nn.Linear(rank, mha.embed_dim, bias=False, **factory) for _ in self.slices)
        for a, b in zip(self.lora_a, self.lora_b):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        return self

    def merged_weight(self) -> Tensor:
        return with_slice_updates(self.in_proj_weight, self)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.merged_weight(), self.in_proj_bias, None, None,
            False, self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first else out), weights


def with_slice_updates(weight: Tensor, layer: nn.Module) -> Tensor:
    """``weight`` plus each LoRA pair's ``scale * B @ A`` in its slice of the output rows."""
    pieces = list(weight.split(layer.width, dim=0))
    for s, a, b in zip(layer.slices, layer.lora_a, layer.lora_b):
        pieces[s] = pieces[s] + (layer.alpha / layer.rank) * (b.weight @ a.weight)
    return torch.cat(pieces, dim=0)


def nf4(weight: Tensor, block_size: int = 64) -> NF4Tensor:
    """``weight`` in NF4: 64 weights per block, as QLoRA; the block scalers are quantised in groups of 256 where
    the block count allows and of the largest power of two dividing it otherwise (SmolLM2's 576-wide layers)."""
    if weight.numel() % block_size:
        raise ValueError(f"NF4 needs a weight size divisible by {block_size}; this one is {tuple(weight.shape)}")
    blocks = weight.numel() // block_size
    return to_nf4(weight, block_size=block_size, scaler_block_size=math.gcd(blocks, 256))


ADAPTERS = (AdaptedLinear, FusedLoRALinear, LoRAMultiheadAttention)


def dequantize(weight: Tensor) -> Tensor:
    return weight.get_original_weight() if isinstance(weight, NF4Tensor) else weight


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def add_lora(module: nn.Module, settings: LoRASettings, quantize_base: bool = False, part: str = "module") -> list[str]:
    """Freeze ``module`` and put adapters on the linear layers ``settings.targets`` name (the last component of
    the module path, or ``q`` / ``k`` / ``v`` for the thirds of a fused ``qkv`` projection). With
    ``quantize_base`` the remaining linears named in ``DECODER_LINEARS`` are frozen in NF4. Returns the names of
    the adapted layers; ValueError when a target matches nothing."""
    module.requires_grad_(False)
    targets = set(settings.targets)
    fused = sorted(FUSED_QKV[t] for t in targets & FUSED_QKV.keys())
    adapted, matched = [], set()
    for name, layer in list(module.named_modules()):
        if isinstance(layer, nn.MultiheadAttention) and fused:
            if settings.dropout:
                raise ValueError(f"lora dropout={settings.dropout} cannot act on {part} layer {name} "
                                 f"(nn.MultiheadAttention takes the update on its weight): set dropout to 0")
            _replace(module, name, LoRAMultiheadAttention.wrap(layer, fused, settings.rank, settings.alpha))
            adapted.append(name)
            matched |= targets & FUSED_QKV.keys()
            continue
        if not isinstance(layer, nn.Linear) or isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue
        leaf = name.rpartition(".")[2]
        if leaf in targets:
            _replace(module, name, AdaptedLinear.wrap(layer, settings.rank, settings.alpha, settings.dropout,
                                                      quantize_base))
            adapted.append(name)
            matched.add(leaf)
        elif leaf == "qkv" and fused:
            _replace(module, name, FusedLoRALinear(layer, fused, 3, settings.rank, settings.alpha, settings.dropout))
            adapted.append(name)
            matched |= targets & FUSED_QKV.keys()
        elif quantize_base and leaf in DECODER_LINEARS:
            _replace(module, name, NF4Linear(layer))
    if targets - matched:
        linears = sorted({n.rpartition(".")[2] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        fused = " (q / k / v need a fused 'qkv' projection)" if targets & FUSED_QKV.keys() else ""
        raise ValueError(f"lora targets {sorted(targets - matched)} match no linear layer of the {part}; its linear "
                         f"layers are named {linears or 'nothing: it has none'}{fused}")
    for layer in module.modules():
        if isinstance(layer, ADAPTERS):
            layer.lora_a.requires_grad_(True)
            layer.lora_b.requires_grad_(True)
    return adapted


def adapter_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.state_dict()``) of the adapter weights inside ``module``."""
    return {name for name, _ in module.named_parameters() if ".lora_a." in name or ".lora_b." in name}


def merged_tensors(module: nn.Module) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Tensor]]:
    """(shape per key, a function computing one key's tensor) of ``module``'s state dict with every adapter
    folded into its base weight (computed in fp32) and NF4 weights dequantised: the keys of the plain model.
    Nothing is computed until a key is asked for, so a whole LLM can be merged one tensor at a time."""
    state = {k: v for k, v in module.state_dict().items() if ".lora_a." not in k and ".lora_b." not in k}
    adapted = {}
    for name, layer in module.named_modules():
        if isinstance(layer, ADAPTERS):
            key = "in_proj_weight" if isinstance(layer, nn.MultiheadAttention) else "weight"
            adapted[f"{name.replace('_checkpoint_wrapped_module.', '')}.{key}"] = layer

    def tensor(key: str) -> Tensor:
        if key in adapted:
            return merged_fp32(adapted[key])
        return dequantize(state[key]).detach()

    return {k: tuple(v.shape) for k, v in state.items()}, tensor


def merged_fp32(layer: nn.Module) -> Tensor:
    """An adapted layer's base weight plus its LoRA update(s), in fp32."""
    base = dequantize(layer.in_proj_weight if isinstance(layer, nn.MultiheadAttention) else layer.weight).float()
    scale = layer.alpha / layer.rank
    if isinstance(layer, AdaptedLinear):
        return base + scale * (layer.lora_b.weight.float() @ layer.lora_a.weight.float())
    pieces = list(base.split(layer.width, dim=0))
    for s, a, b in zip(layer.slices, layer.lora_a, layer.lora_b):
        pieces[s] = pieces[s] + scale * (b.weight.float() @ a.weight.float())
    return torch.cat(pieces, dim=0)


def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with every adapter folded into its base weight and NF4 weights dequantised: the
    keys of the plain model, loadable without adapters."""
    state = {k: v for k, v in module.state_dict().items() if ".lora_a." not in k and ".lora_b." not in k}
    for name, layer in module.named_modules():
        if isinstance(layer, ADAPTERS):
            key = "in_proj_weight" if isinstance(layer, nn.MultiheadAttention) else "weight"
            state[f"{name}.{key}"] = layer.merged_weight().detach()
    return {k: dequantize(v).detach() for k, v in state.items()}
