"""A KV cache whose attention covers only the positions written so far."""

import torch
from torch import Tensor
from torchtune.modules import KVCache, MultiHeadAttention


# UPDATED: torchtune.modules.KVCache - its update writes through an index tensor (an index_put per layer per step)
# and returns the whole preallocated cache, so every decoding step attends over (and, with grouped-query
# attention, copies) prompt + max_new_tokens positions. This one writes a slice at a position kept as a Python
# int and returns the filled prefix; the mask passed with it must then span that prefix only
# (``[B, S, filled + S]``).
class PrefixKVCache(KVCache):
    @classmethod
    def replacing(cls, cache: KVCache) -> "PrefixKVCache":
        """The same buffers (nothing reallocated), filled as far as ``cache``."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.register_buffer("k_cache", cache.k_cache, persistent=False)
        new.register_buffer("v_cache", cache.v_cache, persistent=False)
        new.register_buffer("cache_pos", cache.cache_pos, persistent=False)
        new.batch_size = cache.batch_size
        new.filled = cache.size
        return new

    @property
    def size(self) -> int:
        return self.filled

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.cache_pos -= self.filled
        self.filled = 0

    def update(self, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, seq_len, _ = k_val.shape
        start, end = self.filled, self.filled + seq_len
        if batch != self.k_cache.shape[0] or end > self.k_cache.shape[2]:
            raise ValueError(f"KV cache of {tuple(self.k_cache.shape)} (filled to {start}) cannot take keys of "
                             f"{tuple(k_val.shape)}")
        self.k_cache[:, :, start:end] = k_val
        self.v_cache[:, :, start:end] = v_val
        self.filled = end
        self.cache_pos.add_(seq_len)  # kept in step with ``filled`` for torchtune code that reads it
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


def use_prefix_caches(model: torch.nn.Module) -> list[PrefixKVCache]:
    """Replace the KV caches ``setup_caches`` put on ``model``'s attention layers by ``PrefixKVCache``s."""
    caches = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.kv_cache is not None:
            if not isinstance(module.kv_cache, PrefixKVCache):
                module.kv_cache = PrefixKVCache.replacing(module.kv_cache)
            caches.append(module.kv_cache)
    return caches
