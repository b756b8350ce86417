import pytest
import torch
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor

from medcap.checkpoint import load_checkpoint, save_checkpoint, trained_state_dict
from medcap.models import builders
from medcap.models.lora import (AdaptedLinear, FusedLoRALinear, LoRAMultiheadAttention, LoRASettings, NF4Linear,
                                add_lora, merged_state_dict)


def fused_inputs(model, batch=2, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.vision.encoder.image_size
    tokens = torch.cat([torch.full((batch, model.tokens_per_image), model.image_token_id),
                        torch.randint(2, 1000, (batch, text), generator=g)], dim=1)
    return {"tokens": tokens, "encoder_input": {"image": {"images": torch.randn(batch, 3, size, size, generator=g)}}}


def build(builder, seed=0, **kwargs):
    torch.manual_seed(seed)
    return builder(**kwargs).eval()


def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_b." in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_r2gengpt_delta_trains_exactly_the_qv_adapters_and_the_mapper():
    model = builders.tiny_llama2_swin(trainable={"encoder": "lora", "projector": "full", "decoder": "frozen"},
                                      lora={"encoder": {"rank": 16, "alpha": 16, "dropout": 0.1}})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trained if n.startswith("encoders.image.encoder.")}
    assert trained - adapters == {n for n, _ in model.vision.projector.named_parameters(prefix="encoders.image.projector")}
    qkv = [n for n, m in model.vision.encoder.named_modules() if isinstance(m, FusedLoRALinear)]
    assert len(qkv) == 4  # one attention per stage of the tiny Swin
    assert adapters == {f"encoders.image.encoder.{q}.{ab}.{i}.weight" for q in qkv for ab in ("lora_a", "lora_b")
                        for i in (0, 1)}
    layer = model.vision.encoder.get_submodule(qkv[0])
    assert layer.slices == [0, 2] and layer.rank == 16 and layer.lora_a[0].weight.shape[0] == 16


def test_fused_lora_adapts_only_the_query_and_value_thirds_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    layer = FusedLoRALinear(base, [0, 2], 3, rank=2, alpha=4.0, dropout=0.0)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    for b in layer.lora_b:
        nn.init.normal_(b.weight)
    out, ref = layer(x), base(x)
    assert torch.equal(out[:, 8:16], ref[:, 8:16])  # the key third is untouched
    assert not torch.allclose(out[:, :8], ref[:, :8]) and not torch.allclose(out[:, 16:], ref[:, 16:])
    q_update = 2.0 * (layer.lora_b[0].weight @ layer.lora_a[0].weight)  # alpha / rank = 2
    assert torch.allclose(out[:, :8] - ref[:, :8], x @ q_update.T, atol=1e-5)
    assert torch.allclose(nn.functional.linear(x, layer.merged_weight(), base.bias), out, atol=1e-5)


@pytest.mark.parametrize("builder, kwargs", [
    (builders.tiny_llama2_swin, {}),
    (builders.tiny_llama3_2_clip336, {}),  # open_clip ViT: nn.MultiheadAttention
    (builders.tiny_demo, {"encoder": "frozen"}),
])
def test_adapters_start_at_the_plain_model_and_change_it_once_trained(builder, kwargs):
    encoder = kwargs.get("encoder", "lora")
    lora = {"encoder": {"dropout": 0.0}} if encoder == "lora" else None
    plain = build(builder, trainable={"encoder": "frozen", "projector": "frozen", "decoder": "frozen"})
    adapted = build(builder, trainable={"encoder": encoder, "projector": "frozen", "decoder": "lora"}, lora=lora)
    inputs = fused_inputs(plain)
    with torch.no_grad():
        assert torch.allclose(plain(**inputs), adapted(**inputs), atol=1e-5)
        perturb_adapters(adapted)
        assert not torch.allclose(plain(**inputs), adapted(**inputs), atol=1e-3)
    if encoder == "lora" and builder is builders.tiny_llama3_2_clip336:
        assert any(isinstance(m, LoRAMultiheadAttention) for m in adapted.vision.encoder.modules())


def test_merged_state_dict_loads_into_the_plain_model_with_the_same_outputs():
    adapted = build(builders.tiny_llama3_2_clip336, trainable={"encoder": "lora", "projector": "full",
                                                               "decoder": "lora"}, lora={"encoder": {"dropout": 0}})
    perturb_adapters(adapted)
    plain = build(builders.tiny_llama3_2_clip336, seed=5, trainable={"decoder": "frozen"})
    merged = merged_state_dict(adapted)
    assert not any("lora" in k for k in merged)
    plain.load_state_dict(merged)
    inputs = fused_inputs(plain)
    with torch.no_grad():
        assert torch.allclose(plain(**inputs), adapted(**inputs), atol=1e-5)


def test_lora_checkpoint_holds_the_adapters_only_and_reloads_to_identical_outputs(tmp_path):
    kwargs = {"trainable": {"encoder": "lora", "projector": "full", "decoder": "lora"},
              "lora": {"decoder": {"rank": 4, "targets": ["q_proj", "k_proj", "v_proj", "output_proj"]}}}
    model = build(builders.tiny_llama2_swin, **kwargs)
    perturb_adapters(model)
    saved = trained_state_dict(model)
    assert {k.split(".")[0] for k in saved} == {"encoder", "projector", "decoder"}
    assert all("lora_" in k for k in saved if not k.startswith("projector."))
    assert sum(".q_proj.lora_a" in k or ".output_proj.lora_b" in k for k in saved) == 4  # 2 layers x 2
    save_checkpoint(model, tmp_path / "ckpt")
    fresh = build(builders.tiny_llama2_swin, **kwargs)  # same base weights (same seed), fresh adapters
    inputs = fused_inputs(model)
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs), model(**inputs), atol=1e-4)
        load_checkpoint(fresh, tmp_path / "ckpt")
        assert torch.equal(fresh(**inputs), model(**inputs))


def test_a_full_checkpoint_loads_under_adapters_and_adapters_do_not_load_into_a_full_part(tmp_path):
    full = build(builders.tiny_llama2_swin, trainable={"encoder": "full", "projector": "full"})
    with torch.no_grad():  # as if stage 1 had trained the encoder and the projector
        for p in full.vision.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(full, tmp_path / "stage1")
    lora = build(builders.tiny_llama2_swin, trainable={"encoder": "lora", "projector": "full"})
    load_checkpoint(lora, tmp_path / "stage1")  # stage 2 starts from stage 1's weights, adapters fresh
    inputs = fused_inputs(full)
    with torch.no_grad():
        assert torch.allclose(lora(**inputs), full(**inputs), atol=1e-5)
    save_checkpoint(lora, tmp_path / "adapters")
    with pytest.raises(ValueError, match="the encoder was trained with LoRA but the model has no adapters there; build it as the run did: model.trainable.encoder=lora"):
        load_checkpoint(full, tmp_path / "adapters")


def test_qlora_base_weights_are_nf4_and_outputs_match_the_unquantised_path():
    trainable = {"encoder": "frozen", "projector": "frozen"}
    q = build(builders.tiny_llama3_biomedclip, embed_dim=256, trainable={**trainable, "decoder": "qlora"})
    ref = build(builders.tiny_llama3_biomedclip, embed_dim=256, trainable={**trainable, "decoder": "lora"})
    layer = q.decoder.layers[0]
    assert isinstance(layer.attn.q_proj, AdaptedLinear) and isinstance(layer.attn.q_proj.weight, NF4Tensor)
    assert isinstance(layer.mlp.w1, NF4Linear) and isinstance(layer.mlp.w1.weight, NF4Tensor)
    assert not isinstance(ref.decoder.layers[0].attn.q_proj.weight, NF4Tensor)
    assert {n for n, p in q.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}
    perturb_adapters(q)
    perturb_adapters(ref)
    inputs = fused_inputs(q)
    with torch.no_grad():
        out, expected = q(**inputs), ref(**inputs)
    # NF4 rounds each weight to one of 16 levels of its block's absolute maximum: close, not equal
    assert not torch.equal(out, expected)
    assert torch.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.98  # measured 0.989
    x = torch.randn(4, 256)
    with torch.no_grad():
        q_out, ref_out = layer.attn.q_proj(x), ref.decoder.layers[0].attn.q_proj(x)
    # measured 0.089 on these uniform random weights (NF4's levels suit normally distributed trained weights)
    assert 0 < (q_out - ref_out).norm() / ref_out.norm() < 0.12


def test_unknown_targets_name_the_linear_layers_there_are():
    with pytest.raises(ValueError, match=r"lora targets \['query'\] match no linear layer of the decoder; its "
                                         r"linear layers are named \['k_proj', 'output_proj', 'q_proj'"):
        builders.tiny_llama2_swin(trainable={"decoder": "lora"}, lora={"decoder": {"targets": ["query"]}})
    with pytest.raises(ValueError, match="linear layers are named nothing"):
        builders.tiny_demo(trainable={"encoder": "lora"})
    with pytest.raises(ValueError, match="cannot act on encoder layer"):
        builders.tiny_llama3_2_clip336(trainable={"encoder": "lora"}, lora={"encoder": {"dropout": 0.1}})


def test_add_lora_on_a_plain_module():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    adapted = add_lora(mlp, LoRASettings(rank=2, alpha=2, targets=["0"]))
    assert adapted == ["0"] and isinstance(mlp[0], AdaptedLinear)
    assert [n for n, p in mlp.named_parameters() if p.requires_grad] == ["0.lora_a.weight", "0.lora_b.weight"]
