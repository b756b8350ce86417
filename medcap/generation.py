"""Batched caption generation for the vision-language model.

Prompts are left-padded; the image is encoded once, in the prefill, and each later step feeds one token
through a KV cache sized to prompt + max_new_tokens. ``use_cache=False`` re-runs the whole sequence (and the
vision tower) every step, as the medcap seed did; it exists for tests and benchmarks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from logits [B, V]: greedy when temperature is 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p; the first token always stays
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = True
    return tokens, mask


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    images: Tensor | None,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generated token ids per prompt, without the stop token. ``images`` holds all images of the batch in
    prompt order (see ``collate_captions``)."""
    device = next(model.parameters()).device
    tokens, padding_mask = left_pad(prompts, pad_id)
    tokens, padding_mask = tokens.to(device), padding_mask.to(device)
    batch, prompt_len = tokens.shape
    total_len = prompt_len + max_new_tokens
    image_dtype = next(model.vision.parameters()).dtype if images is not None else None
    encoder_input = None if images is None else {"image": {"images": images.to(device, image_dtype)}}
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)

    # Positions and causal masks for the whole run, generated tokens being real (not padding).
    full_mask = F.pad(padding_mask, (0, max_new_tokens), value=True)
    causal = get_causal_mask_from_padding_mask(full_mask, target_seq_len=total_len)
    positions = get_position_ids_from_padding_mask(full_mask)

    if use_cache:
        dtype = next(model.decoder.parameters()).dtype
        with device:  # torchtune allocates the caches on the default device
            model.setup_caches(batch, dtype, decoder_max_seq_len=total_len)
    try:
        # with a cache the keys span the whole cache; without one, only the tokens fed so far
        prefill_mask = causal[:, :prompt_len] if use_cache else causal[:, :prompt_len, :prompt_len]
        logits = model(tokens, mask=prefill_mask, input_pos=positions[:, :prompt_len],
                       encoder_input=encoder_input)[:, -1]
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            next_token = torch.where(done, pad_id, next_token)
            out[:, step] = next_token
            stopped = torch.isin(next_token, stop) & ~done
            lengths[stopped] = step
            done |= stopped
            if done.all() or step == max_new_tokens - 1:
                break
            pos = prompt_len + step
            if use_cache:
                logits = model(next_token[:, None], mask=causal[:, pos:pos + 1], input_pos=positions[:, pos:pos + 1])
            else:
                seq = torch.cat([tokens, out[:, :step + 1]], dim=1)
                logits = model(seq, mask=causal[:, :pos + 1, :pos + 1], input_pos=positions[:, :pos + 1],
                               encoder_input=encoder_input)
            logits = logits[:, -1]
    finally:
        if use_cache:
            delete_kv_caches(model)
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]
