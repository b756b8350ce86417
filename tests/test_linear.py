import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcap.generation import beam_search, generate
from medcap.models import decoders
from medcap.models.builders import SMOLLM2_IMAGE_ID, tiny_demo
from medcap.models.hf_export import save_hf_llama
from medcap.models.linear import _PACKED, FEW_ROWS, VOCAB_BLOCK, FewRowsLinear, FewRowsTiedProduct, linear, \
    pack_products, unpack_products, use_few_rows_products
from medcap.models.lora import AdaptedLinear


def transposed(out: torch.Tensor) -> bool:
    """Whether ``linear`` took the (weight @ x.T).T path: its result is then a transposed view."""
    return out.stride(-1) != 1


@pytest.mark.parametrize("out_features", [48, 2 * VOCAB_BLOCK + 5])  # the second goes in blocks (the last short)
@pytest.mark.parametrize("rows", [1, 8, 15, 16, 17, 64, 256, 257, 600])
def test_linear_equals_f_linear_and_is_transposed_for_few_rows_only(rows, out_features):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 40, generator=g)  # [batch, one position, dim], as in a decoding step
    w = torch.randn(out_features, 40, generator=g)
    with torch.no_grad():
        out = linear(x, w)
    assert out.shape == (rows, 1, out_features)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    few = FEW_ROWS[0] <= rows <= FEW_ROWS[1]
    if out_features > 2 * VOCAB_BLOCK:  # the logits come contiguous for the reductions over the vocabulary
        assert out.is_contiguous()
    else:
        assert transposed(out) == few


def test_with_autograd_recording_linear_is_f_linear():
    w = torch.randn(32, 24)
    x = torch.randn(20, 24, requires_grad=True)
    out = linear(x, w)  # the input needs a gradient (the frozen LLM in medcap training): F.linear
    assert not transposed(out)
    out.square().sum().backward()
    reference = x.detach().requires_grad_()
    F.linear(reference, w).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    assert not transposed(linear(x.detach(), w.requires_grad_()))  # a weight that trains: F.linear
    with torch.no_grad():
        assert transposed(linear(x, w))


def test_the_decoders_linears_are_swapped_keeping_names_and_parameters():
    decoder = decoders.tiny_smollm2()
    before = dict(decoder.named_parameters())
    keys = list(decoder.state_dict())
    use_few_rows_products(decoder)
    assert list(decoder.state_dict()) == keys
    assert all(p is before[name] for name, p in decoder.named_parameters())
    linears = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 and all(type(m) is FewRowsLinear for m in linears)
    assert isinstance(decoder.output.linear, FewRowsTiedProduct)  # tied: the product TiedLinear calls
    untied = decoders.tiny_llama3()
    use_few_rows_products(untied)
    assert type(untied.output) is FewRowsLinear


def test_adapters_wrap_the_swapped_linears():
    model = tiny_demo(trainable={"decoder": "lora"}, lora={"decoder": {"targets": ["q_proj", "w1"]}})
    layer = model.decoder.layers[0]
    assert isinstance(layer.attn.q_proj, AdaptedLinear) and isinstance(layer.mlp.w1, AdaptedLinear)
    assert type(layer.attn.k_proj) is FewRowsLinear and type(layer.mlp.w2) is FewRowsLinear


@pytest.mark.parametrize("pack_weights", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_many_prompts_matches_transformers(num_beams, pack_weights, tmp_path):
    """20 prompts (60 rows with 3 beams) decode through the transposed products, the tied 49152-word output
    projection in blocks, or through the packed weights; transformers' generate on the same weights, one prompt at
    a time, is the reference."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = tiny_demo().eval()
    hf = LlamaForCausalLM.from_pretrained(save_hf_llama(model, tmp_path / "hf", dtype=torch.float32),
                                          dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # no stop token on either side: every row runs max_new_tokens
    seen = []
    model.decoder.layers[0].mlp.w1.register_forward_hook(lambda m, i, out: seen.append(transposed(out)))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 49152, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(20)]
    settings = dict(max_new_tokens=8)
    if num_beams > 1:
        ours = beam_search(model, prompts, None, num_beams=num_beams, stop_ids=[-1], pad_id=0,
                           length_penalty=1.0, pack_weights=pack_weights, **settings)
    else:
        ours = generate(model, prompts, None, stop_ids=[-1], pad_id=0, pack_weights=pack_weights, **settings)
    # prefill (20 x 8 rows) and each decoding step (20 or 60 rows); packed products return contiguous rows
    assert len(seen) == 8 and seen == [not pack_weights] * 8
    assert (model.decoder.layers[0].mlp.w1 in _PACKED) == pack_weights
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=num_beams, eos_token_id=None,
                                    pad_token_id=0, length_penalty=1.0, early_stopping=False,
                                    **settings)
        assert tokens == reference[0, len(prompt):].tolist()


def test_under_autocast_the_products_are_those_of_f_linear():
    # validation decoding of a bf16 LLM next to fp32 trained parts runs under CPU autocast (medcap.precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=g)
    for out_features in (64, 2 * VOCAB_BLOCK + 5):
        w = torch.randn(out_features, 32, generator=g).bfloat16()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out, reference = linear(x, w), F.linear(x, w)
        assert out.dtype == reference.dtype == torch.bfloat16
        torch.testing.assert_close(out, reference)


def test_an_adapted_linear_adds_its_update_to_the_few_rows_product():
    torch.manual_seed(0)
    model = tiny_demo(trainable={"decoder": "lora"}, lora={"decoder": {"targets": ["q_proj"], "rank": 4, "alpha": 8}})
    q = model.decoder.layers[0].attn.q_proj
    nn.init.normal_(q.lora_b.weight)  # starts at zero
    for rows in (4, 20):
        x = torch.randn(rows, 1, q.in_dim)
        with torch.no_grad():
            expected = F.linear(x, q.weight) + 2.0 * F.linear(F.linear(x, q.lora_a.weight), q.lora_b.weight)
            torch.testing.assert_close(q(x), expected)


def mkldnn_products(fn) -> int:
    """How many products ``fn()`` ran on packed weights (oneDNN's linear)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def test_packed_products_equal_f_linear_up_to_rounding_and_follow_weight_changes():
    torch.manual_seed(0)
    decoder = tiny_demo().decoder  # its output projection is tied to the embedding
    weights = {p.data_ptr() for p in decoder.parameters()}
    held = pack_products(decoder, backward=True)  # one by one (decoding stacks q, k, v: see the fused tests)
    products = [m for m in decoder.modules() if type(m) is FewRowsLinear] + [decoder.output.linear]
    tied = decoder.output.tied_module.weight
    assert held == 2 * 4 * (tied.numel() + sum(m.weight.numel() for m in products[:-1]))
    q = decoder.layers[0].attn.q_proj
    x = torch.randn(3, 5, q.in_features)
    with torch.no_grad():
        assert mkldnn_products(lambda: q(x)) == 1
        torch.testing.assert_close(q(x), F.linear(x, q.weight), rtol=0, atol=1e-5)
        h = torch.randn(4, 1, tied.shape[1])
        assert mkldnn_products(lambda: decoder.output(h)) == 1
        torch.testing.assert_close(decoder.output(h), F.linear(h, tied), rtol=0, atol=1e-5)
        q.weight.mul_(2.0)  # an update in place: the packed copy is stale and not used
        assert mkldnn_products(lambda: q(x)) == 0
        assert torch.equal(q(x), F.linear(x, q.weight))
    assert pack_products(decoder, backward=True) == held  # refreshed
    with torch.no_grad():
        assert mkldnn_products(lambda: q(x)) == 1
        torch.testing.assert_close(q(x), F.linear(x, q.weight), rtol=0, atol=2e-5)
    # with autograd recording the products are F.linear's, and the gradients reach x and the weight
    x.requires_grad_(True)
    q.weight.requires_grad_(True)
    assert mkldnn_products(lambda: q(x)) == 0
    q(x).sum().backward()
    assert x.grad is not None and q.weight.grad is not None
    # nothing in the module: state dict, deepcopy and parameters unchanged
    assert {p.data_ptr() for p in decoder.parameters()} == weights
    assert set(decoder.state_dict()) == set(copy.deepcopy(decoder).state_dict())
    assert all(m in _PACKED for m in products)
    unpack_products(decoder)
    assert not any(m in _PACKED for m in products)
    assert pack_products(decoder, max_bytes=1024) == 0 and not any(m in _PACKED for m in products)
    # for decoding: the attention's q, k, v stacked as one copy under the attention module, the same bytes
    assert pack_products(decoder) == held // 2
    attn = decoder.layers[0].attn
    assert attn in _PACKED and not any(m in _PACKED for m in attn.fused_linears())


def test_packed_products_under_autocast_and_in_bf16():
    torch.manual_seed(0)
    decoder = decoders.tiny_llama3().to(torch.bfloat16)
    use_few_rows_products(decoder)
    pack_products(decoder)
    w1 = decoder.layers[0].mlp.w1
    x = torch.randn(20, w1.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert mkldnn_products(lambda: w1(x)) == 1
        out, reference = w1(x), F.linear(x, w1.weight)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
    with torch.no_grad():  # an fp32 input without autocast: F.linear's own dtype error, not a packed product
        with pytest.raises(RuntimeError):
            w1(x)


def test_generation_packs_the_weights_once_and_repacks_after_training():
    torch.manual_seed(0)
    model = tiny_demo(trainable={"decoder": "full"}).eval()
    prompts = [[5, 6, 7], [8, 9]]
    settings = dict(max_new_tokens=5, stop_ids=[-1], pad_id=0)
    unpacked = generate(model, prompts, None, pack_weights=False, **settings)
    q, attn = model.decoder.layers[0].attn.q_proj, model.decoder.layers[0].attn
    assert attn not in _PACKED
    assert generate(model, prompts, None, **settings) == unpacked
    first = _PACKED[attn]  # q, k, v stacked
    generate(model, prompts, None, **settings)
    assert _PACKED[attn] is first  # unchanged weights: kept for the next call
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.tensor([[5, 6, 7]])).float().pow(2).mean().backward()
    optimizer.step()
    refreshed = generate(model, prompts, None, **settings)  # the step changed every weight: packed afresh
    assert _PACKED[attn] is not first and _PACKED[attn].current(tuple(m.weight for m in attn.fused_linears()))
    assert refreshed == generate(model, prompts, None, pack_weights=False, **settings) != unpacked
    assert attn not in _PACKED and q not in _PACKED  # pack_weights=False drops them


def test_a_frozen_weights_packed_product_backpropagates_to_its_input():
    torch.manual_seed(0)
    decoder = tiny_demo().decoder  # the medcap method: the decoder frozen
    assert pack_products(decoder, backward=True) > 0
    w1 = decoder.layers[0].mlp.w1
    assert not w1.weight.requires_grad and _PACKED[w1].transposed is not None
    x = torch.randn(4, 7, w1.in_features)
    r = torch.randn(4, 7, w1.out_features)
    exact = (r.double() @ w1.weight.double()).float()  # d/dx of sum(r * (x @ W.T))
    for packed in (True, False):
        if not packed:
            unpack_products(decoder)
        xi = x.clone().requires_grad_(True)
        assert mkldnn_products(lambda: (w1(xi) * r).sum().backward()) == (2 if packed else 0)  # forward, backward
        torch.testing.assert_close(xi.grad, exact, rtol=0, atol=2e-5)
        assert w1.weight.grad is None


def train_one_step(trainable: dict, dtype: torch.dtype, pack_weights: bool, tmp_path) -> tuple:
    """One SGD step of the tiny demo model through ``medcap.training.train``: its trained parameters after it,
    how many products ran on packed weights, and whether w1's packed copy (with its transpose) was there during
    the step and after."""
    from medcap.training import TrainSettings, train

    torch.manual_seed(0)
    model = tiny_demo(trainable=trainable).to(dtype)
    size = model.vision.encoder.image_size
    tokens = torch.tensor([[SMOLLM2_IMAGE_ID] * model.tokens_per_image + [5, 6, 7, 8]] * 2)
    batch = {"tokens": tokens, "images": torch.randn(2, 3, size, size),
             "labels": tokens.masked_fill(tokens == SMOLLM2_IMAGE_ID, -100)}
    w1 = model.decoder.layers[0].mlp.w1
    seen = []
    w1.register_forward_hook(lambda m, i, o: seen.append(m in _PACKED and _PACKED[m].transposed is not None))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    settings = TrainSettings(max_steps=1, clip_grad_norm=None, pack_weights=pack_weights)
    count = mkldnn_products(lambda: train(model, optimizer, scheduler, iter([batch]), settings, output_dir=tmp_path,
                                          device=torch.device("cpu"), dtype=dtype))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trained, count, seen == [True], w1 in _PACKED


def test_training_multiplies_through_packed_frozen_fp32_weights_with_the_same_update(tmp_path):
    frozen = {"encoder": "full", "projector": "full", "decoder": "frozen"}
    packed, count, during, after = train_one_step(frozen, torch.float32, True, tmp_path / "a")
    # every product of the 2 layers (7 each) and the tied output projection, forward and backward
    assert count == 2 * (2 * 7 + 1) and during and not after
    plain, count, during, _ = train_one_step(frozen, torch.float32, False, tmp_path / "b")
    assert count == 0 and not during
    assert packed.keys() == plain.keys() and len(packed) > 4
    for name in packed:  # the vision side trained through the decoder: the same update up to rounding
        torch.testing.assert_close(packed[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trainable, dtype", [({"decoder": "full"}, torch.float32),
                                              ({"decoder": "frozen"}, torch.bfloat16)])
def test_training_leaves_trained_and_bf16_decoder_weights_unpacked(trainable, dtype, tmp_path):
    _, count, during, _ = train_one_step(trainable, dtype, True, tmp_path)
    assert count == 0 and not during


def test_lora_base_weights_are_packed_for_generation_and_training(tmp_path):
    lora = {"decoder": {"targets": ["q_proj"], "rank": 4, "alpha": 8}}
    _, count, _, _ = train_one_step({"decoder": "lora"}, torch.float32, True, tmp_path)
    assert count == 2 * (2 * 7 + 1)  # the adapted q_proj base weights among them
    torch.manual_seed(0)
    model = tiny_demo(trainable={"decoder": "lora"}, lora=lora).eval()
    q = model.decoder.layers[0].attn.q_proj
    nn.init.normal_(q.lora_b.weight)
    prompts, settings = [[5, 6, 7], [8, 9]], dict(max_new_tokens=5, stop_ids=[-1], pad_id=0)
    assert mkldnn_products(lambda: generate(model, prompts, None, pack_weights=False, **settings)) == 0
    unpacked = generate(model, prompts, None, pack_weights=False, **settings)
    assert mkldnn_products(lambda: generate(model, prompts, None, **settings)) == 5 * (2 * 7 + 1)
    assert q in _PACKED and generate(model, prompts, None, **settings) == unpacked


def test_a_recipe_config_turns_packing_off():
    from omegaconf import OmegaConf

    from medcap.runtime import decoding_settings

    assert "pack_weights" not in decoding_settings(OmegaConf.create({"max_new_tokens": 4}))  # generate's default
    settings = decoding_settings(OmegaConf.create({"max_new_tokens": 4, "pack_weights": False}))
    assert settings["pack_weights"] is False
    model = tiny_demo().eval()
    generate(model, [[5, 6, 7]], None, stop_ids=[-1], pad_id=0, max_new_tokens=4)
    assert model.decoder.layers[0].mlp.w2 in _PACKED
    generate(model, [[5, 6, 7]], None, stop_ids=[-1], pad_id=0, **settings)
    assert model.decoder.layers[0].mlp.w2 not in _PACKED


def test_a_parametrized_weight_is_not_packed_and_second_order_gradients_are_refused():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    decoder = tiny_demo().decoder
    w1, w2 = decoder.layers[0].mlp.w1, decoder.layers[0].mlp.w2
    parametrize.register_parametrization(w1, "weight", nn.Identity())  # a weight computed afresh at each access
    pack_products(decoder, backward=True)
    assert w1 not in _PACKED and w2 in _PACKED
    x = torch.randn(2, w2.in_features, requires_grad=True)
    (grad,) = torch.autograd.grad(w2(x).tanh().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def stacked_products_off(monkeypatch):
    from medcap.models.attention import GroupedQueryAttention

    monkeypatch.setattr(GroupedQueryAttention, "fused_linears", lambda self: ())


def test_decoding_multiplies_q_k_v_in_one_product_with_the_separate_products_numbers(monkeypatch):
    torch.manual_seed(0)
    model = tiny_demo().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 49152, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    settings = dict(max_new_tokens=6, stop_ids=[-1], pad_id=0)
    layers = len(model.decoder.layers)
    # per forward pass: q / k / v as one product, output, gate, up, down projections; the tied output once
    assert mkldnn_products(lambda: generate(model, prompts, None, **settings)) == 6 * (5 * layers + 1)
    stacked = generate(model, prompts, None, **settings)
    beams = beam_search(model, prompts, None, num_beams=3, length_penalty=1.0, **settings)
    attn = model.decoder.layers[0].attn
    assert attn in _PACKED and attn.q_proj not in _PACKED
    with monkeypatch.context() as m:
        stacked_products_off(m)
        assert mkldnn_products(lambda: generate(model, prompts, None, **settings)) == 6 * (7 * layers + 1)
        assert attn not in _PACKED and attn.q_proj in _PACKED
        assert generate(model, prompts, None, **settings) == stacked
        assert beam_search(model, prompts, None, num_beams=3, length_penalty=1.0, **settings) == beams
    # the logits too, bit for bit: each output column gets the sums it gets in its own product
    tokens = torch.randint(2, 49152, (4, 9), generator=g)
    pack_products(model.decoder)
    with torch.no_grad():
        logits = model(tokens)
        with monkeypatch.context() as m:
            stacked_products_off(m)
            pack_products(model.decoder)
            assert torch.equal(model(tokens), logits)


def test_a_stale_stacked_copy_is_not_used_and_adapters_or_training_keep_products_apart(tmp_path):
    torch.manual_seed(0)
    model = tiny_demo().eval()
    decoder = model.decoder
    pack_products(decoder)
    attn = decoder.layers[0].attn
    x = torch.randn(2, 3, attn.q_proj.in_features)
    with torch.no_grad():
        assert mkldnn_products(lambda: attn(x, x)) == 2  # stacked q / k / v, output projection
        attn.k_proj.weight.add_(0.5)  # one of the three changed: the stacked copy is stale
        assert mkldnn_products(lambda: attn(x, x)) == 1  # the output projection only
        fresh = attn(x, x)
        pack_products(decoder)
        torch.testing.assert_close(attn(x, x), fresh, rtol=0, atol=1e-5)
        assert mkldnn_products(lambda: attn(x, x)) == 2
    # autograd recording (training): the separate products
    leaf = x.clone().requires_grad_()
    assert mkldnn_products(lambda: attn(leaf, leaf)) == 0
    # training packs one by one, with transposes
    pack_products(decoder, backward=True)
    assert attn not in _PACKED and attn.q_proj in _PACKED and _PACKED[attn.q_proj].transposed is not None
    # as many key / value heads as query heads: torchtune's forward, which multiplies one by one
    mha = decoders.llama_decoder(vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=4, embed_dim=32,
                                 intermediate_dim=64, max_seq_len=16)
    use_few_rows_products(mha)
    pack_products(mha)
    assert mha.layers[0].attn not in _PACKED and mha.layers[0].attn.q_proj in _PACKED
    # an adapted q_proj: that layer's products stay separate (LoRA's update is added to q's)
    lora = {"decoder": {"targets": ["q_proj"], "rank": 4, "alpha": 8}}
    adapted = tiny_demo(trainable={"decoder": "lora"}, lora=lora).eval()
    pack_products(adapted.decoder)
    layer = adapted.decoder.layers[0].attn
    assert layer not in _PACKED and layer.q_proj in _PACKED and layer.k_proj in _PACKED
