"""Hugging Face ``transformers`` vision folders (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``)
translated for the modules medcap builds: CLIP vision towers for open_clip's ``VisionTransformer``, Swin for
timm's ``SwinTransformer``. Only configs and tensor names are translated here; transformers is not needed."""

import re
from pathlib import Path

import torch
from torch import Tensor

from medcap.models.llm_weights import hf_weight_files, read_weight_file
from medcap.models.tensor_files import read_json

# transformers' defaults, for keys an older config.json leaves out
_CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "num_channels": 3}
_SWIN_DEFAULTS = {"image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96, "depths": [2, 2, 6, 2],
                  "num_heads": [3, 6, 12, 24], "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True,
                  "drop_path_rate": 0.1, "hidden_act": "gelu", "use_absolute_embeddings": False,
                  "layer_norm_eps": 1e-5}

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")

# HF CLIP vision names (after ``vision_model.``) -> open_clip VisionTransformer names
_CLIP_TOP = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
             "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
             "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
             "post_layernorm.bias": "ln_post.bias"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}

# HF Swin module names -> timm SwinTransformer names
_SWIN_TOP = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "embeddings.norm": "patch_embed.norm",
             "layernorm": "norm"}
# ``attention.self`` holds only the relative-position table once query / key / value are taken out
_SWIN_BLOCK = {"layernorm_before": "norm1", "attention.self": "attn", "attention.output.dense": "attn.proj",
               "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_SWIN_QKV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v"}


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return read_json(path)


def hf_model_type(path: str | Path) -> str | None:
    """``model_type`` from a transformers folder's config.json; None for anything else (a file, a timm or
    open_clip folder: timm's config.json names an ``architecture`` instead)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    return read_config(path).get("model_type")


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in hf_weight_files(folder):
        state.update(read_weight_file(path))
    return state


# transformers' image processors that ImageTransform can follow: their defaults for keys a file leaves out
_PROCESSORS = {"ViT": {"resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
               "CLIP": {"resample": 3, "do_center_crop": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711]}}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resampling codes


def _square_side(size, key: str, source: str) -> int:
    """The side of a square size (an int or ``{"height", "width"}``)."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.keys() == {"height", "width"} and size["height"] == size["width"]:
        return size["height"]
    raise ValueError(f"{source}: {key}={size!r} is not supported (expected a square size: an int or equal height "
                     f"and width)")


def preprocessing(folder: str | Path, processor: str, image_size: int, mean: tuple, std: tuple,
                  resize_mode: str) -> dict:
    """How the folder's transformers image processor (preprocessor_config.json) prepares an image, as
    ``ImageTransform`` settings ``mean``, ``std``, ``interpolation`` and ``resize_mode``: ``squash`` for a
    ViTImageProcessor (resized to height x width), ``crop`` for a CLIPImageProcessor (shortest edge, centre crop).
    ``processor`` (``ViT`` or ``CLIP``) is the one transformers picks for the folder's model type when the file names
    none. Without the file: the given mean, std and resize_mode, bicubic. Sizes the file leaves out are the
    model's ``image_size``. Raises ValueError for settings that ImageTransform does not follow."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {"mean": tuple(mean), "std": tuple(std), "interpolation": "bicubic", "resize_mode": resize_mode}
    config, source = read_json(path), str(path)
    name = config.get("image_processor_type") or config.get("feature_extractor_type") or f"{processor}ImageProcessor"
    kind = name.removesuffix("Fast").removesuffix("Pil").removesuffix("ImageProcessor").removesuffix(
        "FeatureExtractor")
    if kind not in _PROCESSORS:
        raise ValueError(f"{source}: {name} is not supported (expected ViTImageProcessor or CLIPImageProcessor)")
    config = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              **_PROCESSORS[kind], **config}
    _require(config, "do_resize", (True,), source)
    _require(config, "do_rescale", (True,), source)
    _require(config, "resample", tuple(_RESAMPLE), source)
    if abs(config["rescale_factor"] - 1 / 255) > 1e-9:
        raise ValueError(f"{source}: rescale_factor={config['rescale_factor']!r} is not supported (expected 1/255)")
    size = config.get("size", image_size)
    if kind == "ViT":
        sides = {"size": _square_side(size, "size", source)}
    else:
        _require(config, "do_center_crop", (True,), source)
        if isinstance(size, dict) and size.keys() == {"shortest_edge"}:
            size = size["shortest_edge"]
        if not isinstance(size, int):
            raise ValueError(f"{source}: size={size!r} is not supported (expected an int or a shortest_edge)")
        crop = _square_side(config.get("crop_size", image_size), "crop_size", source)
        sides = {"size": size, "crop_size": crop}
    wrong = [f"{key}={config[key]!r}" for key, side in sides.items() if side != image_size]
    if wrong:
        raise ValueError(f"{source}: {', '.join(wrong)} does not match the model's input of {image_size} px")
    if not config["do_normalize"]:
        config["image_mean"], config["image_std"] = [0.0] * 3, [1.0] * 3
    return {"mean": tuple(config["image_mean"]), "std": tuple(config["image_std"]),
            "interpolation": _RESAMPLE[config["resample"]], "resize_mode": "squash" if kind == "ViT" else "crop"}


def follow_processor(encoder, folder: str | Path, processor: str, resize_mode: str):
    """``encoder`` with the mean, std, interpolation and resize mode of the folder's image processor
    (``preprocessing``; the encoder's own mean and std and ``resize_mode`` without one)."""
    settings = preprocessing(folder, processor, encoder.image_size, encoder.mean, encoder.std, resize_mode)
    encoder.mean, encoder.std = settings["mean"], settings["std"]
    encoder.interpolation, encoder.resize_mode = settings["interpolation"], settings["resize_mode"]
    return encoder


def _require(config: dict, key: str, allowed: tuple, source: str) -> None:
    if config[key] not in allowed:
        raise ValueError(f"{source}: {key}={config[key]!r} is not supported (expected one of {list(allowed)})")


def open_clip_cfg_from_hf_clip(config: dict, source: str = "config.json") -> dict:
    """An open_clip model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``) for the vision tower that a
    ``CLIPConfig`` (with ``vision_config``) or a ``CLIPVisionConfig`` describes."""
    vision = {**_CLIP_VISION_DEFAULTS, **config.get("vision_config", config)}
    _require(vision, "hidden_act", ("quick_gelu", "gelu"), source)
    _require(vision, "layer_norm_eps", (1e-5,), source)  # open_clip's LayerNorm default
    _require(vision, "num_channels", (3,), source)
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    vision_cfg = {"image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": width,
                  "layers": vision["num_hidden_layers"], "head_width": width // heads,
                  "mlp_ratio": vision["intermediate_size"] / width}
    embed_dim = config.get("projection_dim", vision.get("projection_dim", 512))
    return {"embed_dim": embed_dim, "quick_gelu": vision["hidden_act"] == "quick_gelu", "vision_cfg": vision_cfg}


def _concat_qkv(parts: dict[tuple[str, str], dict[str, Tensor]], name: str) -> dict[str, Tensor]:
    """{(prefix, weight | bias): {"q": ..., "k": ..., "v": ...}} -> {name: q, k and v stacked on dim 0}."""
    out = {}
    for (prefix, kind), qkv in parts.items():
        missing = [p for p in "qkv" if p not in qkv]
        if missing:
            raise ValueError(f"{prefix}: the attention {kind} lacks its {'/'.join(missing)} part(s)")
        out[name.format(prefix=prefix, kind=kind)] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def hf_clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` state dict (``vision_model.*`` names, or without
    the prefix as transformers 5 saves a CLIPVisionModel) -> open_clip ``VisionTransformer`` names. q/k/v are
    stacked into ``in_proj`` (as ``nn.MultiheadAttention`` keeps them), ``visual_projection`` (``[out, in]``, a
    Linear) becomes ``proj`` (``[in, out]``, used as ``x @ proj``). Text-tower tensors are dropped; names without a
    counterpart are kept, so a strict load reports them."""
    vision = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    if not vision and "embeddings.patch_embedding.weight" in state:  # transformers 5 drops the prefix
        vision = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    if not vision:
        raise ValueError("no vision_model.* tensors: expected the weights of a transformers CLIPModel or "
                         "CLIPVisionModel")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, value in vision.items():
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name.endswith("position_ids"):  # a buffer that older transformers versions saved
            continue
        if name in _CLIP_TOP:
            out[_CLIP_TOP[name]] = value
        elif layer and layer[2] in _CLIP_QKV:
            qkv.setdefault((f"transformer.resblocks.{layer[1]}.attn", layer[3]), {})[_CLIP_QKV[layer[2]]] = value
        elif layer and layer[2] in _CLIP_LAYER:
            out[f"transformer.resblocks.{layer[1]}.{_CLIP_LAYER[layer[2]]}.{layer[3]}"] = value
        else:
            out[f"vision_model.{name}"] = value
    out.update(_concat_qkv(qkv, "{prefix}.in_proj_{kind}"))
    if "visual_projection.weight" in state:
        out["proj"] = state["visual_projection.weight"].T.contiguous()
    return out


def timm_swin_kwargs(config: dict, source: str = "config.json") -> dict:
    """timm ``SwinTransformer`` arguments for the Swin (v1) that a transformers ``SwinConfig`` describes."""
    config = {**_SWIN_DEFAULTS, **config}
    _require(config, "hidden_act", ("gelu",), source)
    _require(config, "use_absolute_embeddings", (False,), source)
    _require(config, "layer_norm_eps", (1e-5,), source)  # timm's LayerNorm default
    _require(config, "num_channels", (3,), source)
    return {"img_size": config["image_size"], "patch_size": config["patch_size"], "embed_dim": config["embed_dim"],
            "depths": tuple(config["depths"]), "num_heads": tuple(config["num_heads"]),
            "window_size": config["window_size"], "mlp_ratio": config["mlp_ratio"], "qkv_bias": config["qkv_bias"],
            "drop_path_rate": config["drop_path_rate"]}


def hf_swin_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``SwinModel`` / ``SwinForImageClassification`` state dict -> timm ``SwinTransformer`` names. Query /
    key / value are stacked into ``qkv``; transformers keeps patch merging at the end of stage i, timm at the
    start of stage i + 1 (both concatenate the 2 x 2 neighbours in the same order). The classifier and the
    relative-position index buffers (timm recomputes them) are dropped; names without a counterpart are kept,
    so a strict load reports them."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, value in state.items():
        name = name.removeprefix("swin.")
        module, _, param = name.rpartition(".")
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", module)
        merge = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", module)
        if name.startswith("classifier.") or param == "relative_position_index":
            continue
        if module in _SWIN_TOP:
            out[f"{_SWIN_TOP[module]}.{param}"] = value
        elif merge:
            out[f"layers.{int(merge[1]) + 1}.downsample.{merge[2]}.{param}"] = value
        elif block and block[3] in _SWIN_QKV:
            qkv.setdefault((f"layers.{block[1]}.blocks.{block[2]}.attn", param), {})[_SWIN_QKV[block[3]]] = value
        elif block and block[3] in _SWIN_BLOCK:
            out[f"layers.{block[1]}.blocks.{block[2]}.{_SWIN_BLOCK[block[3]]}.{param}"] = value
        else:
            out[name] = value
    out.update(_concat_qkv(qkv, "{prefix}.qkv.{kind}"))
    return out
