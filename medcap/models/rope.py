"""torchtune's rotary position embeddings, with fewer operations per call and tables shared by a step's layers.

torchtune's ``RotaryPositionalEmbeddings`` (and ``Llama3ScaledRoPE``) index their cos / sin cache by the
positions and run ~10 operations on every call: two calls per layer per decoding step, each ~0.15 ms on a 2-core
CPU for a [32, 1, 9, 64] input, ~9 ms of a 90 ms decoding step of the demo model. ``rotate`` computes the same
pairs, ``(x0 c - x1 s, x1 c + x0 s)``, as ``x * cos + swapped(x) * signed_sin`` (``swapped`` exchanges the two
elements of each pair): the same two rounded products and one sum per element (a product with ``-s`` is the
negated product, ``a + (-b)`` is ``a - b``, and sums commute), so the result is torchtune's bit for bit, forward
and gradient (tests/test_rope.py), in 4 operations. Each is one elementwise kernel, so no compiler can fuse a
product and a sum into one differently rounded step (a complex product, ~3x faster still, does so in its scalar
tail on this CPU when head_dim / 2 is not a multiple of the vector width). The tables are built once per
positions tensor and length, and reused while the layers of one forward pass call with that tensor.
"""

import weakref

import torch
from torch import Tensor, nn
from torchtune.models.llama3_1 import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings

ROPES = (RotaryPositionalEmbeddings, Llama3ScaledRoPE)  # the classes whose cache layout and formula this repeats
TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # torchtune's module computes these in fp32


class _Tables:
    def __init__(self, rope: nn.Module, seq_len: int, input_pos: Tensor | None):
        self.positions = None if input_pos is None else weakref.ref(input_pos)
        self.cache, self.key = weakref.ref(rope.cache), _key(rope, seq_len, input_pos)
        pairs = rope.cache[:seq_len] if input_pos is None else rope.cache[input_pos]
        pairs = pairs.view(-1, seq_len, 1, pairs.shape[-2], 2)  # [1 or B, S, 1, head_dim / 2, (cos, sin)]
        cos, sin = pairs[..., 0], pairs[..., 1]
        self.cos = torch.stack([cos, cos], -1).flatten(-2)
        self.sin = torch.stack([-sin, sin], -1).flatten(-2)

    def current(self, rope: nn.Module, seq_len: int, input_pos: Tensor | None) -> bool:
        same = input_pos is None if self.positions is None else self.positions() is input_pos
        return same and self.cache() is rope.cache and self.key == _key(rope, seq_len, input_pos)


def _key(rope: nn.Module, seq_len: int, input_pos: Tensor | None) -> tuple:
    cache = rope.cache
    positions = None if input_pos is None else (input_pos.data_ptr(), _version(input_pos), tuple(input_pos.shape))
    # tables made under inference_mode are inference tensors, which autograd cannot save: not reused outside it
    return seq_len, cache.data_ptr(), _version(cache), cache.dtype, cache.device, positions, \
        torch.is_inference_mode_enabled()


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors keep no version counter


_TABLES: "weakref.WeakKeyDictionary[nn.Module, _Tables]" = weakref.WeakKeyDictionary()


def rotate(rope: nn.Module, x: Tensor, input_pos: Tensor | None = None) -> Tensor:
    """``rope(x, input_pos=input_pos)`` for ``x`` [B, S, heads, head_dim], bit for bit where ``rope`` is one of
    ``ROPES`` with its cache built, ``x`` and the cache in fp32 / bf16 / fp16 (otherwise, and while compiling,
    ``rope`` itself runs)."""
    if type(rope) not in ROPES or torch.compiler.is_compiling() or not getattr(rope, "is_cache_built", True) \
            or rope.cache.dtype not in TABLE_DTYPES or x.dtype not in TABLE_DTYPES:
        return rope(x, input_pos=input_pos)
    seq_len = x.shape[1]
    tables = _TABLES.get(rope)
    if tables is None or not tables.current(rope, seq_len, input_pos):
        tables = _TABLES[rope] = _Tables(rope, seq_len, input_pos)
    wide = x.float()
    pairs = wide.unflatten(-1, (-1, 2))
    swapped = torch.stack([pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (wide * tables.cos + swapped * tables.sin).type_as(x)
