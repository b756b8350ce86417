"""Encoder-decoder text LMs (Flan-T5, the AUEB LM-Fuser's model) behind the interface of medcap's training core.

The core feeds a batch's ``tokens`` to the model and scores ``logits[:, :-1]`` against ``labels[:, 1:]``. An
encoder-decoder sample is packed into one such row: the source ids, ``BOUNDARY_ID``, the target ids; its labels
cover the target only. ``Seq2SeqLM.forward`` cuts each row at its boundary, runs the encoder on the source and the
decoder on ``[decoder start id, target...]`` (only as far as a labelled position needs), and puts the decoder's
logits where the core reads them, so the shifted loss of the packed row is the encoder-decoder's loss on the target
(teacher forcing, as transformers computes it from ``labels``). The network is transformers' (from a local folder,
never downloaded): torchtune has no T5 decoder.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcap.models.vlm import autocast_to
from medcap.text import IGNORE_INDEX

MODES = ("frozen", "full")
# Where a packed row's source ends: an id no tokenizer gives. The decoder start id cannot mark it: BART's is its
# eos id, which ends every source.
BOUNDARY_ID = -1


def _local_folder(model_dir: str | Path) -> Path:
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a local Hugging Face encoder-decoder folder, "
                                f"e.g. a download of google/flan-t5-large)")
    return folder


class Seq2SeqTokenizer:
    """The folder's transformers tokenizer (T5's SentencePiece): sources and targets end with ``</s>``, which
    truncation keeps."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        from medcap.models.tensor_files import read_json

        folder = _local_folder(model_dir)
        self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = read_json(folder / "config.json")
        self.pad_id = self._tok.pad_token_id
        self.eos_id = self._tok.eos_token_id
        self.decoder_start_id = config.get("decoder_start_token_id", self.pad_id)
        self.vocab_size = len(self._tok)
        self.stop_ids = [self.eos_id]
        if self.pad_id is None or self.eos_id is None or self.decoder_start_id is None:
            raise ValueError(f"{folder}: the tokenizer needs pad and eos tokens and config.json a "
                             f"decoder_start_token_id (T5: 0, 1 and 0)")

    def source_ids(self, text: str, max_len: int | None = None) -> list[int]:
        return self._tok(text, truncation=max_len is not None, max_length=max_len).input_ids

    def target_ids(self, text: str, max_len: int | None = None) -> list[int]:
        return self._tok(text_target=text, truncation=max_len is not None, max_length=max_len).input_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def seq2seq_sample(tokenizer: Seq2SeqTokenizer, source: str, target: str, max_source_len: int,
                   max_target_len: int) -> dict[str, Any]:
    """A packed training row (see the module docstring): source and target each cut to their maximum length
    (``</s>`` kept); ``source_truncated`` / ``target_truncated`` say which was cut, ``truncated`` either."""
    src, tgt = tokenizer.source_ids(source, max_source_len), tokenizer.target_ids(target, max_target_len)
    source_cut = len(src) < len(tokenizer.source_ids(source))
    target_cut = len(tgt) < len(tokenizer.target_ids(target))
    return {"tokens": src + [BOUNDARY_ID] + tgt, "labels": [IGNORE_INDEX] * (len(src) + 1) + tgt,
            "truncated": source_cut or target_cut, "source_truncated": source_cut, "target_truncated": target_cut}


class Seq2SeqLM(nn.Module):
    """A transformers encoder-decoder (``AutoModelForSeq2SeqLM``) as medcap's recipes use a model: ``parts()`` /
    ``trainable`` (one part, ``model``) for checkpoints, ``forward(tokens)`` on packed rows, ``generate`` for
    inference."""

    def __init__(self, model: nn.Module, trainable: str = "full"):
        super().__init__()
        if trainable not in MODES:
            raise ValueError(f"trainable={trainable!r}: an encoder-decoder LM is {' or '.join(MODES)}")
        self.model = model
        self.trainable = {"model": trainable}
        self.compute_dtype: torch.dtype | None = None  # set by medcap.precision when trained parts are fp32
        self.decoder_start_id = model.config.decoder_start_token_id
        self.pad_id = model.config.pad_token_id
        model.requires_grad_(trainable == "full")

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def forward(self, tokens: Tensor, *, encoder_input: Any = None, output_at: Tensor | None = None) -> Tensor:
        """Logits aligned with the packed row (zeros at source positions), or at the ``output_at`` positions."""
        if encoder_input is not None:
            raise ValueError("an encoder-decoder text LM takes no images (encoder_input must be None)")
        with autocast_to(self.compute_dtype, tokens.device):
            return self._packed_logits(tokens, output_at)

    def _packed_logits(self, tokens: Tensor, output_at: Tensor | None) -> Tensor:
        is_boundary = tokens == BOUNDARY_ID
        if not bool((is_boundary.sum(dim=1) == 1).all()):
            raise ValueError(f"every row must hold the boundary id {BOUNDARY_ID} once, between its source and its "
                             f"target (see medcap.seq2seq.seq2seq_sample)")
        split = is_boundary.int().argmax(dim=1)  # each row's source length
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        source_mask = positions[None, :int(split.max())] < split[:, None]
        sources = torch.where(source_mask, tokens[:, :source_mask.shape[1]], self.pad_id)
        if output_at is None:
            width = length - int(split.min())
        else:
            rows, cols = output_at.nonzero(as_tuple=True)
            if bool((cols < split[rows]).any()):
                raise ValueError("output_at asks for source positions, which have no logits")
            # the decoder is causal: positions after the last one asked for change nothing
            width = int((cols - split[rows]).max()) + 1 if len(cols) else 1
        offsets = split[:, None] + positions[None, :width]
        targets = torch.where(offsets < length, tokens.gather(1, offsets.clamp(max=length - 1)), self.pad_id)
        targets[:, 0] = self.decoder_start_id
        out = self.model(input_ids=sources, attention_mask=source_mask.long(), decoder_input_ids=targets).logits
        if output_at is not None:
            return out[rows, cols - split[rows]]
        logits = out.new_zeros(batch, length, out.shape[-1])  # source positions carry no labels
        for row, start in enumerate(split.tolist()):
            logits[row, start:] = out[row, :length - start]
        return logits

    @torch.inference_mode()
    def generate(self, sources: list[list[int]], *, max_new_tokens: int, num_beams: int = 1,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 length_penalty: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 min_new_tokens: int = 0, early_stopping: bool = False, use_cache: bool = True,
                 penalize_prompt: bool = True, length_normalization: str = "with_end_token",
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Target ids per source (without the decoder start and ``</s>``) by transformers' ``generate``: beam
        search (``early_stopping`` as transformers defines it), greedy or sampling. The keys of
        ``medcap.generation.generate`` that transformers cannot follow are refused, naming the key."""
        if num_beams > 1 and temperature > 0:
            raise ValueError(f"beam search is deterministic: set temperature to 0 (got {temperature}) or num_beams "
                             f"to 1")
        if length_normalization != "with_end_token":
            raise ValueError(f"length_normalization={length_normalization!r}: the encoder-decoder's beam search is "
                             f"transformers' own, which counts the end token (with_end_token)")
        if repetition_penalty != 1.0 and penalize_prompt:
            raise ValueError("an encoder-decoder's repetition penalty counts the generated tokens only: set "
                             "penalize_prompt to false")
        device = next(self.parameters()).device
        length = max(len(s) for s in sources)
        ids = torch.full((len(sources), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, source in enumerate(sources):
            ids[row, :len(source)], mask[row, :len(source)] = torch.tensor(source), 1
        sampling = temperature > 0
        if generator is not None and sampling:  # transformers samples from the global generators
            torch.manual_seed(torch.randint(2**31, (1,), generator=generator, device=generator.device).item())
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            num_beams=num_beams, do_sample=sampling, temperature=temperature if sampling else None,
            top_k=top_k if sampling else None, top_p=top_p if sampling else None, length_penalty=length_penalty,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens, early_stopping=early_stopping, use_cache=use_cache)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        results = []
        for row in out[:, 1:].tolist():  # without the decoder start id
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            results.append([t for t in row[:end] if t != self.pad_id])
        return results


def hf_seq2seq_lm(model_dir: str, trainable: str = "full") -> Seq2SeqLM:
    """An encoder-decoder LM from a local Hugging Face folder (e.g. google/flan-t5-large), built in the default
    dtype (the recipes set it from ``dtype``)."""
    from transformers import AutoModelForSeq2SeqLM

    folder = _local_folder(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True, dtype=torch.get_default_dtype())
    return Seq2SeqLM(model, trainable)


def hf_seq2seq_tokenizer(model_dir: str) -> Seq2SeqTokenizer:
    return Seq2SeqTokenizer(model_dir)
