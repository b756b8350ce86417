import pytest
import torch
from torchtune.modules import KVCache

from medcap.models.kv_cache import PrefixKVCache, use_prefix_caches
from tests.tiny_vlm import tiny_vlm


def test_prefix_cache_returns_only_what_was_written_and_matches_torchtune_there():
    ours = PrefixKVCache.replacing(KVCache(batch_size=2, max_seq_len=10, num_kv_heads=3, head_dim=4,
                                           dtype=torch.float32))
    reference = KVCache(batch_size=2, max_seq_len=10, num_kv_heads=3, head_dim=4, dtype=torch.float32)
    for length in (4, 1, 1):
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        k_ours, v_ours = ours.update(k, v)
        k_ref, v_ref = reference.update(k, v)
        assert k_ours.shape[2] == ours.size == reference.size  # the filled prefix, not the 10 allocated
        torch.testing.assert_close(k_ours, k_ref[:, :, :ours.size], rtol=0, atol=0)
        torch.testing.assert_close(v_ours, v_ref[:, :, :ours.size], rtol=0, atol=0)
    assert ours.size == 6 and int(ours.cache_pos[0]) == 6  # torchtune's own position counter kept in step
    with pytest.raises(ValueError, match=r"filled to 6\) cannot take keys of \(2, 3, 5, 4\)"):
        ours.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    ours.reset()
    assert ours.size == 0 and int(ours.cache_pos[0]) == 0 and not ours.k_cache.any()


def test_setup_caches_then_prefix_caches_on_every_attention_layer_sharing_the_buffers():
    model = tiny_vlm()
    model.setup_caches(2, torch.float32, decoder_max_seq_len=12)
    buffers = [layer.attn.kv_cache.k_cache for layer in model.decoder.layers]
    caches = use_prefix_caches(model)
    assert len(caches) == len(model.decoder.layers)
    assert all(isinstance(layer.attn.kv_cache, PrefixKVCache) for layer in model.decoder.layers)
    assert all(c.k_cache is b for c, b in zip(caches, buffers))  # nothing reallocated
    assert use_prefix_caches(model) == caches  # a second call changes nothing
