"""LLaVA 1.5 in the Hugging Face layout (``llava-hf/llava-1.5-7b-hf``): read into medcap's vision-language model,
and written back.

A llava-hf folder holds ``config.json`` (``text_config`` for the Llama-2-architecture LLM, Vicuna-7B v1.5;
``vision_config`` for the CLIP ViT-L/14-336 tower; ``image_token_index``, ``vision_feature_layer``,
``vision_feature_select_strategy``, ``projector_hidden_act``), safetensors shards and the tokenizer files. Its
published config.json leaves most LLM keys out (transformers fills them with ``LlamaConfig``'s defaults, as done
here). The weights come in the layouts transformers has written: ``language_model.model.layers...`` +
``language_model.lm_head`` + ``vision_tower.vision_model...`` (the hub's files; transformers 5.x writes the same
but ``vision_tower.`` without ``vision_model.``), or ``model.language_model.layers...`` + ``lm_head`` +
``model.vision_tower...`` (transformers 4.52 - 4.5x); all are read.

The model: the CLIP tower as an open_clip ``VisionTransformer`` giving the hidden states of
``vision_feature_layer`` (counted as transformers counts ``hidden_states``: -2 = the output of the penultimate
block) without the class token (``default``) or with it (``full``); the projector Linear -> GELU -> Linear; the
LLM as a torchtune Llama-2 decoder of ``text_config``'s vocabulary (32064: ``<image>`` = 32000 and ``<pad>`` =
32001 lie inside it). ``save_llava_hf`` writes a trained model (LoRA merged, NF4 dequantised) back in the hub's
layout, for ``LlavaForConditionalGeneration.from_pretrained`` and the serving engines that read it.
"""

import json
import math
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from safetensors import safe_open
from torch import nn, Tensor
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
from torchtune.models.llama2._component_builders import llama2
from torchtune.modules import TransformerDecoder

from medcap.atomic import replaced_atomically
from medcap.models.tensor_files import read_json
from medcap.models import hf_vision
from medcap.models.encoders import CLIP_MEAN, CLIP_STD, _Encoder
from medcap.models.hf_export import check_output_dir, hf_llama_tensors
from medcap.models.llm_weights import _rope, hf_weight_files, load_strict, read_weight_file, weights_deferred
from medcap.models.lora import merged_tensors
from medcap.models.vlm import VisionLanguageModel
from medcap.safetensors_stream import write_streaming

# transformers' LlamaConfig / LlavaConfig defaults, for the keys a llava-hf config.json leaves out
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "multimodal_projector_bias": True}
PROJECTOR_NAMES = {"linear_1": "0", "linear_2": "2"}  # transformers' names -> nn.Sequential(Linear, GELU, Linear)
HUB_PROJECTOR = {v: k for k, v in PROJECTOR_NAMES.items()}
PROCESSOR_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


# --------------------------------------------------------------------------------------------- config.json

def read_llava_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a llava-hf folder with the defaults filled in and checked: ``text`` (Llama keys),
    ``vision`` (CLIP vision keys) and the LLaVA keys. A setting this reader cannot reproduce is an error naming
    the key."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a llava-hf folder such as llava-1.5-7b-hf)")
    raw = read_json(path)
    if raw.get("model_type") != "llava":
        raise ValueError(f"{path}: expected model_type 'llava' (a llava-hf folder), found {raw.get('model_type')!r}")
    config = {**LLAVA_DEFAULTS, **{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}}
    text = {**LLAMA_DEFAULTS, **raw.get("text_config", {})}
    vision = raw.get("vision_config", {})

    def fail(key: str, expected, found) -> ValueError:
        return ValueError(f"{path}: {key} is {found!r}; expected {expected}")

    if text.get("model_type", "llama") != "llama":
        raise fail("text_config.model_type", "'llama' (Vicuna)", text.get("model_type"))
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise fail("vision_config.model_type", "'clip_vision_model'", vision.get("model_type"))
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("tie_word_embeddings", False)):
        if text[key] != expected:
            raise fail(f"text_config.{key}", repr(expected), text[key])
    base, scaling = _rope(text)
    if scaling is not None:
        raise fail("text_config RoPE scaling", "none (Llama 2's plain RoPE)", scaling)
    dim, heads = text["hidden_size"], text["num_attention_heads"]
    if text.get("head_dim") not in (None, dim // heads):
        raise fail("text_config.head_dim", f"hidden_size / num_attention_heads = {dim // heads}", text["head_dim"])
    text["rope_theta"] = base
    if config["projector_hidden_act"] != "gelu":
        raise fail("projector_hidden_act", "'gelu' (LLaVA 1.5's projector)", config["projector_hidden_act"])
    if config["vision_feature_select_strategy"] not in ("default", "full"):
        raise fail("vision_feature_select_strategy", "'default' or 'full'", config["vision_feature_select_strategy"])
    layers = config["vision_feature_layer"]
    if not isinstance(layers, (int, list)) or isinstance(layers, bool):
        raise fail("vision_feature_layer", "an integer or a list of integers", layers)
    return {**config, "text": text, "vision": vision, "source": str(path)}


def llava_decoder(text: dict[str, Any], max_seq_len: int | None = None) -> TransformerDecoder:
    """The torchtune Llama-2 decoder that ``read_llava_config(...)["text"]`` describes."""
    heads = text["num_attention_heads"]
    return llama2(vocab_size=text["vocab_size"], num_layers=text["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=text.get("num_key_value_heads") or heads, embed_dim=text["hidden_size"],
                  max_seq_len=max_seq_len or text["max_position_embeddings"],
                  intermediate_dim=text["intermediate_size"], norm_eps=text["rms_norm_eps"],
                  rope_base=text["rope_theta"])


# --------------------------------------------------------------------------------------------- vision tower

class LlavaVisionEncoder(_Encoder):
    """LLaVA's CLIP tower (open_clip ``VisionTransformer``): ``[B, 3, H, W] -> [B, N, D]``, the hidden states of
    ``feature_layer`` (transformers' ``hidden_states`` index: -1 last block, -2 penultimate; several layers are
    concatenated on the feature dimension in the order given) without the class token (``select_strategy``
    ``default``) or with it first (``full``). ``output="pooled"`` gives instead CLIP's pooled embedding (the final
    norm of the class token; the tower has no projection), one token, for retrieval."""

    # the checkpoint's processor: resize the shorter side to image_size, centre crop, CLIP mean / std
    resize_mode = "crop"  # transformers' CLIPImageProcessor: shorter side, centre crop

    def __init__(self, vision_config: dict[str, Any], feature_layer: int | list[int] = -2,
                 select_strategy: str = "default", output: str = "patch", source: str = "config.json"):
        super().__init__()
        if output not in ("patch", "pooled"):
            raise ValueError(f"output must be 'patch' or 'pooled', got {output!r}")
        cfg = hf_vision.open_clip_cfg_from_hf_clip(vision_config, source)
        width = cfg["vision_cfg"]["width"]
        self.visual = open_clip.model._build_vision_tower(width, cfg["vision_cfg"], quick_gelu=cfg["quick_gelu"])
        with torch.no_grad():  # no projection in LLaVA's tower: the pooled output is the normed class token
            self.visual.proj.copy_(torch.eye(width))
        size = cfg["vision_cfg"]["image_size"]
        self.image_size, self.mean, self.std, self.output = size, CLIP_MEAN, CLIP_STD, output
        depth = cfg["vision_cfg"]["layers"]
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.blocks = [self._block(layer, depth, source) for layer in layers]
        self.keep_class_token = select_strategy == "full"
        self._measure()

    @staticmethod
    def _block(layer: int, depth: int, source: str) -> int:
        """transformers' hidden_states index -> the open_clip block whose output it is (index 0 is the
        embeddings, before any block, which this tower does not give)."""
        block = depth + layer if layer < 0 else layer - 1
        if not 0 <= block < depth:
            raise ValueError(f"{source}: vision_feature_layer {layer} is not the output of one of the tower's "
                             f"{depth} blocks (expected -{depth}..-1 or 1..{depth})")
        return block

    def forward(self, images: Tensor) -> Tensor:
        if self.output == "pooled":
            return self.visual(images).unsqueeze(1)
        wanted = sorted(set(self.blocks))
        out = self.visual.forward_intermediates(images, indices=wanted, stop_early=True, intermediates_only=True,
                                                output_fmt="NLC", output_extra_tokens=self.keep_class_token)
        by_block = dict(zip(wanted, out["image_intermediates"]))
        if self.keep_class_token:
            prefix = dict(zip(wanted, out["image_intermediates_prefix"]))
            by_block = {b: torch.cat([prefix[b], x], dim=1) for b, x in by_block.items()}
        return torch.cat([by_block[b] for b in self.blocks], dim=-1)


# --------------------------------------------------------------------------------------------- the model

class LlavaHFModel(VisionLanguageModel):
    """``VisionLanguageModel`` for a llava-hf checkpoint, whose image id (and pad id) lie inside the LLM's
    embedding table."""

    # UPDATED: EarlyFusionModel.forward (through VisionLanguageModel.embed) - without images (the decoding steps
    # after the prefill) every token is embedded, as transformers does; EarlyFusionModel would leave the position
    # of a generated <image> id (a row of the table here) unfilled.
    def embed(self, tokens: Tensor, encoder_input: dict | None) -> Tensor:
        if encoder_input is None:
            return self.tok_embeddings(tokens)
        return super().embed(tokens, encoder_input)


def _projector(in_dim: int, out_dim: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias), nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias))


# --------------------------------------------------------------------------------------------- weight names

def split_llava_name(name: str) -> tuple[str, str] | None:
    """(part, name within it) of a llava-hf tensor name, in any layout transformers wrote: ``llm`` with HF Llama
    names (``model.layers...``, ``lm_head.weight``), ``vision`` with HF CLIP names (``vision_model...``),
    ``projector`` with ``nn.Sequential`` names (``0.weight``...); None for a name of none of them."""
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if prefix == "model.language_model.":
                return "llm", "model." + rest
            return "llm", rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if name == "lm_head.weight":
        return "llm", name
    for prefix in ("vision_tower.", "model.vision_tower."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return "vision", rest if rest.startswith("vision_model.") else "vision_model." + rest
    match = re.fullmatch(r"(?:model\.)?multi_modal_projector\.(linear_[12])\.(weight|bias)", name)
    if match:
        return "projector", f"{PROJECTOR_NAMES[match[1]]}.{match[2]}"
    return None


def hub_name(part: str, name: str) -> str:
    """The llava-hf hub's name of a tensor that ``split_llava_name`` gives as (part, name)."""
    if part == "projector":
        index, _, kind = name.partition(".")
        return f"multi_modal_projector.{HUB_PROJECTOR[index]}.{kind}"
    return ("language_model." if part == "llm" else "vision_tower.") + name


# open_clip -> HF CLIP vision names, the inverses of hf_vision's maps
_HF_CLIP_TOP = {v: k for k, v in hf_vision._CLIP_TOP.items()}
_HF_CLIP_LAYER = {v: k for k, v in hf_vision._CLIP_LAYER.items()}
_HF_CLIP_QKV = {v: k for k, v in hf_vision._CLIP_QKV.items()}


def _hf_clip_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF CLIP vision name, shape) of an open_clip ``VisionTransformer`` tensor, the inverse of
    ``hf_vision.hf_clip_to_open_clip``: three for a fused ``in_proj`` (its q, k and v thirds, in that order), none
    for ``proj`` (an identity here)."""
    block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name)
    fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name)
    if name == "proj":
        return []
    if name in _HF_CLIP_TOP:
        return [(f"vision_model.{_HF_CLIP_TOP[name]}", shape)]
    if fused:
        third = (shape[0] // 3, *shape[1:])
        return [(f"vision_model.encoder.layers.{fused[1]}.{_HF_CLIP_QKV[piece]}.{fused[2]}", third) for piece in "qkv"]
    if block and block[2] in _HF_CLIP_LAYER:
        return [(f"vision_model.encoder.layers.{block[1]}.{_HF_CLIP_LAYER[block[2]]}.{block[3]}", shape)]
    raise ValueError(f"vision tower tensor {name!r} has no counterpart in transformers' CLIP")


def _tensors(folder: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[Path, dict[str, Tensor]]]:
    """(file, {name: tensor}) per weight file of ``folder``, with the names ``wanted`` (safetensors files are
    read only for those)."""
    for path in hf_weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                yield path, {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
        else:
            yield path, {k: v for k, v in read_weight_file(path).items() if wanted(k)}


def _llm_shapes(decoder: TransformerDecoder, text: dict) -> dict[tuple[str, str], tuple[int, ...]]:
    on_meta = {k: torch.empty(v.shape, device="meta") for k, v in decoder.state_dict().items()}
    heads = text["num_attention_heads"]
    hf = tune_to_hf(on_meta, num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
                    dim=text["hidden_size"])
    return {("llm", k): tuple(v.shape) for k, v in hf.items()}


def _vision_shapes(visual: nn.Module) -> dict[tuple[str, str], tuple[int, ...]]:
    return {("vision", name): shape for key, value in visual.state_dict().items()
            for name, shape in _hf_clip_names(key, tuple(value.shape))}


def _check_shapes(expected: dict[tuple[str, str], tuple[int, ...]], tensors: dict[str, Tensor],
                  source: Path) -> None:
    """A weight file's tensors, named as in the file, against the model's (part, name) shapes: a misshapen tensor
    or an LLM tensor the model has no place for is an error naming it and the file (the vision tower's extra
    names are left to its strict load)."""
    problems = []
    for name, value in tensors.items():
        key = split_llava_name(name)
        if key in expected and tuple(value.shape) != expected[key]:
            problems.append(f"{name}: expected shape {expected[key]}, found {tuple(value.shape)}")
        elif key not in expected and key[0] == "llm":
            problems.append(f"unexpected {name}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{source} does not fit the model of its config.json: {'; '.join(problems[:5])}{more}")


def _check_complete(folder: Path, expected: dict[tuple[str, str], tuple[int, ...]],
                    found: set[tuple[str, str]]) -> None:
    missing = sorted(hub_name(*key) for key in expected.keys() - found)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{folder}: no weight file holds {missing[:5]}{more} (named as on the llava-hf hub)")


def _load_llm(decoder: TransformerDecoder, llm: dict[str, Tensor], text: dict) -> None:
    """One weight file's LLM tensors (HF Llama names, shapes checked) into ``decoder`` through torchtune's name
    conversion."""
    heads = text["num_attention_heads"]
    state = hf_to_tune(llm, num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
                       dim=text["hidden_size"])
    decoder.load_state_dict(state, strict=False)


def _unknown_names(source: Path, names: list[str]) -> ValueError:
    return ValueError(f"{source}: tensor(s) {names[:3]} belong to no part of a LLaVA model (expected "
                      f"language_model.*, vision_tower.*, multi_modal_projector.* or lm_head.weight)")


def _vision_state(vision: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    state = hf_vision.hf_clip_to_open_clip(vision)
    state["proj"] = torch.eye(width)
    return state


def llava_hf_model(model_dir: str, trainable: dict[str, str] | None = None, lora: dict | None = None,
                   max_seq_len: int | None = None) -> LlavaHFModel:
    """LLaVA 1.5 from a llava-hf folder, all three parts with their weights (see the module docstring)."""
    folder = Path(model_dir)
    config = read_llava_config(folder)
    text, vision = config["text"], config["vision"]
    decoder = llava_decoder(text, max_seq_len)
    encoder = LlavaVisionEncoder(vision, config["vision_feature_layer"], config["vision_feature_select_strategy"],
                                 source=config["source"])
    hf_vision.follow_processor(encoder, folder, "CLIP", "crop")
    projector = _projector(encoder.embed_dim, text["hidden_size"], config["multimodal_projector_bias"])

    def build() -> LlavaHFModel:
        return LlavaHFModel(decoder, encoder, projector, config["image_token_index"], trainable, 1, lora)

    if weights_deferred():  # a skeleton whose weights rank 0 will broadcast (see medcap.runtime)
        return build()
    expected = {**_llm_shapes(decoder, text), **_vision_shapes(encoder.visual),
                **{("projector", k): tuple(v.shape) for k, v in projector.state_dict().items()}}
    found: set[tuple[str, str]] = set()
    vision_tensors, projector_tensors = {}, {}
    for path, tensors in _tensors(folder, lambda name: True):
        parts: dict[str, dict[str, Tensor]] = {"llm": {}, "vision": {}, "projector": {}}
        unknown = []
        for name, value in tensors.items():
            key = split_llava_name(name)
            if key is None:
                unknown.append(name)
            else:
                parts[key[0]][key[1]] = value
                found.add(key)
        if unknown:
            raise _unknown_names(path, unknown)
        _check_shapes(expected, tensors, path)  # before the q/k permutation meets a wrong shape
        _load_llm(decoder, parts["llm"], text)
        vision_tensors.update(parts["vision"])  # a layer's q / k / v may sit in different shards
        projector_tensors.update(parts["projector"])
    _check_complete(folder, expected, found)
    load_strict(encoder.visual, _vision_state(vision_tensors, encoder.visual.proj.shape[0]), f"{folder} (vision tower)")
    load_strict(projector, projector_tensors, f"{folder} (multi_modal_projector)")
    return build()


def llava_hf_vision_encoder(model_dir: str, output: str = "pooled") -> LlavaVisionEncoder:
    """The CLIP tower of a llava-hf folder alone (only its tensors are read), e.g. to embed images for retrieval:
    ``output="pooled"`` (CLIP's pooled class token) or ``"patch"`` (the LLM's image features before the
    projector)."""
    folder = Path(model_dir)
    config = read_llava_config(folder)
    encoder = LlavaVisionEncoder(config["vision"], config["vision_feature_layer"],
                                 config["vision_feature_select_strategy"], output, config["source"])
    hf_vision.follow_processor(encoder, folder, "CLIP", "crop")
    expected = _vision_shapes(encoder.visual)
    vision: dict[str, Tensor] = {}
    for path, tensors in _tensors(folder, lambda name: (split_llava_name(name) or ("",))[0] == "vision"):
        _check_shapes(expected, tensors, path)
        vision.update({split_llava_name(k)[1]: v for k, v in tensors.items()})
    _check_complete(folder, expected, {("vision", name) for name in vision})
    load_strict(encoder.visual, _vision_state(vision, encoder.visual.proj.shape[0]), f"{folder} (vision tower)")
    return encoder


# --------------------------------------------------------------------------------------------- export

def llava_hf_tensors(model: LlavaHFModel) -> tuple[list[tuple[str, tuple[int, ...]]], Callable[[str], Tensor]]:
    """((llava-hf hub name, shape) in file order, function computing one tensor) of the model's weights, adapters
    merged (in fp32) and NF4 weights dequantised; nothing is computed until a name is asked for."""
    llm_entries, llm_tensor = hf_llama_tensors(model)
    vision_shapes, vision_tensor = merged_tensors(model.vision.encoder.visual)
    projector_shapes, projector_tensor = merged_tensors(model.vision.projector)
    if "proj" in vision_shapes:
        proj = vision_tensor("proj").float()
        if not torch.equal(proj, torch.eye(proj.shape[0], device=proj.device)):
            raise ValueError("the vision tower's proj is not the identity: LLaVA's tower has no projection")

    def vision_piece(key: str, index: int, count: int) -> Tensor:
        return vision_tensor(key).chunk(count)[index]

    entries, make = [], {}

    def add(name: str, shape: tuple[int, ...], compute: Callable[[], Tensor]) -> None:
        entries.append((name, shape))
        make[name] = compute

    for name, shape in llm_entries:
        add(hub_name("llm", name), shape, partial(llm_tensor, name))
    for key, shape in vision_shapes.items():
        pieces = _hf_clip_names(key, shape)
        for index, (name, piece) in enumerate(pieces):
            add(hub_name("vision", name), piece, partial(vision_piece, key, index, len(pieces)))
    for key, shape in projector_shapes.items():
        add(hub_name("projector", key), shape, partial(projector_tensor, key))
    return entries, lambda name: make[name]()


def _source_shapes(folder: Path) -> dict[tuple[str, str], tuple[int, ...]]:
    """{(part, name): shape} of a llava-hf folder's tensors, from the safetensors headers (nothing is loaded)."""
    shapes = {}
    for path in hf_weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                found = split_llava_name(key)
                if found:
                    shapes[found] = tuple(f.get_slice(key).get_shape())
    return shapes


def _write_shards(entries: list[tuple[str, tuple[int, ...]]], produce: Callable[[str], Tensor], dtype: torch.dtype,
                  folder: Path, max_shard_bytes: int) -> None:
    """The tensors in shards of at most ``max_shard_bytes`` (a larger tensor alone), each streamed one tensor at
    a time, with their index when there are several."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = {name: size * math.prod(shape) for name, shape in entries}
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in entries:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += sizes[name]
    # each file's tensors by name, as safetensors' save_file lays them out
    if len(shards) == 1:
        write_streaming(folder / "model.safetensors", sorted(shards[0]), dtype, produce, metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(folder / file, sorted(shard), dtype, produce, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
    index_json = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def save_llava_hf(model: LlavaHFModel, out_dir: str | Path, source_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (built by ``builders.llava_hf`` from ``source_dir``, trained parts loaded) to ``out_dir``
    as a llava-hf folder: weights in the hub's layout (``language_model.model.*``, ``language_model.lm_head``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``), LoRA adapters merged (in fp32) and NF4 weights
    dequantised, cast to ``dtype``, in shards of at most ``max_shard_bytes`` (with their index when there are
    several), each tensor computed only when it is written; ``source_dir``'s config.json (its dtype updated) and
    tokenizer / processor files copied. Every tensor's name and shape is checked against ``source_dir``'s. The
    folder is written under a temporary name and renamed into place (``medcap.atomic``); an ``out_dir`` that is,
    holds or lies inside ``source_dir`` is refused."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    read_llava_config(source_dir)  # a llava-hf folder, or a one-line error
    check_output_dir(out_dir, {"source folder": source_dir})
    entries, produce = llava_hf_tensors(model)
    expected = _source_shapes(source_dir)
    if expected:
        ours = {split_llava_name(name): shape for name, shape in entries}
        differ = sorted(f"{p}.{n}" for (p, n) in set(expected) ^ set(ours))
        differ += sorted(f"{p}.{n} {ours[(p, n)]} vs {shape}" for (p, n), shape in expected.items()
                         if (p, n) in ours and ours[(p, n)] != shape)
        if differ:
            raise ValueError(f"the model does not match {source_dir} (the folder it must have been built from): "
                             f"{differ[:5]}")
    config = read_json(source_dir / "config.json")
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    with replaced_atomically(out_dir, folder=True) as tmp:
        _write_shards(entries, produce, dtype, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for file in PROCESSOR_FILES:
            if (source_dir / file).is_file():
                shutil.copy2(source_dir / file, tmp / file)
    return out_dir
