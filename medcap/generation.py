"""Caption generation for the vision-language model: greedy, top-k / top-p sampling and beam search.

Prompts are left-padded; the image is encoded once, in the prefill, and each later step feeds one token per row
through a KV cache sized to prompt + max_new_tokens. Beam search prefills each prompt once, copies its cache rows
to its beams, and each step moves the cache rows along with the beams they extend. A row that has stopped (greedy,
sampling), or a prompt whose beam search is decided, leaves the batch with its cache rows, so the steps that remain
cost what the rows still decoding cost. ``use_cache=False`` re-runs the whole sequence (and the vision tower) every
step, as the medcap seed did; it exists for tests and benchmarks.

The decoding rules mean what they mean in Hugging Face ``generate``, so that published settings (R2GenGPT: beam 3,
repetition penalty 2.0, length penalty 2.0, 40-100 new tokens) carry over:

- ``repetition_penalty`` p (CTRL): the score of every token seen so far is divided by p where positive and
  multiplied by p where negative (once per token, however often it was seen).
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already seen scores -inf.
- ``min_new_tokens``: the stop tokens score -inf until that many tokens were generated.
- Greedy and sampling apply these rules to the logits, before temperature / top-k / top-p. Beam search applies them
  to the log-probabilities (as Hugging Face's beam search does; they are not renormalised), ranks running beams by
  their summed log-probability and scores a finished hypothesis sum / length ** length_penalty, the length
  counting the stop token (or max_new_tokens), as transformers does since 4.33 (``length_normalization:
  with_end_token``). ``length_normalization: hf_4_30`` is transformers 4.30's rule as R2GenGPT met it: 4.30 divided
  by the length of the hypothesis' ``input_ids`` row without the end token, and for a prompt given as
  ``inputs_embeds`` that row is ``<s>`` + the generated tokens: so a hypothesis that ends with the stop token has the
  same length, and one cut at max_new_tokens has max_new_tokens + 1. A prompt is done once it holds num_beams
  finished hypotheses and its best running beam, scored at its current length, does not beat the worst of them (HF's
  ``early_stopping=False``; the current length counts the token being chosen, as 4.30's ``cur_len`` did for a prompt
  given as embeddings, in both conventions). ``hf_4_30`` also keeps 4.30's stopping rule: the best candidate of the
  step (a stop token's included) rather than the best running beam, checked after the last step too, and only a
  prompt not done then gets its running beams as hypotheses cut at max_new_tokens.

"Seen" tokens are the prompt's text tokens (padding and image placeholders never count) and the generated ones;
with ``penalize_prompt=False`` only the generated ones count, which is what R2GenGPT got from Hugging Face by
passing its prompt as embeddings.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches

from medcap import distributed
from medcap.models.kv_cache import PrefixKVCache, use_prefix_caches
from medcap.models.linear import pack_products, unpack_products

NO_TOKEN = -1  # in a row's history: a position that never counts as seen (padding, image placeholders)
# beam search: what a hypothesis cut at max_new_tokens counts beyond its tokens (see the module docstring)
LENGTH_NORMALIZATION = {"with_end_token": 0, "hf_4_30": 1}


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from logits [B, V]: greedy when temperature is 0, else top-k / top-p sampling
    (``top_k`` None or 0: off, as in transformers)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or null: off), got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be between 0 and 1 (null: off), got {top_p}")
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        best, candidates = torch.topk(logits, top_k)  # sorted, best first
        if bool((logits >= best[:, -1:]).sum(-1).le(top_k).all()):
            # no score tied with the k-th: top-k keeps exactly these k, so top-p and the draw need only them
            # (the same distribution as over the whole vocabulary, without sorting it)
            if top_p is not None:
                best = best.masked_fill(_beyond_top_p(best, top_p), float("-inf"))
            pick = torch.multinomial(best.softmax(-1), 1, generator=generator)
            return candidates.gather(-1, pick).squeeze(-1)
        logits = logits.masked_fill(logits < best[:, -1:], float("-inf"))  # ties kept, as transformers keeps them
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(_beyond_top_p(sorted_logits, top_p),
                                                                     float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _beyond_top_p(sorted_logits: Tensor, top_p: float) -> Tensor:
    """Where a token (scores sorted best first) falls outside top-p: the tokens ranked above it already cover
    top_p. The first token always stays."""
    probs = sorted_logits.softmax(-1)
    beyond = probs.cumsum(-1) - probs >= top_p
    beyond[..., 0] = False  # top_p 0 keeps the best token, as transformers does
    return beyond


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = True
    return tokens, mask


def rank_batches(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[tuple[int, list[int]]]:
    """The batches (index, sample indices) one of ``world_size`` processes generates: the data set is cut into
    batches in order, as a single process would, and the batches are dealt out in turn. Every batch is the same
    wherever it runs, so a multi-process run reproduces the single-process output."""
    batches = [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]
    return [(i, batches[i]) for i in range(rank, len(batches), world_size)]


class DecodingRules:
    """Repetition penalty, no-repeat n-grams and a minimum number of new tokens, applied to next-token scores
    [R, V]. ``history`` [R, L] holds what each row has seen, ``NO_TOKEN`` where nothing counts."""

    def __init__(self, history: Tensor, stop_ids: list[int], repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, min_new_tokens: int = 0):
        self.history = history
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=history.device)
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.min_new_tokens = min_new_tokens
        self.new_tokens = 0

    @property
    def active(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0

    def push(self, tokens: Tensor) -> None:
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.new_tokens += 1

    def select(self, rows: Tensor) -> None:
        self.history = self.history[rows]

    def _token_mask(self, ids: Tensor, vocab: int) -> Tensor:
        """[R, vocab] True at every id of ``ids`` [R, N] (ids outside the vocabulary, NO_TOKEN included, ignored)."""
        index = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
        mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
        return mask.scatter_(1, index, True)[:, :vocab]

    def _penalize_seen(self, scores: Tensor, p: float) -> Tensor:
        """``scores`` with each seen token's score divided by ``p`` (positive) or multiplied by it, computed on the
        gathered [R, L] scores of the seen ids, not over the whole vocabulary (five passes over [R, V] saved)."""
        ids, vocab = self.history, scores.shape[-1]
        if ids.shape[1] == 0:
            return scores
        valid = (ids >= 0) & (ids < vocab)
        has = valid.any(1, keepdim=True)
        # an id outside the vocabulary stands for a seen one of its row (the same value written twice), or for
        # token 0 left as it is in a row that saw nothing
        first = ids.gather(1, valid.long().argmax(1, keepdim=True))
        ids = torch.where(valid, ids, torch.where(has, first, 0))
        seen = scores.gather(1, ids)
        penalized = torch.where(has, torch.where(seen < 0, seen * p, seen / p), seen)
        return scores.scatter(1, ids, penalized)

    def apply(self, scores: Tensor) -> Tensor:
        if not self.active:
            return scores
        vocab = scores.shape[-1]
        if self.repetition_penalty != 1.0:
            scores = self._penalize_seen(scores, self.repetition_penalty)
        n = self.no_repeat_ngram_size
        if n > 0 and self.history.shape[1] >= n:
            windows = self.history.unfold(1, n, 1)  # [R, L - n + 1, n]: every n-gram seen so far
            prefix = self.history[:, self.history.shape[1] - n + 1:]  # the last n - 1 tokens
            repeats = ((windows[..., :-1] == prefix[:, None]).all(-1) & (windows >= 0).all(-1)
                       & (prefix >= 0).all(-1, keepdim=True))
            banned = torch.where(repeats, windows[..., -1], NO_TOKEN)
            scores = scores.masked_fill(self._token_mask(banned, vocab), float("-inf"))
        if self.new_tokens < self.min_new_tokens:
            scores = scores.index_fill(-1, self.stop, float("-inf"))
        return scores


class _Runner:
    """Feeds left-padded prompts (with their images) once, then one token per row per step: through a KV cache,
    or by re-running the whole sequence. Beam search multiplies the rows after the prefill (``expand``) and
    reorders them every step (``reorder``)."""

    def __init__(self, model, prompts: list[list[int]], images: Tensor | None, pad_id: int, max_new_tokens: int,
                 use_cache: bool, pack_weights: bool = True):
        self.model, self.use_cache = model, use_cache
        device = next(model.parameters()).device
        if pack_weights and device.type == "cpu":  # kept for the next call while the weights do not change
            pack_products(model.decoder, compute_dtype=getattr(model, "compute_dtype", None))
        else:
            unpack_products(model.decoder)
        tokens, padding_mask = left_pad(prompts, pad_id)
        self.tokens, self.padding_mask = tokens.to(device), padding_mask.to(device)
        batch, self.prompt_len = tokens.shape
        total_len = self.prompt_len + max_new_tokens
        # positions and causal masks for the whole run, generated tokens being real (not padding)
        full_mask = F.pad(self.padding_mask, (0, max_new_tokens), value=True)
        self.causal = get_causal_mask_from_padding_mask(full_mask, target_seq_len=total_len)
        self.positions = get_position_ids_from_padding_mask(full_mask)
        self.images = None if images is None else images.to(device, next(model.vision.parameters()).dtype)
        self.generated = self.tokens.new_empty((batch, 0))
        self.caches: list[PrefixKVCache] = []
        if use_cache:
            with device:  # torchtune allocates the caches on the default device
                model.setup_caches(batch, next(model.decoder.parameters()).dtype, decoder_max_seq_len=total_len)
            self.caches = use_prefix_caches(model)

    def _encoder_input(self):
        return None if self.images is None else {"image": {"images": self.images}}

    def prefill(self) -> Tensor:
        """Next-token logits [B, V] after each prompt (the only time the vision tower runs with a cache)."""
        n = self.prompt_len
        # the keys span the tokens fed so far (the prefix caches return only what they hold)
        logits = self.model(self.tokens, mask=self.causal[:, :n, :n], input_pos=self.positions[:, :n],
                            encoder_input=self._encoder_input(), output_at="last")
        if self.use_cache:
            self.images = None  # in the cache now
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Appends ``tokens`` [R] to the rows and returns the next-token logits [R, V]."""
        self.generated = torch.cat([self.generated, tokens[:, None]], dim=1)
        pos = self.prompt_len + self.generated.shape[1] - 1
        if self.use_cache:
            logits = self.model(tokens[:, None], mask=self.causal[:, pos:pos + 1, :pos + 1],
                                input_pos=self.positions[:, pos:pos + 1], output_at="last")
        else:
            seq = torch.cat([self.tokens, self.generated], dim=1)
            logits = self.model(seq, mask=self.causal[:, :pos + 1, :pos + 1], input_pos=self.positions[:, :pos + 1],
                                encoder_input=self._encoder_input(), output_at="last")
        return logits

    def history(self, penalize_prompt: bool) -> Tensor:
        """The ids each row has seen, for ``DecodingRules``: the prompt's text tokens, or none of the prompt."""
        if not penalize_prompt:
            return self.generated.clone()
        keep = self.padding_mask.clone()
        image_id = getattr(self.model, "image_token_id", None)
        if image_id is not None:
            keep &= self.tokens != image_id
        return torch.cat([torch.where(keep, self.tokens, NO_TOKEN), self.generated], dim=1)

    def expand(self, k: int) -> None:
        """Each row becomes ``k`` consecutive copies of itself (its beams)."""
        if self.images is not None:
            self.images = self._repeat_images(k)
        self.take(torch.arange(self.tokens.shape[0], device=self.tokens.device).repeat_interleave(k))

    def take(self, rows: Tensor) -> None:
        """Only ``rows`` go on, in that order (repeated by ``expand``; the finished ones left out by ``generate``).
        The images are not taken along: with a cache they are no longer needed after the prefill."""
        self.tokens, self.padding_mask = self.tokens[rows], self.padding_mask[rows]
        self.causal, self.positions, self.generated = self.causal[rows], self.positions[rows], self.generated[rows]
        for cache in self.caches:
            # UPDATED: torchtune KVCache - it has no way to grow, shrink or reorder its batch; its k_cache / v_cache
            # buffers are [batch, heads, seq, head_dim] and are indexed on the batch dim here. cache_pos (the
            # next position to write) is shared by all rows, so it stays as it is.
            cache.k_cache, cache.v_cache = cache.k_cache.index_select(0, rows), cache.v_cache.index_select(0, rows)
            cache.batch_size = len(rows)

    def _repeat_images(self, k: int) -> Tensor:
        if self.images.dim() == 5:  # [B, I, 3, H, W]
            return self.images.repeat_interleave(k, dim=0)
        # [N, 3, H, W]: all images of the batch in prompt order; count each prompt's from its placeholders
        model = self.model
        placeholders = (self.tokens == model.image_token_id).sum(1)
        per_prompt = placeholders // model.tokens_per_image * getattr(model, "views_per_block", 1)
        chunks = self.images.split(per_prompt.tolist())
        return torch.cat([c.repeat(k, 1, 1, 1) for c in chunks])

    def reorder(self, rows: Tensor) -> None:
        """Row i continues from row ``rows[i]`` (beam search: the beam a candidate extends)."""
        filled = self.prompt_len + self.generated.shape[1]
        self.generated = self.generated[rows]
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return
        # see expand: only the positions written so far are moved; index_select gathers the rows ~3x faster than
        # indexing with the tensor (a [96, 3, 60, 64] cache: 0.24 vs 0.74 ms, 60 caches per step)
        for cache in self.caches:
            cache.k_cache[:, :, :filled] = cache.k_cache[:, :, :filled].index_select(0, rows)
            cache.v_cache[:, :, :filled] = cache.v_cache[:, :, :filled].index_select(0, rows)

    def close(self) -> None:
        if self.use_cache:
            delete_kv_caches(self.model)


def _check_settings(max_new_tokens, num_beams, temperature, length_penalty, repetition_penalty,
                    no_repeat_ngram_size, min_new_tokens) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if num_beams > 1 and temperature > 0:
        raise ValueError(f"beam search is deterministic: set temperature to 0 (got {temperature}) or num_beams to 1")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive (1.0 = off), got {repetition_penalty}")
    if no_repeat_ngram_size < 0 or min_new_tokens < 0:
        raise ValueError(f"no_repeat_ngram_size and min_new_tokens must be >= 0, got {no_repeat_ngram_size} "
                         f"and {min_new_tokens}")
    if not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")


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
    num_beams: int = 1,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    penalize_prompt: bool = True,
    length_normalization: str = "with_end_token",
    pack_weights: bool = True,
) -> list[list[int]]:
    """Generated token ids per prompt, without the stop token. ``images`` holds all images of the batch in
    prompt order (see ``collate_captions``). ``num_beams > 1`` runs ``beam_search``. ``pack_weights`` (on a
    CPU): the decoder's products run on packed copies of its weights (``medcap.models.linear.pack_products``:
    faster, more memory, logits equal up to rounding)."""
    _check_settings(max_new_tokens, num_beams, temperature, length_penalty, repetition_penalty,
                    no_repeat_ngram_size, min_new_tokens)
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                 min_new_tokens=min_new_tokens, penalize_prompt=penalize_prompt)
    if num_beams > 1:
        return beam_search(model, prompts, images, num_beams=num_beams, max_new_tokens=max_new_tokens,
                           stop_ids=stop_ids, pad_id=pad_id, length_penalty=length_penalty, use_cache=use_cache,
                           length_normalization=length_normalization, pack_weights=pack_weights, **rules)
    runner = _Runner(model, prompts, images, pad_id, max_new_tokens, use_cache, pack_weights)
    device = runner.tokens.device
    batch = len(prompts)
    stop = torch.tensor(stop_ids, device=device)
    rows = torch.arange(batch, device=device)  # the prompt each row still decoding belongs to
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    try:
        logits = runner.prefill()
        decoding = DecodingRules(runner.history(penalize_prompt), stop_ids, repetition_penalty,
                                 no_repeat_ngram_size, min_new_tokens)
        for step in range(max_new_tokens):
            scores = decoding.apply(logits.float()) if decoding.active else logits
            next_token = sample_next(scores, temperature, top_k, top_p, generator)
            next_token = torch.where(done, pad_id, next_token)
            out[rows, step] = next_token
            stopped = torch.isin(next_token, stop) & ~done
            lengths[rows[stopped]] = step
            done |= stopped
            if step == max_new_tokens - 1 or distributed.everywhere(bool(done.all()), model):
                break
            if use_cache and stopped.any() and not done.all():
                # the finished rows leave the batch (their cache rows with them); one row stays while other
                # processes still decode, since every process must run the same number of forward passes
                going_on = (~done).nonzero().squeeze(1)
                rows, done, next_token = rows[going_on], done[going_on], next_token[going_on]
                runner.take(going_on)
                decoding.select(going_on)
            decoding.push(next_token)
            logits = runner.step(next_token)
    finally:
        runner.close()
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]


def generate_batch(model, tokenizer, batch: dict, dtype: torch.dtype, seed: int | None = None,
                   **decoding) -> list[list[int]]:
    """``generate`` for a left-padded batch of ``collate_captions``: its prompts without the padding, its images
    in ``dtype``, the tokenizer's stop and pad ids; sampling seeded with ``seed``."""
    prompts = [row[mask].tolist() for row, mask in zip(batch["tokens"], batch["padding_mask"])]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return generate(model, prompts, batch["images"].to(dtype), stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                    generator=generator, **decoding)


def _keep_best(hypotheses: list[tuple[float, list[int]]], score: float, ids: list[int], size: int) -> None:
    hypotheses.append((score, ids))
    hypotheses.sort(key=lambda h: h[0], reverse=True)
    del hypotheses[size:]


@torch.inference_mode()
def beam_search(
    model,
    prompts: list[list[int]],
    images: Tensor | None,
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    penalize_prompt: bool = True,
    use_cache: bool = True,
    return_scores: bool = False,
    length_normalization: str = "with_end_token",
    pack_weights: bool = True,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """The best finished hypothesis per prompt (ids without the stop token; with ``return_scores`` also its
    length-penalised score). Conventions: see the module docstring."""
    _check_settings(max_new_tokens, num_beams, 0.0, length_penalty, repetition_penalty, no_repeat_ngram_size,
                    min_new_tokens)
    if length_normalization not in LENGTH_NORMALIZATION:
        raise ValueError(f"length_normalization must be one of {list(LENGTH_NORMALIZATION)}, got "
                         f"{length_normalization!r}")
    cut_extra = LENGTH_NORMALIZATION[length_normalization]
    hf_4_30 = length_normalization == "hf_4_30"
    k, batch, stops = num_beams, len(prompts), set(stop_ids)
    runner = _Runner(model, prompts, images, pad_id, max_new_tokens, use_cache, pack_weights)
    device = runner.tokens.device
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    open_ = [True] * batch  # False once a prompt's finished hypotheses cannot be beaten
    try:
        logits = runner.prefill().repeat_interleave(k, dim=0)  # the prompt (and its image) is fed once
        runner.expand(k)
        decoding = DecodingRules(runner.history(penalize_prompt), stop_ids, repetition_penalty,
                                 no_repeat_ngram_size, min_new_tokens)
        vocab = logits.shape[-1]
        # enough candidates that num_beams of them are not stop tokens
        width = min((1 + max(1, len(stops))) * k, k * vocab)
        # all beams of a prompt start equal: only the first is live, or the top-k would hold k copies of each token
        running = torch.full((batch, k), float("-inf"), device=device)
        running[:, 0] = 0.0
        live = list(range(batch))  # the prompt of each group of k rows still decoding
        for step in range(max_new_tokens):
            n = len(live)
            logprobs = decoding.apply(F.log_softmax(logits.float(), dim=-1))
            totals = (logprobs.view(n, k, vocab) + running[..., None]).view(n, k * vocab)
            top, index = totals.topk(width, dim=1)
            origins, tokens = (index // vocab).tolist(), (index % vocab).tolist()
            last = step == max_new_tokens - 1
            norm = (step + 1) ** length_penalty
            rows, chosen, scores = [], [], []
            for i, candidates in enumerate(zip(top.tolist(), origins, tokens)):
                b, kept = live[i], 0
                for rank, (score, origin, token) in enumerate(zip(*candidates)):
                    row = i * k + origin
                    if token in stops or (last and not hf_4_30):
                        # only candidates among the top num_beams may finish, and only while the prompt is open
                        if rank < k and open_[b]:
                            stopped = token in stops
                            ids = runner.generated[row].tolist() + ([] if stopped else [token])
                            length = step + 1 + (0 if stopped else cut_extra)  # cut at max_new_tokens: see above
                            _keep_best(finished[b], score / length ** length_penalty, ids, k)
                    elif kept < k:
                        rows.append(row)
                        chosen.append(token)
                        scores.append(score)
                        kept += 1
            if last and not hf_4_30:
                break
            running = torch.tensor(scores, device=device).view(n, k)
            # the score that must beat the worst finished hypothesis: the best running beam's (transformers >=
            # 4.33), or 4.30's: the best candidate's, a stop token's included, divided in Python floats as 4.30
            # divided it (that candidate may be the hypothesis just finished: the two must tie exactly)
            if hf_4_30:
                best = [value / norm for value in top[:, 0].tolist()]
            else:
                best = running.max(dim=1).values.div(norm).tolist()
            for i, b in enumerate(live):
                if open_[b] and len(finished[b]) == k and best[i] <= finished[b][-1][0]:
                    open_[b] = False
            if last:  # hf_4_30: as 4.30's finalize, the running beams of a prompt not yet done, cut here
                for i, b in enumerate(live):
                    for j in range(i * k, (i + 1) * k) if open_[b] else ():
                        ids = runner.generated[rows[j]].tolist() + [chosen[j]]
                        _keep_best(finished[b], scores[j] / (step + 1 + cut_extra) ** length_penalty, ids, k)
                break
            if distributed.everywhere(not any(open_), model):
                break
            rows_t = torch.tensor(rows, device=device)
            tokens_t = torch.tensor(chosen, device=device)
            still = [i for i, b in enumerate(live) if open_[b]]
            if use_cache and still and len(still) < n:
                # the prompts that are done leave the batch with their beams' cache rows (one process with none
                # left keeps its rows while others still decode: every process runs the same forward passes)
                keep = torch.tensor([i * k + j for i in still for j in range(k)], device=device)
                rows_t, tokens_t, running = rows_t[keep], tokens_t[keep], running[still]
                live = [live[i] for i in still]
                runner.take(rows_t)
            else:
                runner.reorder(rows_t)
            decoding.select(rows_t)
            decoding.push(tokens_t)
            logits = runner.step(tokens_t)
    finally:
        runner.close()
    best = [hyps[0] for hyps in finished]
    ids = [h[1] for h in best]
    return (ids, [h[0] for h in best]) if return_scores else ids
