"""Encoder-decoder text LMs (Flan-T5, the AUEB LM-Fuser's model) behind the interface of medcap's training core.

The core feeds a batch's ``tokens`` to the model and scores ``logits[:, :-1]`` against ``labels[:, 1:]``. An
encoder-decoder sample is packed into one such row: the source ids, the decoder start id, the target ids; its
labels cover the target only. ``Seq2SeqLM.forward`` cuts each row at its first decoder start id, runs the encoder
on the source and the decoder on ``[start, target...]``, and puts the decoder's logits where the core reads them,
so the shifted loss of the packed row is the encoder-decoder's loss on the target (teacher forcing, as
transformers computes it from ``labels``). The network is transformers' (from a local folder, never downloaded):
torchtune has no T5 decoder.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcap.models.vlm import autocast_to
from medcap.text import IGNORE_INDEX

MODES = ("frozen", "full")


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
        import json

        from transformers import AutoTokenizer

        folder = _local_folder(model_dir)
        self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = json.loads((folder / "config.json").read_text())
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
    (``</s>`` kept), ``truncated`` when either was cut."""
    src, tgt = tokenizer.source_ids(source, max_source_len), tokenizer.target_ids(target, max_target_len)
    if tokenizer.decoder_start_id in src:
        raise ValueError(f"the source holds the decoder start id {tokenizer.decoder_start_id}, which marks where "
                         f"the target begins")
    truncated = len(src) < len(tokenizer.source_ids(source)) or len(tgt) < len(tokenizer.target_ids(target))
    return {"tokens": src + [tokenizer.decoder_start_id] + tgt,
            "labels": [IGNORE_INDEX] * (len(src) + 1) + tgt, "truncated": truncated}


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
            logits = self._packed_logits(tokens)
        return logits if output_at is None else logits[output_at]

    def _packed_logits(self, tokens: Tensor) -> Tensor:
        is_start = tokens == self.decoder_start_id
        if not bool(is_start.any(dim=1).all()):
            raise ValueError(f"every row must hold the decoder start id {self.decoder_start_id} between its source "
                             f"and its target (see medcap.seq2seq.seq2seq_sample)")
        split = is_start.int().argmax(dim=1)  # the first start id of each row
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        source_len = int(split.max())
        source_mask = positions[None, :source_len] < split[:, None]
        sources = torch.where(source_mask, tokens[:, :source_len], self.pad_id)
        targets = torch.full_like(tokens, self.pad_id)
        for row, start in enumerate(split.tolist()):
            targets[row, :length - start] = tokens[row, start:]
        out = self.model(input_ids=sources, attention_mask=source_mask.long(), decoder_input_ids=targets).logits
        logits = out.new_zeros(batch, length, out.shape[-1])  # source positions carry no labels
        for row, start in enumerate(split.tolist()):
            logits[row, start:] = out[row, :length - start]
        return logits

    @torch.inference_mode()
    def generate(self, sources: list[list[int]], *, max_new_tokens: int, num_beams: int = 1,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 length_penalty: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 min_new_tokens: int = 0, early_stopping: bool = False, generator: torch.Generator | None = None,
                 **unused) -> list[list[int]]:
        """Target ids per source (without the decoder start and ``</s>``) by transformers' ``generate``: beam
        search (``early_stopping`` as transformers defines it), greedy or sampling. ``unused``: decoding keys of
        the decoder-only path that do not apply here (checked by the caller)."""
        device = next(self.parameters()).device
        length = max(len(s) for s in sources)
        ids = torch.full((len(sources), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, source in enumerate(sources):
            ids[row, :len(source)], mask[row, :len(source)] = torch.tensor(source), 1
        sampling = temperature > 0
        if generator is not None and sampling:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            num_beams=num_beams, do_sample=sampling, temperature=temperature if sampling else None,
            top_k=top_k if sampling else None, top_p=top_p if sampling else None, length_penalty=length_penalty,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens, early_stopping=early_stopping)
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
