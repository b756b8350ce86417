import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcap.generation import beam_search, generate
from medcap.models import decoders
from medcap.models.builders import tiny_demo
from medcap.models.hf_export import save_hf_llama
from medcap.models.linear import FEW_ROWS, VOCAB_BLOCK, FewRowsLinear, FewRowsTiedProduct, linear, \
    use_few_rows_products
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


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_many_prompts_matches_transformers(num_beams, tmp_path):
    """20 prompts (60 rows with 3 beams) decode through the transposed products, the tied 49152-word output
    projection in blocks; transformers' generate on the same weights, one prompt at a time, is the reference."""
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
                           length_penalty=1.0, **settings)
    else:
        ours = generate(model, prompts, None, stop_ids=[-1], pad_id=0, **settings)
    assert len(seen) == 8 and all(seen)  # prefill (20 x 8 rows) and each decoding step (20 or 60 rows)
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
