"""The vision-language model: vision tokens injected into a decoder-only LLM at image placeholder positions."""

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn, Tensor
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import EarlyFusionModel

from medcap.models.linear import use_few_rows_products
from medcap.models.lora import ADAPTERS, LoRASettings, add_lora
from medcap.models.projectors import projector_num_tokens

TRAIN_MODES = ("frozen", "lora", "qlora", "full")
PARTS = ("encoder", "projector", "decoder")
DEFAULT_LORA_TARGETS = {"encoder": ["q", "v"], "decoder": ["q_proj", "v_proj"]}


class VisionTower(nn.Module):
    """Encoder + projector: images [B, I, 3, H, W] (or [B, 3, H, W]) -> [B, I / V * tokens_per_image, D_llm].

    With ``views_per_block`` V > 1 (R2GenGPT's multi-view studies) each run of V consecutive images is encoded
    view by view, the encoder outputs are averaged over the views, and the average is projected: one block of
    ``tokens_per_image`` tokens per V images."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, views_per_block: int = 1):
        super().__init__()
        if views_per_block < 1:
            raise ValueError(f"views_per_block must be at least 1, got {views_per_block}")
        self.encoder = encoder
        self.projector = projector
        self.views_per_block = views_per_block
        self.tokens_per_image = projector_num_tokens(projector, encoder.num_tokens)

    def forward(self, images: Tensor) -> Tensor:
        views = self.views_per_block
        if images.dim() == 4:  # all images of a batch in a row (see collate_captions): blocks in that order
            images = images.unsqueeze(1) if views == 1 else images.unsqueeze(0)
        batch, per_sample = images.shape[:2]
        if per_sample % views:
            raise ValueError(f"{per_sample} images per sample cannot form blocks of views_per_block={views}")
        encoded = self.encoder(images.flatten(0, 1))
        if views > 1:
            encoded = encoded.unflatten(0, (-1, views)).mean(1)
        tokens = self.projector(encoded)
        return tokens.reshape(batch, per_sample // views * tokens.shape[1], tokens.shape[2])


class VisionLanguageModel(EarlyFusionModel):
    """``EarlyFusionModel`` with one vision tower under ``encoders["image"]``.

    Each image becomes ``tokens_per_image`` copies of ``image_token_id`` in the prompt; their embeddings are
    replaced by the projected vision tokens. ``trainable`` picks per part (encoder / projector / decoder) how it
    trains: ``frozen``, ``full``, ``lora`` (frozen, with adapters that train) or, for the decoder, ``qlora``
    (LoRA on base weights frozen in NF4). ``lora`` gives per part the adapter settings (rank, alpha, dropout,
    targets; see ``medcap.models.lora``), by default q/v of the attention. Frozen parts, and the base layers of
    adapted parts, stay in eval mode (BatchNorm statistics and dropout untouched) even when the model is put in
    training mode.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        encoder: nn.Module,
        projector: nn.Module,
        image_token_id: int,
        trainable: dict[str, str] | None = None,
        views_per_block: int = 1,
        lora: dict[str, dict] | None = None,
        frozen_in_train_mode: bool = False,
    ):
        super().__init__(decoder, {"image": VisionTower(encoder, projector, views_per_block)},
                         {"image": image_token_id})
        self.image_token_id = image_token_id
        self.frozen_in_train_mode = bool(frozen_in_train_mode)  # null in a config: false
        self.trainable = {"encoder": "full", "projector": "full", "decoder": "frozen", **(trainable or {})}
        for part, mode in self.trainable.items():
            if part not in PARTS or mode not in TRAIN_MODES:
                raise ValueError(f"trainable.{part}={mode!r}: parts are {PARTS}, modes are {TRAIN_MODES}")
        if self.trainable["projector"] in ("lora", "qlora") or self.trainable["encoder"] == "qlora":
            raise ValueError(f"trainable={self.trainable}: lora is for the encoder and the decoder, qlora for the "
                             f"decoder only")
        lora = dict(lora or {})
        for part in lora:
            if part not in DEFAULT_LORA_TARGETS:
                raise ValueError(f"lora.{part}: adapters go on {list(DEFAULT_LORA_TARGETS)}")
        use_few_rows_products(decoder)  # before adapters wrap the linears: AdaptedLinear keeps only the weight
        self.lora_settings = {}
        self.compute_dtype: torch.dtype | None = None  # set by medcap.precision when trained parts are fp32
        for part, module in self.parts().items():
            mode = self.trainable[part]
            module.requires_grad_(mode == "full")
            if mode in ("lora", "qlora"):
                settings = LoRASettings(**{"targets": DEFAULT_LORA_TARGETS[part], **(lora.get(part) or {})})
                # the decoder's layers only: token embeddings and the output projection stay as they are
                add_lora(self.decoder.layers if part == "decoder" else module, settings,
                         quantize_base=mode == "qlora", part=part)
                self.lora_settings[part] = settings

    @property
    def vision(self) -> VisionTower:
        return self.encoders["image"]

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image

    @property
    def views_per_block(self) -> int:
        return self.vision.views_per_block

    def parts(self) -> dict[str, nn.Module]:
        # The decoder's token embeddings live on the fusion model itself (EarlyFusionModel moves them).
        decoder = nn.ModuleList([self.decoder, self.tok_embeddings])
        return {"encoder": self.vision.encoder, "projector": self.vision.projector, "decoder": decoder}

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        """Parts that are not trained in full stay in eval mode (no dropout or stochastic depth in what they
        compute), their adapters follow ``mode``. ``frozen_in_train_mode``: every part follows ``mode``, as
        R2GenGPT's ``model.train()`` left its frozen Swin-B with its stochastic depth (drop_path 0.1) on."""
        super().train(mode)
        if self.frozen_in_train_mode:
            return self
        for part, module in self.parts().items():
            if self.trainable[part] != "full":
                module.eval()
            if self.trainable[part] in ("lora", "qlora"):
                for layer in module.modules():
                    if isinstance(layer, ADAPTERS):
                        layer.train(mode)
        return self

    # UPDATED: EarlyFusionModel.setup_caches - it sizes the KV cache to the decoder's max_seq_len (131072 for
    # Llama 3.1, ~17 GB per sequence at 8B); generation needs only prompt + max new tokens.
    def setup_caches(self, batch_size: int, dtype: torch.dtype, decoder_max_seq_len: int | None = None) -> None:
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    # UPDATED: EarlyFusionModel.forward - (1) masked_scatter silently ignores surplus or missing vision tokens:
    # the placeholders and the vision tokens are checked to agree before fusing; (2) the output projection runs
    # only where logits are needed (``output_at``): the labelled positions in training, the last position in a
    # prefill, instead of [B, L, vocab] logits plus an fp32 copy; (3) with ``compute_dtype`` set (fp32 trained
    # parts next to a bf16 LLM) the forward runs under autocast.
    def forward(self, tokens: Tensor, *, encoder_input: dict[str, dict[str, Any]] | None = None,
                mask: Tensor | None = None, input_pos: Tensor | None = None,
                output_at: Tensor | str | None = None, **kwargs) -> Tensor:
        with autocast_to(self.compute_dtype, tokens.device):
            embeds = self.embed(tokens, encoder_input)
            return run_decoder(self.decoder, embeds, mask=mask, input_pos=input_pos, output_at=output_at)

    def embed(self, tokens: Tensor, encoder_input: dict[str, dict[str, Any]] | None) -> Tensor:
        """Text embeddings with the projected vision tokens at the image placeholders: [B, L, D]."""
        is_text, text_embeds = self._decoder_embed(tokens)
        embeds = text_embeds.new_empty(*tokens.shape, text_embeds.shape[-1])
        embeds = embeds.masked_scatter(is_text.unsqueeze(-1), text_embeds)
        if encoder_input is None:
            return embeds
        images = encoder_input["image"]["images"]
        count = images.shape[0] * (1 if images.dim() == 4 else images.shape[1])
        expected = count // self.views_per_block * self.tokens_per_image
        at_image = tokens == self.image_token_id
        found = int(at_image.sum())
        if found != expected:
            per_block = f", {self.views_per_block} views per block" if self.views_per_block > 1 else ""
            raise ValueError(
                f"the batch holds {found} image placeholder tokens but its {count} image(s) give {expected} "
                f"vision tokens ({self.tokens_per_image} per image{per_block})"
            )
        vision = self.vision(images).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(at_image.unsqueeze(-1), vision)


@contextmanager
def autocast_to(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` (the frozen weights' dtype) when trained parts are kept in fp32 next to them."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def run_decoder(decoder: TransformerDecoder, embeds: Tensor, *, mask: Tensor | None = None,
                input_pos: Tensor | None = None, output_at: Tensor | str | None = None) -> Tensor:
    """The decoder's layers and final norm on ``embeds`` [B, L, D], then its output projection where asked:
    everywhere (``output_at=None``: [B, L, V]), at the last position (``"last"``: [B, V]) or at the positions
    a boolean [B, L] mask marks ([N, V], in row-major order). Logits stay in the weights' dtype."""
    # UPDATED: TransformerDecoder.forward - the same layers, norm and output, but the output projection is not
    # applied to every position, and its result is not copied to fp32 (the loss upcasts what it uses).
    if embeds.shape[1] > decoder.max_seq_len:
        raise ValueError(f"sequence of {embeds.shape[1]} tokens is longer than the decoder's max_seq_len "
                         f"{decoder.max_seq_len}")
    if decoder.caches_are_enabled() and (mask is None or input_pos is None):
        raise ValueError("with a KV cache the decoder needs a mask and input_pos")
    h = embeds
    for layer in decoder.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    if isinstance(output_at, str):
        if output_at != "last":
            raise ValueError(f"output_at must be None, 'last' or a boolean mask, got {output_at!r}")
        h = h[:, -1]
    elif output_at is not None:
        h = h[output_at]
    return decoder.output(decoder.norm(h))
