"""The decoder's linear layers, multiplied the faster way round for the few rows of a decoding step on a CPU.

A decoding step multiplies one row per sequence (16-256 rows) by every weight. For such shapes MKL's CPU product
``weight @ x.T`` runs 1.2-1.6x faster (each product timed alone) than ``x @ weight.T`` (what ``F.linear`` asks)
and gives the same numbers bit for bit (checked from 64 to 14336 wide on the CPU measured); the output
projection's [vocabulary, dim] weight goes in blocks of 4096 rows, which streams it ~1.2x faster again. The result
is a transposed view, so a later reduction over it may round its last bit differently than after ``F.linear``;
decoded tokens are those of transformers in every benchmark row (benchmarks/vs_transformers.py) and test. Below 16
rows the transposed order rounds differently and is not faster; with autograd recording, or off the CPU, it is
``F.linear`` as before.

Faster still where ``pack_products`` has been called (on a CPU ``medcap.generation`` does, and ``medcap.training``
for frozen fp32 weights): oneDNN's own blocked copy of each weight, made once and reused while the weight is
unchanged, multiplies 1.2-2.9x faster than MKL (which re-packs the weight on every call) at 1-1024 rows in fp32 and
~1.4x at 1-224 rows in bf16 (2-core EPYC, 30 x [1536, 576] + [49152, 576] weights streamed from memory). Its sums
run in another order: results differ from ``F.linear``'s by rounding (fp32: ~5e-6 at unit scale, where
``F.linear`` is ~2.5e-6 from fp64).
"""

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.tied_linear import Linear as TiedProduct

FEW_ROWS = (16, 256)
VOCAB_BLOCK = 4096  # rows of a large output weight multiplied at a time
PACK_DTYPES = (torch.float32, torch.bfloat16)
PACK_MAX_BYTES = 4 * 2**30  # pack_products leaves larger decoders alone: the copies double their weights' memory


class PackedWeight:
    """oneDNN's blocked copy of a weight (of several, stacked as one: ``FusedProducts``), for products on a CPU;
    valid while each weight is the same tensor at the same storage and version (an optimizer step or a load into it
    changes the version; a write through ``.data`` does not: call ``pack_products`` again after one). With
    ``backward``, also one of its transpose, for the input gradient of a frozen weight's product."""

    def __init__(self, weights: tuple[Tensor, ...], backward: bool = False):
        self.key, self.weights = _keys(weights), [weakref.ref(w) for w in weights]
        weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        self.tensor = _pack(weight)
        self.transposed = _pack(weight.t().contiguous()) if backward else None

    def current(self, weights: tuple[Tensor, ...]) -> bool:
        return (len(weights) == len(self.weights) and all(ref() is w for ref, w in zip(self.weights, weights))
                and self.key == _keys(weights))


def _key(weight: Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


def _keys(weights: tuple[Tensor, ...]) -> tuple:
    return tuple(_key(w) for w in weights)


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 32)  # 32: a row-count hint only


def _product_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU product of ``x`` runs in: autocast's where it is on, else ``x``'s."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _packed_product(x: Tensor, packed: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class _FrozenPackedProduct(torch.autograd.Function):
    """``x @ weight.T`` for a frozen weight, forward and input gradient on its packed copies."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: PackedWeight) -> Tensor:
        ctx.packed = packed
        return _packed_product(x, packed.tensor)

    @staticmethod
    @once_differentiable  # oneDNN's product has no derivative of its own: a second-order gradient is refused
    def backward(ctx, grad: Tensor):
        return _packed_product(grad.contiguous(), ctx.packed.transposed), None


# the packed copy of each module's weight, beside the module (not in it: state dicts, deepcopy and .to() never see
# it) and gone with it
_PACKED: "weakref.WeakKeyDictionary[nn.Module, PackedWeight]" = weakref.WeakKeyDictionary()


def few_rows(x: Tensor, weight: Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and FEW_ROWS[0] <= rows <= FEW_ROWS[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: Tensor, weight: Tensor, owner: nn.Module | None = None) -> Tensor:
    """``F.linear(x, weight)`` (no bias): with the packed copy ``pack_products`` made for ``owner``'s weight where
    it is current and in the product's dtype (autograd recording: only a frozen weight with a packed transpose),
    else as ``(weight @ x.T).T`` where ``few_rows`` says that is faster."""
    packed = None if owner is None or torch.compiler.is_compiling() else _PACKED.get(owner)
    if packed is not None and x.device.type == "cpu" and packed.current((weight,)):
        dtype = _product_dtype(x)
        recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if dtype == weight.dtype and not recording:
            return _packed_product(x.to(dtype), packed.tensor)
        if dtype == weight.dtype and not weight.requires_grad and packed.transposed is not None:
            return _FrozenPackedProduct.apply(x.to(dtype), packed)
    if not few_rows(x, weight):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1]).t()
    if weight.shape[0] > 2 * VOCAB_BLOCK:  # logits: made contiguous block by block, for the reductions over them
        out = torch.cat([torch.mm(block, rows).t() for block in weight.split(VOCAB_BLOCK)], dim=1)
    else:
        out = torch.mm(weight, rows).t()  # a transposed view: the layers' next steps read it as it is
    return out.view(*x.shape[:-1], weight.shape[0])


class FusedProducts:
    """A module whose forward multiplies one input by several of its bias-free linears' weights (attention's q, k,
    v projections): ``pack_products`` packs those weights stacked as one, and ``fused_product`` multiplies by it in
    one call, the outputs side by side. oneDNN gives each output column the same sums as the separate products
    (bit for bit, checked at 1-500 rows for [576 + 192 + 192, 576]), in ~25% less time at 32 rows."""

    def fused_linears(self) -> tuple[nn.Module, ...]:
        """The linears whose products ``fused_product`` computes together, in output order (none: no fusion)."""
        raise NotImplementedError


def fused_product(x: Tensor, owner: FusedProducts) -> Tensor | None:
    """``x`` multiplied by each of ``owner.fused_linears()``'s weights, concatenated on the last dimension, from
    the stacked copy ``pack_products`` made, if it is current and autograd does not record; otherwise None."""
    packed = None if torch.compiler.is_compiling() else _PACKED.get(owner)
    if packed is None or x.device.type != "cpu":
        return None
    weights = tuple(linear.weight for linear in owner.fused_linears())
    dtype = _product_dtype(x)
    recording = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if recording or dtype != weights[0].dtype or not packed.current(weights):
        return None
    return _packed_product(x.to(dtype), packed.tensor)


# UPDATED: torch.nn.Linear.forward - the decoder's bias-free projections use ``linear`` above.
class FewRowsLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self) if self.bias is None else super().forward(x)


# UPDATED: torchtune.modules.tied_linear.Linear.forward - the tied output projection uses ``linear`` above; it
# stays the module TiedLinear calls, so torchtune's hooks on it (activation offloading) still find it.
class FewRowsTiedProduct(TiedProduct):
    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return linear(x, weight, self)


def use_few_rows_products(decoder: TransformerDecoder) -> None:
    """Make ``decoder``'s plain ``nn.Linear``s (attention, MLP, untied output) ``FewRowsLinear``s holding the same
    parameters, and its tied output projection call ``FewRowsTiedProduct``. Names and state dicts do not change."""
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                with torch.device("meta"):
                    swapped = FewRowsLinear(child.in_features, child.out_features, bias=False)
                swapped.weight = child.weight  # the same Parameter: loaded weights and requires_grad kept
                swapped.train(child.training)
                setattr(parent, name, swapped)
    if isinstance(decoder.output, TiedLinear):
        decoder.output.linear = FewRowsTiedProduct()


def _products(decoder: nn.Module) -> list[nn.Module]:
    # a TiedLinear is no nn.Module: its product module is not among the decoder's modules
    tied = [decoder.output.linear] if isinstance(getattr(decoder, "output", None), TiedLinear) else []
    return list(decoder.modules()) + tied


def _packable(module: nn.Module, decoder: nn.Module) -> Tensor | None:
    """The weight ``linear`` multiplies for ``module`` (one of ``decoder``'s products), if it can be packed."""
    from medcap.models.lora import AdaptedLinear  # lora imports this module

    if parametrize.is_parametrized(module):  # its weight is computed afresh at each access
        return None
    if isinstance(module, FewRowsLinear) and module.bias is None:
        weight = module.weight
    elif isinstance(module, AdaptedLinear) and not (module._quantize_base or module.use_bias):
        weight = module.weight
    elif isinstance(module, FewRowsTiedProduct) and isinstance(getattr(decoder, "output", None), TiedLinear):
        weight = decoder.output.tied_module.weight
    else:
        return None
    # a plain tensor (not a DTensor under FSDP, NF4 or another subclass) with a version counter
    plain = type(weight) in (torch.Tensor, nn.Parameter) and not weight.is_inference()
    return weight if plain and weight.device.type == "cpu" and weight.dtype in PACK_DTYPES else None


def pack_products(decoder: nn.Module, max_bytes: int = PACK_MAX_BYTES, backward: bool = False,
                  compute_dtype: torch.dtype | None = None) -> int:
    """Make (or refresh, where a weight changed since) the packed copies ``linear`` uses for ``decoder``'s
    products on a CPU; none are kept where they would take more than ``max_bytes``, nor for a decoder sharded by
    FSDP. ``compute_dtype`` (the autocast dtype the model runs under, if any): only weights of that dtype, the
    others' products being cast. With ``backward`` (training), only frozen fp32 weights, each with a packed
    transpose for the input gradient (1.15x faster training step of the demo model, frozen LLM, 4 x 56 tokens;
    1.03x at 8 x 128); without, every weight (packed transposes already made are kept), and the linears of each
    ``FusedProducts`` module stacked as one weight instead of one by one. Returns the bytes held."""
    modules = _products(decoder)
    # in training only fp32 gains (a bf16 product on a CPU is oneDNN's already: same speed, same numbers)
    weights = {module: w for module in modules if (w := _packable(module, decoder)) is not None
               and (compute_dtype is None or w.dtype == compute_dtype)
               and not (backward and (w.requires_grad or w.dtype != torch.float32))}
    distinct = {_key(w): w for w in weights.values()}
    sharded = any(isinstance(p, DTensor) for p in decoder.parameters())
    if sharded or sum(w.numel() * w.element_size() for w in distinct.values()) * (2 if backward else 1) > max_bytes:
        weights = {}
    plan = {module: (w,) for module, w in weights.items()}
    if not backward:  # decoding: a FusedProducts module's linears as one stacked weight (training: one by one)
        for module in modules:
            linears = module.fused_linears() if isinstance(module, FusedProducts) else ()
            stacked = tuple(weights.get(linear) for linear in linears)
            if linears and all(type(linear) is FewRowsLinear for linear in linears) and None not in stacked \
                    and len({w.dtype for w in stacked}) == 1:
                plan[module] = stacked
                for linear in linears:
                    del plan[linear]
    packed = {}  # by weights: a tied weight is packed once
    for module in modules:
        stacked = plan.get(module)
        if stacked is None:
            _PACKED.pop(module, None)
            continue
        key, current = _keys(stacked), _PACKED.get(module)
        if current is None or not current.current(stacked) or (backward and current.transposed is None):
            current = packed[key] if key in packed else PackedWeight(stacked, backward)
        packed[key] = _PACKED[module] = current
    return sum(t.numel() * t.element_size() for p in packed.values() for t in (p.tensor, p.transposed)
               if t is not None)


def unpack_products(decoder: nn.Module) -> None:
    """Drop the packed copies ``pack_products`` made for ``decoder``."""
    for module in _products(decoder):
        _PACKED.pop(module, None)
