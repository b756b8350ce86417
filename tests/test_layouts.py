"""Checkpoints in exactly the layouts they are published in (tiny sizes, random weights), loaded through the
code a user runs: the builders' ``llm_dir`` / ``vision_dir`` / ``vision_checkpoint`` and the tokenizer
components. Folders are written by transformers' own ``save_pretrained`` (config.json rewritten with the
published keys) and every loaded model is compared with transformers' implementation of the same weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from torchtune.models.llama2 import llama2_7b
from torchtune.models.llama3_1 import llama3_1_8b
from torchtune.models.llama3_2 import llama3_2_1b

from medcap.data.dataset import image_transform
from medcap.models import builders, encoders, hf_vision
from medcap.models.llm_weights import check_dtype_runs, dtype_error_message, llama_decoder_from_hf_config
from medcap.text import llama2_tokenizer, llama3_tokenizer
from tests.test_tokenizers import LLAMA3_MODEL, SENTENCEPIECE_MODEL

# config.json of the published checkpoints, as their hub pages show them (generic keys left out)
LLAMA3_1_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
LLAMA3_2_1B_INSTRUCT = {
    **LLAMA3_1_8B_INSTRUCT, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "tie_word_embeddings": True}
LLAMA2_7B_CHAT = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000}
CLIP_VIT_L14_336 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                    "max_position_embeddings": 77, "vocab_size": 49408, "model_type": "clip_text_model"},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-05, "dropout": 0.0, "attention_dropout": 0.0,
                      "model_type": "clip_vision_model"}}
SWIN_BASE_224 = {
    "architectures": ["SwinForImageClassification"], "attention_probs_dropout_prob": 0.0, "depths": [2, 2, 18, 2],
    "drop_path_rate": 0.1, "embed_dim": 128, "encoder_stride": 32, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "hidden_size": 1024, "image_size": 224, "initializer_range": 0.02, "layer_norm_eps": 1e-05, "mlp_ratio": 4.0,
    "model_type": "swin", "num_channels": 3, "num_heads": [4, 8, 16, 32], "num_layers": 4, "patch_size": 4,
    "path_norm": True, "qkv_bias": True, "torch_dtype": "float32", "use_absolute_embeddings": False,
    "window_size": 7}
# preprocessor_config.json of the same checkpoints: a ViTImageProcessor (squash) and a CLIPImageProcessor (shortest
# edge, centre crop)
SWIN_BASE_224_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 224}
CLIP_VIT_L14_336_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}
BIOMEDCLIP = {
    "model_cfg": {"embed_dim": 512,
                  "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                 "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                  "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                               "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                               "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                               "context_length": 256}},
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}

TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "torch_dtype": "float32"}


def write_preprocessor(folder: Path, config: dict) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def portrait_image() -> Image.Image:
    """A smooth non-square test image (an X-ray is often portrait), so that crop and squash differ."""
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((31, 25, 3)) * 255).astype(np.uint8)).resize((250, 310), Image.BICUBIC)


def processed(processor, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(image, return_tensors="np").pixel_values[0]))


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its initial value (norms at 1, zero biases and tables would hide mix-ups)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def save_llama(folder: Path, config: dict) -> transformers.LlamaForCausalLM:
    """A random transformers Llama saved as the hub has it: safetensors shards named by
    model.safetensors.index.json, config.json with the published keys."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    perturb(model)
    model.save_pretrained(folder, max_shard_size="4MB")
    write_config(folder, config)
    return model


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def llama3_folder(tmp_path_factory, name: str, config: dict):
    """A Llama 3.x Instruct folder as published: HF weights + the tokenizer under original/."""
    folder = tmp_path_factory.mktemp(name)
    model = save_llama(folder, config)
    (folder / "original").mkdir()
    shutil.copy(LLAMA3_MODEL, folder / "original" / "tokenizer.model")
    return folder, model


@pytest.fixture(scope="module")
def llama3_1_dir(tmp_path_factory):
    return llama3_folder(tmp_path_factory, "Llama-3.1-8B-Instruct", {**LLAMA3_1_8B_INSTRUCT, **TINY_LLAMA})


@pytest.fixture(scope="module")
def llama3_2_dir(tmp_path_factory):
    return llama3_folder(tmp_path_factory, "Llama-3.2-1B-Instruct",
                         {**LLAMA3_2_1B_INSTRUCT, **TINY_LLAMA, "head_dim": 8})


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Llama-2-7b-chat-hf")
    model = save_llama(folder, {**LLAMA2_7B_CHAT, **TINY_LLAMA, "num_key_value_heads": 4})
    shutil.copy(SENTENCEPIECE_MODEL, folder / "tokenizer.model")
    return folder, model


@pytest.fixture(scope="module")
def biomedclip_dir(tmp_path_factory):
    """BiomedCLIP's open_clip folder with timm's test ViT (160 px, 100 patch tokens of 64) as the trunk."""
    folder = tmp_path_factory.mktemp("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    config = json.loads(json.dumps(BIOMEDCLIP))
    config["model_cfg"]["embed_dim"] = 32
    config["model_cfg"]["vision_cfg"].update(timm_model_name="test_vit", image_size=160)
    source = encoders.OpenClipEncoder(model_cfg=config["model_cfg"], output="pooled").eval()
    perturb(source)
    state = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    state.update({"text.transformer.embeddings.word_embeddings.weight": torch.zeros(8, 4),
                  "text.proj.0.weight": torch.zeros(4, 4), "logit_scale": torch.tensor(4.6)})  # ignored
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder, source


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """openai/clip-vit-large-patch14-336 at 42 px with patch 14 (9 patch tokens), 3 blocks of width 32."""
    folder = tmp_path_factory.mktemp("clip-vit-large-patch14-336")
    config = json.loads(json.dumps(CLIP_VIT_L14_336))
    config["projection_dim"] = 16
    config["text_config"].update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                 projection_dim=16, vocab_size=50, max_position_embeddings=8, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)
    config["vision_config"].update(hidden_size=32, image_size=42, intermediate_size=64, num_attention_heads=4,
                                   num_hidden_layers=3, projection_dim=16)
    model = transformers.CLIPModel(transformers.CLIPConfig(**config)).eval()
    perturb(model)
    model.save_pretrained(folder)
    write_config(folder, config)
    return folder, model


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory):
    """microsoft/swin-base-patch4-window7-224 at 96 px with window 3: like Swin-B's 56 -> 7, stages of 24, 12, 6
    and 3 tokens a side, shifted windows in all but the last."""
    folder = tmp_path_factory.mktemp("swin-base-patch4-window7-224")
    config = {**SWIN_BASE_224, "image_size": 96, "embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4],
              "window_size": 3, "hidden_size": 64, "id2label": {"0": "a", "1": "b", "2": "c"},
              "label2id": {"a": 0, "b": 1, "c": 2}}
    model = transformers.SwinForImageClassification(transformers.SwinConfig(**config)).eval()
    perturb(model)
    model.save_pretrained(folder)
    write_config(folder, config)
    write_preprocessor(folder, {**SWIN_BASE_224_PREPROCESSOR, "size": 96})
    return folder, model


def hf_logits(model: transformers.LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def run(model, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if images is None:
            return model(tokens)
        return model(tokens, encoder_input={"image": {"images": images}})


def test_llama3_1_instruct_and_biomedclip_folders_through_the_builder(llama3_1_dir, biomedclip_dir):
    (llm_dir, reference), (vision_dir, vision_source) = llama3_1_dir, biomedclip_dir
    assert len(json.loads((llm_dir / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    assert len(list(llm_dir.glob("model-*-of-*.safetensors"))) > 1
    model = builders.llama3_1_8b_biomedclip(llm_dir=str(llm_dir), vision_dir=str(vision_dir)).eval()
    tokenizer = llama3_tokenizer(f"{llm_dir}/original/tokenizer.model")
    assert model.image_token_id == tokenizer.image_token_id

    text = torch.tensor([tokenizer.prompt_ids("Describe the chest X-ray.")])
    expected = hf_logits(reference, text)
    assert expected.std() > 0.1  # far from uniform: a wrong mapping could not pass by accident
    torch.testing.assert_close(run(model, text), expected, atol=1e-4, rtol=1e-4)

    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model.vision.encoder(images), vision_source(images))
    assert model.vision.encoder.mean == tuple(BIOMEDCLIP["preprocess_cfg"]["mean"])
    prompt = torch.tensor([tokenizer.prompt_ids("Describe the image.", num_image_tokens=model.tokens_per_image)])
    assert run(model, prompt, images).shape == (1, prompt.shape[1], 128256)


def test_biomedclip_folder_has_the_published_structure(biomedclip_dir):
    folder, _ = biomedclip_dir
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"].keys() == BIOMEDCLIP["model_cfg"].keys()
    assert config["model_cfg"]["vision_cfg"].keys() == BIOMEDCLIP["model_cfg"]["vision_cfg"].keys()
    names = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True).keys()
    assert {"visual.trunk.patch_embed.proj.weight", "visual.trunk.blocks.0.attn.qkv.weight",
            "visual.head.proj.weight", "logit_scale"} <= names
    patch = encoders.biomedclip_vit_b16(checkpoint_dir=str(folder), output="patch")
    assert (patch.num_tokens, patch.embed_dim) == (100, 64)


def test_llama2_chat_and_hf_swin_folders_through_the_builder(llama2_dir, swin_dir):
    (llm_dir, reference), (vision_dir, swin) = llama2_dir, swin_dir
    model = builders.llama2_7b_swin(llm_dir=str(llm_dir), vision_checkpoint=str(vision_dir)).eval()
    tokenizer = llama2_tokenizer(f"{llm_dir}/tokenizer.model")
    assert model.image_token_id == tokenizer.image_token_id == 32000

    text = torch.tensor([tokenizer.prompt_ids("Describe the chest X-ray.")])
    expected = hf_logits(reference, text)
    assert expected.std() > 0.1
    torch.testing.assert_close(run(model, text), expected, atol=1e-4, rtol=1e-4)

    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens = model.vision.encoder(images)
        expected = swin.swin(pixel_values=images).last_hidden_state
    assert tokens.shape == expected.shape == (2, 9, 64)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    prompt = torch.tensor([tokenizer.prompt_ids("Describe the image.", num_image_tokens=model.tokens_per_image)])
    assert run(model, prompt, images[:1]).shape == (1, prompt.shape[1], 32000)
    image = portrait_image()  # prepared as R2GenGPT's AutoImageProcessor prepares it: squashed
    expected = processed(ViTImageProcessorPil.from_pretrained(vision_dir), image)
    torch.testing.assert_close(image_transform(model.vision.encoder)(image), expected, atol=1e-5, rtol=0)


def test_llama3_2_instruct_and_hf_clip_folders_through_the_builder(llama3_2_dir, clip_dir):
    (llm_dir, reference), (vision_dir, clip) = llama3_2_dir, clip_dir
    assert "lm_head.weight" not in json.loads((llm_dir / "model.safetensors.index.json").read_text())["weight_map"]
    model = builders.llama3_2_1b_clip336(llm_dir=str(llm_dir), vision_dir=str(vision_dir)).eval()
    tokenizer = llama3_tokenizer(f"{llm_dir}/original/tokenizer.model")
    text = torch.tensor([tokenizer.prompt_ids("Describe the chest X-ray.")])
    torch.testing.assert_close(run(model, text), hf_logits(reference, text), atol=1e-4, rtol=1e-4)

    images = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.vision.encoder(images), expected, atol=1e-5, rtol=1e-5)
    prompt = torch.tensor([tokenizer.prompt_ids("Describe the image.", num_image_tokens=model.tokens_per_image)])
    assert run(model, prompt, images).shape == (1, prompt.shape[1], 128256)


def test_hf_clip_maps_onto_open_clip_exactly(clip_dir):
    folder, clip = clip_dir
    images = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=images, output_hidden_states=True)
        pooled = clip.visual_projection(hidden.pooler_output)
        penultimate = encoders.clip_vit_l14_336(checkpoint_dir=str(folder)).eval()(images)
        last = encoders.clip_vit_l14_336(checkpoint_dir=str(folder), layer=-1).eval()(images)
        ours_pooled = encoders.clip_vit_l14_336(checkpoint_dir=str(folder), output="pooled").eval()(images)
    assert penultimate.shape == (2, 9, 32)
    torch.testing.assert_close(penultimate, hidden.hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, hidden.hidden_states[-1][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_pooled, pooled.unsqueeze(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(penultimate, last, atol=1e-2)


def test_hf_clip_vision_model_folders_of_transformers_4_and_5(tmp_path, clip_dir):
    """A CLIPVisionModel (no projection; its pooled output is transformers' pooler_output) as transformers 4
    saved it (pytorch_model.bin, vision_model.* names, the position_ids buffer) and as transformers 5 saves it
    (model.safetensors, names without vision_model.)."""
    _, clip = clip_dir
    vision = transformers.CLIPVisionModel(clip.config.vision_config).eval()
    vision.load_state_dict(clip.vision_model.state_dict())
    vision.save_pretrained(tmp_path / "v5")
    old = tmp_path / "v4"
    old.mkdir()
    state = {f"vision_model.{k}": v.clone() for k, v in clip.vision_model.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(state, old / "pytorch_model.bin")
    write_config(old, {**clip.config.vision_config.to_dict(), "model_type": "clip_vision_model"})
    (old / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    images = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        expected = vision(pixel_values=images, output_hidden_states=True)
        for folder in (old, tmp_path / "v5"):
            patch = encoders.clip_vit_l14_336(checkpoint_dir=str(folder)).eval()
            pooled = encoders.clip_vit_l14_336(checkpoint_dir=str(folder), output="pooled").eval()
            torch.testing.assert_close(patch(images), expected.hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled(images)[:, 0], expected.pooler_output, atol=1e-5, rtol=1e-5)
    assert patch.mean == encoders.CLIP_MEAN
    assert encoders.clip_vit_l14_336(checkpoint_dir=str(old)).std == (0.25, 0.25, 0.25)


def test_hf_swin_maps_onto_timm_exactly(swin_dir):
    folder, swin = swin_dir
    encoder = encoders.swin_base(checkpoint=str(folder)).eval()
    assert (encoder.image_size, encoder.num_tokens, encoder.embed_dim) == (96, 9, 64)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), swin.swin(pixel_values=images).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        pooled = encoders.swin_base(checkpoint=str(folder), output="pooled").eval()(images)
        torch.testing.assert_close(pooled[:, 0], swin.swin(pixel_values=images).pooler_output, atol=1e-5, rtol=1e-5)


def test_hf_swin_folder_prepares_images_as_its_image_processor(tmp_path, swin_dir):
    """The image that the folder's own processor (AutoImageProcessor: a ViTImageProcessor) gives, resized straight
    to the input (squashed) with the folder's resample filter, mean and std."""
    image = portrait_image()
    for resample in (3, 2, 0):
        folder = Path(shutil.copytree(swin_dir[0], tmp_path / f"swin{resample}"))
        write_preprocessor(folder, {**SWIN_BASE_224_PREPROCESSOR, "size": 96, "resample": resample,
                                    "image_mean": [0.5, 0.4, 0.3]})
        encoder = encoders.swin_base(checkpoint=str(folder))
        assert (encoder.resize_mode, encoder.mean) == ("squash", (0.5, 0.4, 0.3))
        ours = image_transform(encoder)(image)
        torch.testing.assert_close(ours, processed(ViTImageProcessorPil.from_pretrained(folder), image),
                                   atol=1e-5, rtol=0)
        # transformers 5's default (torchvision) backend resizes tensors, not PIL images: 8-bit rounding apart
        auto = transformers.AutoImageProcessor.from_pretrained(folder)
        assert type(auto).__name__ == "ViTImageProcessor"
        torch.testing.assert_close(ours, processed(auto, image), atol=0.02, rtol=0)


def test_hf_clip_folder_prepares_images_as_its_image_processor(tmp_path, clip_dir):
    """CLIPImageProcessor: shortest edge, centre crop, with the folder's resample filter; clip_vit_l14_336 keeps
    LLaVA 1.5's padding but resamples with the folder's filter."""
    image = portrait_image()
    for resample in (2, 3):
        folder = Path(shutil.copytree(clip_dir[0], tmp_path / f"clip{resample}"))
        write_preprocessor(folder, {**CLIP_VIT_L14_336_PREPROCESSOR, "size": 42, "crop_size": 42,
                                    "resample": resample})
        encoder = encoders.OpenClipEncoder(checkpoint_dir=str(folder))
        assert encoder.resize_mode == "crop"
        torch.testing.assert_close(image_transform(encoder)(image),
                                   processed(CLIPImageProcessorPil.from_pretrained(folder), image), atol=1e-5, rtol=0)
        llava = encoders.clip_vit_l14_336(checkpoint_dir=str(folder))
        assert (llava.resize_mode, llava.interpolation) == ("pad", "bicubic" if resample == 3 else "bilinear")


def test_unsupported_image_processor_settings_are_errors_naming_file_and_key(tmp_path, swin_dir, clip_dir):
    swin = Path(shutil.copytree(swin_dir[0], tmp_path / "swin"))
    clip = Path(shutil.copytree(clip_dir[0], tmp_path / "clip"))
    settings = {**SWIN_BASE_224_PREPROCESSOR, "size": 96}
    for change, message in [({"resample": 1}, r"resample=1 is not supported \(expected one of \[0, 2, 3\]\)"),
                            ({"size": 224}, "size=224 does not match the model's input of 96 px"),
                            ({"size": {"height": 96, "width": 128}}, "size=.* is not supported .*square size"),
                            ({"do_resize": False}, "do_resize=False is not supported"),
                            ({"rescale_factor": 1.0}, "rescale_factor=1.0 is not supported"),
                            ({"feature_extractor_type": "ConvNextFeatureExtractor"},
                             "ConvNextFeatureExtractor is not supported")]:
        write_preprocessor(swin, {**settings, **change})
        with pytest.raises(ValueError, match=f"swin/preprocessor_config.json: {message}") as error:
            encoders.swin_base(str(swin))
        assert_one_line(error)
    settings = {**CLIP_VIT_L14_336_PREPROCESSOR, "size": 42, "crop_size": 42}
    for change, message in [({"crop_size": 40}, "crop_size=40 does not match the model's input of 42 px"),
                            ({"do_center_crop": False}, "do_center_crop=False is not supported")]:
        write_preprocessor(clip, {**settings, **change})
        with pytest.raises(ValueError, match=f"clip/preprocessor_config.json: {message}"):
            encoders.clip_vit_l14_336(str(clip))


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """An open_clip folder (timm's test ViT as the image tower, a one-block text tower) that open_clip itself
    loads with ``local-dir:``."""
    folder = tmp_path_factory.mktemp("open_clip")
    model_cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                                 "timm_pool": "", "timm_proj": "linear", "image_size": 160},
                 "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    torch.save(open_clip.CLIP(**model_cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return folder


@pytest.mark.parametrize("preprocess_cfg", [
    {}, {"resize_mode": "squash"}, {"resize_mode": "shortest", "interpolation": "bilinear"},
    {"resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "std": 0.25},
    {"interpolation": "random"}])
def test_open_clip_folder_prepares_images_as_open_clip_does(tmp_path, open_clip_dir, preprocess_cfg):
    folder = Path(shutil.copytree(open_clip_dir, tmp_path / "model"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({**config, "preprocess_cfg": preprocess_cfg}))
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    image = portrait_image()
    ours = image_transform(encoders.OpenClipEncoder(checkpoint_dir=str(folder)))(image)
    torch.testing.assert_close(ours, preprocess(image), atol=1e-6, rtol=0)


def test_open_clip_preprocess_cfg_it_cannot_follow_is_an_error_naming_folder_and_key(tmp_path, open_clip_dir):
    folder = Path(shutil.copytree(open_clip_dir, tmp_path / "model"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    for key, value in [("resize_mode", "longest"), ("interpolation", "nearest")]:
        (folder / "open_clip_config.json").write_text(json.dumps({**config, "preprocess_cfg": {key: value}}))
        with pytest.raises(ValueError, match=f"model/open_clip_config.json: preprocess_cfg {key}='{value}' is not "
                                             f"supported"):
            encoders.OpenClipEncoder(checkpoint_dir=str(folder))


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("config, family, reference", [
    (LLAMA3_1_8B_INSTRUCT, "llama3", llama3_1_8b), (LLAMA3_2_1B_INSTRUCT, "llama3", llama3_2_1b),
    (LLAMA2_7B_CHAT, "llama2", llama2_7b)])
def test_published_llm_configs_build_torchtunes_published_sizes(config, family, reference):
    with torch.device("meta"):
        ours, theirs = llama_decoder_from_hf_config(config, family), reference()
    assert shapes(ours) == shapes(theirs)
    assert type(ours.output) is type(theirs.output)
    rope, their_rope = ours.layers[0].attn.pos_embeddings, theirs.layers[0].attn.pos_embeddings
    assert type(rope) is type(their_rope)
    assert {k: v for k, v in vars(rope).items() if not k.startswith("_")} == \
        {k: v for k, v in vars(their_rope).items() if not k.startswith("_")}
    assert ours.layers[0].sa_norm.eps == theirs.layers[0].sa_norm.eps == 1e-5


def test_transformers_5_rope_parameters_are_read_too():
    config = {k: v for k, v in LLAMA3_1_8B_INSTRUCT.items() if k not in ("rope_scaling", "rope_theta")}
    config["rope_parameters"] = {**LLAMA3_1_8B_INSTRUCT["rope_scaling"], "rope_theta": 500000.0}
    with torch.device("meta"):
        rope = llama_decoder_from_hf_config({**config, **TINY_LLAMA}, "llama3").layers[0].attn.pos_embeddings
    assert (rope.base, rope.scale_factor) == (500000.0, 8)
    llama2 = {**LLAMA2_7B_CHAT, **TINY_LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert llama_decoder_from_hf_config(llama2, "llama2").layers[0].attn.pos_embeddings.base == 10000.0


def test_published_vision_configs_build_the_published_towers():
    with torch.device("meta"):
        ours = timm.create_model("swin_base_patch4_window7_224", num_classes=0,
                                 **hf_vision.timm_swin_kwargs(SWIN_BASE_224))
        theirs = timm.create_model("swin_base_patch4_window7_224", num_classes=0)
        assert shapes(ours) == shapes(theirs)
        cfg = hf_vision.open_clip_cfg_from_hf_clip(CLIP_VIT_L14_336)
        reference = open_clip.get_model_config("ViT-L-14-336")
        ours = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg["quick_gelu"])
        theirs = open_clip.model._build_vision_tower(reference["embed_dim"], reference["vision_cfg"])
    assert shapes(ours) == shapes(theirs)
    assert ours.positional_embedding.shape == (577, 1024)  # 576 patch tokens + class token
    assert cfg["quick_gelu"] and type(ours.transformer.resblocks[0].mlp.gelu) is open_clip.transformer.QuickGELU


def test_llm_folder_errors_say_what_was_expected_and_found(tmp_path, llama3_1_dir, llama2_dir):
    def broken(name: str) -> Path:
        return Path(shutil.copytree(llama3_1_dir[0], tmp_path / name))

    with pytest.raises(FileNotFoundError, match="LLM checkpoint folder not found: .*nope") as error:
        builders.llama3_1_8b_biomedclip(llm_dir=str(tmp_path / "nope"))
    assert_one_line(error)

    folder = broken("missing_shard")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard\(s\) listed in model.safetensors.index.json are missing: "
                                                rf"\['{shard}'\]") as error:
        builders.llama3_1_8b_biomedclip(llm_dir=str(folder))
    assert_one_line(error)

    folder = broken("wrong_shape")
    name = "model.layers.1.self_attn.q_proj.weight"  # the q/k permutation would fail on it first
    shard = folder / index["weight_map"][name]
    state = load_file(shard)
    state[name] = torch.zeros(24, 32)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}: expected shape \(32, 32\), found \(24, 32\)") as error:
        builders.llama3_1_8b_biomedclip(llm_dir=str(folder))
    assert_one_line(error)

    folder = broken("no_config")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json .*found .*model-00001-of") as error:
        builders.llama3_1_8b_biomedclip(llm_dir=str(folder))
    assert_one_line(error)

    with pytest.raises(ValueError, match="expected vocab_size 128256 for a llama3 model .*found 32000") as error:
        builders.llama3_1_8b_biomedclip(llm_dir=str(llama2_dir[0]))  # a Llama 2 folder given to a Llama 3 builder
    assert_one_line(error)
    with pytest.raises(ValueError, match="expected vocab_size 32000 for a llama2 model .*found 128256"):
        builders.llama2_7b_swin(llm_dir=str(llama3_1_dir[0]))
    config = {**LLAMA3_1_8B_INSTRUCT, "rope_scaling": {**LLAMA3_1_8B_INSTRUCT["rope_scaling"], "rope_type": "yarn"}}
    with pytest.raises(ValueError, match="expected RoPE scaling .*'llama3'.*found .*'yarn'"):
        llama_decoder_from_hf_config(config, "llama3")


def test_vision_folder_errors_say_what_was_expected_and_found(tmp_path, llama2_dir, biomedclip_dir, clip_dir,
                                                              swin_dir):
    with pytest.raises(FileNotFoundError, match="vision checkpoint folder not found: .*nope") as error:
        encoders.clip_vit_l14_336(checkpoint_dir=str(tmp_path / "nope"))
    assert_one_line(error)
    with pytest.raises(FileNotFoundError, match="expected open_clip_config.json .* found a config.json with "
                                                "model_type 'llama'") as error:
        encoders.biomedclip_vit_b16(checkpoint_dir=str(llama2_dir[0]))  # the LLM folder passed as vision_dir
    assert_one_line(error)

    biomedclip = Path(shutil.copytree(biomedclip_dir[0], tmp_path / "biomedclip"))
    state = torch.load(biomedclip / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.trunk.pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(state, biomedclip / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"trunk.pos_embed: expected shape \(1, 101, 64\), found \(1, 5, 64\)"):
        encoders.biomedclip_vit_b16(checkpoint_dir=str(biomedclip))

    clip = Path(shutil.copytree(clip_dir[0], tmp_path / "clip"))
    state = load_file(clip / "model.safetensors")
    state["vision_model.embeddings.position_embedding.weight"] = torch.zeros(9, 32)
    save_file(state, clip / "model.safetensors")
    with pytest.raises(ValueError, match=r"positional_embedding: expected shape \(10, 32\), found \(9, 32\)") as error:
        encoders.clip_vit_l14_336(checkpoint_dir=str(clip))
    assert_one_line(error)
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(state, clip / "model.safetensors")
    with pytest.raises(ValueError, match="resblocks.1.attn: the attention weight lacks its k part"):
        encoders.clip_vit_l14_336(checkpoint_dir=str(clip))

    swin = Path(shutil.copytree(swin_dir[0], tmp_path / "swin"))
    (swin / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors, pytorch_model.bin .* found "
                                                "config.json") as error:
        encoders.swin_base(str(swin))
    assert_one_line(error)
    write_config(swin, {**SWIN_BASE_224, "use_absolute_embeddings": True})
    with pytest.raises(ValueError, match="use_absolute_embeddings=True is not supported"):
        encoders.swin_base(str(swin))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_torch_weight_files_hold_tensors_only_and_code_never_runs(tmp_path, biomedclip_dir):
    from medcap.models.llm_weights import read_weight_file

    wrapped = tmp_path / "wrapped.pth"  # timm's training checkpoints keep the weights under state_dict
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, wrapped)
    assert list(read_weight_file(wrapped)) == ["w"] and torch.equal(read_weight_file(wrapped)["w"], torch.ones(2))
    numbers = tmp_path / "numbers.bin"
    torch.save({"w": torch.ones(2), "step": 7}, numbers)
    with pytest.raises(ValueError, match=r"numbers\.bin: expected a state dict of tensors; not a tensor: \['step'\]"):
        read_weight_file(numbers)
    listed = tmp_path / "listed.bin"
    torch.save([torch.ones(2)], listed)
    with pytest.raises(ValueError, match=r"listed\.bin: expected a state dict of tensors; not a tensor: \['list'\]"):
        read_weight_file(listed)

    biomedclip = Path(shutil.copytree(biomedclip_dir[0], tmp_path / "biomedclip"))
    state = torch.load(biomedclip / "open_clip_pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code_ran"
    state["visual.trunk.cls_token"] = _RunsCode(marker)
    torch.save(state, biomedclip / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"open_clip_pytorch_model\.bin: refused: the file holds more than tensors "
                                         r".*; a weight file holds a state dict of tensors") as error:
        encoders.biomedclip_vit_b16(checkpoint_dir=str(biomedclip))
    assert_one_line(error)
    assert not marker.exists()
    torch.load(biomedclip / "open_clip_pytorch_model.bin", weights_only=False)  # the payload is real
    assert marker.exists()

def test_tokenizer_files_of_the_wrong_kind_or_place(llama3_1_dir, llama2_dir):
    llama3_dir, llama2_dir = llama3_1_dir[0], llama2_dir[0]
    with pytest.raises(FileNotFoundError, match="original/tokenizer.model in a Llama 3 download.*not found"):
        llama3_tokenizer(f"{llama3_dir}/tokenizer.model")  # Llama 3 folders keep it under original/
    with pytest.raises(ValueError, match="expected Llama 3's tiktoken tokenizer.model .*found a file tiktoken "
                                         "cannot read") as error:
        llama3_tokenizer(f"{llama2_dir}/tokenizer.model")
    assert_one_line(error)
    with pytest.raises(ValueError, match="expected a SentencePiece model .*found a file SentencePiece cannot read"):
        llama2_tokenizer(f"{llama3_dir}/original/tokenizer.model")


def test_dtype_the_device_cannot_run():
    check_dtype_runs(torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"dtype=float8_e4m3fn cannot run on cpu \(cpu\): .*fp32 runs "
                                           "everywhere") as error:
        check_dtype_runs(torch.float8_e4m3fn, "cpu")
    assert_one_line(error)
    message = dtype_error_message(torch.bfloat16, torch.device("cuda:0"), "Tesla T4",
                                  "compute capability 7.5, native bf16 needs 8.0+")
    assert message == ("dtype=bf16 cannot run on cuda:0 (Tesla T4): compute capability 7.5, native bf16 needs "
                       "8.0+; expected a dtype this device computes in (fp32 runs everywhere)")
