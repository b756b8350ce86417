import pytest
import torch

from medcap.models.projectors import PooledToTokens, build_projector
from tests.tiny_vlm import IMAGE_ID, sample_batch, tiny_vlm


@pytest.mark.parametrize("kind, tokens_out", [("linear", 5), ("mlp2", 5), ("linear_ln", 5), ("pooled_mlp", 7)])
def test_projector_shapes(kind, tokens_out):
    proj = build_projector(kind, 12, 20, num_tokens=7 if kind == "pooled_mlp" else None)
    x = torch.randn(3, 1 if kind == "pooled_mlp" else 5, 12)
    assert proj(x).shape == (3, tokens_out, 20)


def test_projector_errors():
    with pytest.raises(ValueError, match="unknown projector 'conv'"):
        build_projector("conv", 4, 4)
    with pytest.raises(ValueError, match="one pooled embedding per image, got 3"):
        PooledToTokens(4, 4, 2)(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="num_tokens applies to projector 'pooled_mlp'; 'mlp2' keeps the encoder's"):
        build_projector("mlp2", 4, 4, num_tokens=50)  # it would be ignored


def test_linear_ln_output_is_normalised():
    out = build_projector("linear_ln", 8, 16)(torch.randn(2, 3, 8))
    assert torch.allclose(out.mean(-1), torch.zeros(2, 3), atol=1e-5)


def test_trainable_parts_set_requires_grad():
    model = tiny_vlm(trainable={"encoder": "frozen", "projector": "full", "decoder": "frozen"})
    grads = {part: {p.requires_grad for p in module.parameters()} for part, module in model.parts().items()}
    assert grads == {"encoder": {False}, "projector": {True}, "decoder": {False}}
    with pytest.raises(ValueError, match="trainable.decoder='adapter'"):
        tiny_vlm(trainable={"decoder": "adapter"})
    with pytest.raises(ValueError, match="lora is for the encoder and the decoder"):
        tiny_vlm(trainable={"projector": "lora"})


def test_frozen_parts_stay_in_eval_mode():
    model = tiny_vlm(trainable={"encoder": "frozen"}).train()
    assert not model.vision.encoder.training and not model.decoder.training
    assert model.vision.projector.training
    assert tiny_vlm().train().vision.encoder.training  # a trained encoder does switch to training mode


def test_placeholders_are_replaced_by_vision_tokens():
    model = tiny_vlm().eval()
    tokens, images = sample_batch(batch_size=2)
    seen = {}
    model.decoder.layers[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0]),
                                                      with_kwargs=True)
    model(tokens, encoder_input={"image": {"images": images}})
    fused = seen["x"]
    is_image = tokens == IMAGE_ID
    vision = model.vision(images)  # [2, 4, 32]
    assert torch.equal(fused[is_image], vision.reshape(-1, 32))
    assert torch.equal(fused[~is_image], model.tok_embeddings(tokens[~is_image]))


def test_images_change_the_output_only_through_placeholders():
    model = tiny_vlm().eval()
    tokens, images = sample_batch()
    a = model(tokens, encoder_input={"image": {"images": images}})
    b = model(tokens, encoder_input={"image": {"images": images + 1}})
    assert not torch.allclose(a, b)
    # causal attention: positions before the image block are unaffected
    prefix = torch.cat([torch.full((2, 3), 5), tokens], dim=1)
    a = model(prefix, encoder_input={"image": {"images": images}})
    b = model(prefix, encoder_input={"image": {"images": images + 1}})
    assert torch.equal(a[:, :3], b[:, :3])


def test_placeholder_count_mismatch_is_an_error():
    model = tiny_vlm().eval()
    tokens, images = sample_batch(batch_size=2)
    tokens[0, 0] = 7  # one placeholder fewer
    with pytest.raises(ValueError, match="7 image placeholder tokens but its 2 image\\(s\\) give 8 vision tokens"):
        model(tokens, encoder_input={"image": {"images": images}})


def test_several_images_per_sample():
    model = tiny_vlm().eval()
    tokens, images = sample_batch(batch_size=2, images_per_sample=3)
    assert model(tokens, encoder_input={"image": {"images": images}}).shape == (2, 18, 64)


def test_kv_cache_is_sized_to_the_request():
    model = tiny_vlm().eval()
    model.setup_caches(2, torch.float32, decoder_max_seq_len=40)
    assert model.decoder.layers[0].attn.kv_cache.k_cache.shape[2] == 40


def test_views_per_block_averages_the_encoded_views_before_projecting():
    from medcap.models import builders

    model = builders.tiny_llama2_swin(views_per_block=2).eval()
    tower = model.vision
    torch.manual_seed(0)
    images = torch.randn(3, 2, 3, 64, 64)  # 3 studies x 2 views
    with torch.no_grad():
        out = tower(images)
        encoded = tower.encoder(images.flatten(0, 1)).unflatten(0, (3, 2)).mean(1)
        expected = tower.projector(encoded)
        in_a_row = tower(images.flatten(0, 1))  # as collate_captions passes them
    assert out.shape == (3, model.tokens_per_image, expected.shape[-1])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(in_a_row.flatten(0, 1), out.flatten(0, 1))
    assert model.views_per_block == 2
    with pytest.raises(ValueError, match="3 images per sample cannot form blocks of views_per_block=2"):
        tower(torch.randn(1, 3, 3, 64, 64))
    tokens = torch.full((1, 2 * model.tokens_per_image), model.image_token_id)
    with pytest.raises(ValueError, match="2 image\\(s\\) give .* 2 views per block"):
        model(tokens, encoder_input={"image": {"images": torch.randn(2, 3, 64, 64)}})
