"""Self-attention that lets SDPA share the key / value heads among the query heads (grouped-query attention)."""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from torchtune.modules import MultiHeadAttention

from medcap.models.linear import FusedProducts, fused_product
from medcap.models.rope import rotate


# UPDATED: torchtune.modules.MultiHeadAttention.forward - with fewer key / value heads than query heads it copies
# the keys and values num_heads / num_kv_heads times (while decoding: the whole cached prefix, every layer, every
# step) before calling SDPA. This forward does the same projections, RoPE, norms and cache update, and passes the
# num_kv_heads keys / values to SDPA with enable_gqa=True instead: same output, no copies (a decoding step's
# attention ~10x faster on a CPU at batch 32). Only on the CPU: CUDA's fused kernels take enable_gqa only in flash
# attention, which takes no mask, so masked calls would fall back to the unfused math kernel there. Block masks
# (packed samples) and other devices keep torchtune's own forward.
# In bf16 / fp16 with gradients, up to MATH_MAX_KEYS keys, the CPU's fused (flash) kernel is the slower one: forward
# + backward of [4, 9 heads, 52, 64] 4.3 ms against 1.5 ms for the unfused math kernel (8 x 128: 16.5 vs 11.1 ms;
# 2 x 256: 8.8 vs 9.4; 2-core EPYC), same error against fp64; there the math kernel runs (the demo's training step:
# 0.679 -> 0.648 s).
# Decoding on a CPU (autograd not recording, weights packed by medcap.models.linear.pack_products), the q, k and v
# projections of a self-attention call are one product on their stacked weights (``FusedProducts``), and RoPE
# rotates the queries and keys in one call. RoPE runs as ``medcap.models.rope.rotate`` everywhere on this path: the
# same numbers as torchtune's module in fewer operations. Together: a greedy decoding step of the demo model at
# 32 x 48 took 90.5 ms instead of 102.3 (median of 8 alternating runs, 2-core EPYC), with the same tokens.
MATH_MAX_KEYS = 128


class GroupedQueryAttention(MultiHeadAttention, FusedProducts):
    def fused_linears(self) -> tuple[nn.Module, ...]:
        # with as many key / value heads as query heads, forward is torchtune's, which multiplies them one by one
        return () if self.num_heads == self.num_kv_heads else (self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: Tensor, y: Tensor | None = None, *, mask=None, input_pos: Tensor | None = None) -> Tensor:
        if self.num_heads == self.num_kv_heads or isinstance(mask, BlockMask) or x.device.type != "cpu":
            return super().forward(x, y, mask=mask, input_pos=input_pos)
        b, s_x, _ = x.shape
        qkv = fused_product(x, self) if y is x else None
        if qkv is not None:  # [B, S, q heads + 2 kv heads, head_dim]
            qkv = qkv.view(b, s_x, -1, self.head_dim)
            qk, v = qkv[:, :, :self.num_heads + self.num_kv_heads], qkv[:, :, self.num_heads + self.num_kv_heads:]
            if self.pos_embeddings is not None:
                qk = rotate(self.pos_embeddings, qk, input_pos)
            q, k = qk[:, :, :self.num_heads], qk[:, :, self.num_heads:]
        else:
            q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
            if self.pos_embeddings is not None:
                q = rotate(self.pos_embeddings, q, input_pos)
        q = q.transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            if qkv is None:
                s_y = y.shape[1]
                k = self.k_proj(y).view(b, s_y, -1, self.head_dim)
                v = self.v_proj(y).view(b, s_y, -1, self.head_dim)
                if self.pos_embeddings is not None:
                    k = rotate(self.pos_embeddings, k, input_pos)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        # q requires grad only where autograd records (never under no_grad / inference_mode)
        short_backprop = q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad and k.shape[2] <= MATH_MAX_KEYS
        with sdpa_kernel(SDPBackend.MATH) if short_backprop else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask[:, None],
                dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=self.kv_cache is None and mask is None and self.is_causal, enable_gqa=True)
        return self.output_proj(out.transpose(1, 2).reshape(b, s_x, -1))
