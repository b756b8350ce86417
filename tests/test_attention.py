import copy

import torch
from torch import nn
from torchtune.modules import KVCache, MultiHeadAttention, RotaryPositionalEmbeddings

from medcap.models.attention import MATH_MAX_KEYS, GroupedQueryAttention
from medcap.models.decoders import smollm2_135m, tiny_smollm2
from medcap.models.kv_cache import PrefixKVCache


def pair(num_heads=6, num_kv_heads=2, dim=48):
    """torchtune's attention and ours on the very same projections."""
    head_dim = dim // num_heads
    kw = dict(embed_dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
              q_proj=nn.Linear(dim, num_heads * head_dim, bias=False),
              k_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=False),
              v_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=False),
              output_proj=nn.Linear(dim, dim, bias=False),
              pos_embeddings=RotaryPositionalEmbeddings(head_dim, max_seq_len=256), max_seq_len=256)
    return MultiHeadAttention(**kw), GroupedQueryAttention(**kw)


def test_training_forward_and_gradients_equal_torchtune():
    torch.manual_seed(0)
    theirs, ours = pair()
    x = torch.randn(3, 10, 48, requires_grad=True)
    expected = theirs(x, x)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    got = ours(x, x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-6)


def test_cached_decoding_with_a_padding_mask_equals_torchtune():
    # left padding (row 1 starts at position 2), a prefill of 5 and 3 single-token steps through the caches
    torch.manual_seed(1)
    theirs, ours = pair()
    theirs.kv_cache = KVCache(2, 8, 2, 8, torch.float32)
    ours.kv_cache = PrefixKVCache.replacing(KVCache(2, 8, 2, 8, torch.float32))
    theirs.cache_enabled = ours.cache_enabled = True
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, :2] = False
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool)) & real[:, None, :]
    positions = (real.cumsum(1) - 1).clamp(min=0)
    x = torch.randn(2, 8, 48)
    with torch.no_grad():
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 8)]:
            expected = theirs(x[:, start:end], x[:, start:end], mask=causal[:, start:end],
                              input_pos=positions[:, start:end])
            got = ours(x[:, start:end], x[:, start:end], mask=causal[:, start:end, :end],
                       input_pos=positions[:, start:end])
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_smollm2_builds_it_and_keeps_the_state_dict_names():
    decoder = tiny_smollm2()
    assert all(type(layer.attn) is GroupedQueryAttention for layer in decoder.layers)
    assert "layers.0.attn.q_proj.weight" in decoder.state_dict()
    assert type(smollm2_135m(max_seq_len=8).layers[0].attn) is GroupedQueryAttention


def test_off_the_cpu_it_is_torchtunes_forward(monkeypatch):
    # CUDA's fused SDPA kernels take enable_gqa only without a mask: off the CPU the keys / values are copied per
    # head as torchtune does. The meta device stands in for a GPU here (shapes only, nothing computed).
    calls = []
    torchtune_forward = MultiHeadAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].device.type)
        return torchtune_forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "forward", counting)
    theirs, ours = pair()
    x = torch.randn(2, 5, 48)
    ours(x, x)
    assert calls == []
    ours.to("meta")
    out = ours(x.to("meta"), x.to("meta"), mask=torch.ones(2, 5, 5, dtype=torch.bool, device="meta"))
    assert calls == ["meta"] and out.shape == (2, 5, 48)


def sdpa_kernels_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.events() if "scaled_dot_product" in e.key}


def test_bf16_backprop_over_few_keys_takes_the_math_kernel_with_the_same_result():
    # the CPU's flash kernel is the slow one for short bf16 training sequences (see MATH_MAX_KEYS); over more keys,
    # in fp32 or without gradients it stays in use
    torch.manual_seed(2)
    theirs, ours = pair()
    reference = copy.deepcopy(theirs).float()  # torchtune's attention in fp32
    ours32 = copy.deepcopy(ours).float()
    ours.to(torch.bfloat16)
    mask = torch.tril(torch.ones(12, 12, dtype=torch.bool)).expand(2, 12, 12)
    x = torch.randn(2, 12, 48, dtype=torch.bfloat16, requires_grad=True)

    def backprop(module, x, **kw):
        return lambda: module(x, x, **kw).float().square().sum().backward()

    kernels = sdpa_kernels_run(backprop(ours, x, mask=mask))
    assert "aten::_scaled_dot_product_attention_math" in kernels
    assert not any("flash" in k for k in kernels)
    got = ours(x, x, mask=mask)
    (g_got,) = torch.autograd.grad(got.float().square().sum(), x)
    x_ref = x.detach().float().requires_grad_()
    expected = reference(x_ref, x_ref, mask=mask)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x_ref)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
    torch.testing.assert_close(g_got.float(), g_expected, rtol=0.05, atol=0.1)
    # training passes no mask (causal attention): the same kernel, the same result
    assert "aten::_scaled_dot_product_attention_math" in sdpa_kernels_run(backprop(ours, x))
    torch.testing.assert_close(ours(x, x).float(), reference(x_ref, x_ref), rtol=0.05, atol=0.05)

    with torch.no_grad():
        assert any("flash" in k for k in sdpa_kernels_run(lambda: ours(x, x, mask=mask)))
    x32 = torch.randn(2, 12, 48, requires_grad=True)
    assert any("flash" in k for k in sdpa_kernels_run(backprop(ours32, x32, mask=mask)))
    long = torch.randn(1, MATH_MAX_KEYS + 1, 48, dtype=torch.bfloat16, requires_grad=True)
    assert any("flash" in k for k in sdpa_kernels_run(backprop(ours, long)))
