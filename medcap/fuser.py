"""The LM-Fuser (AUEB, ImageCLEFmedical 2024): a small text LM reads the captions that several systems wrote for
one image and writes one caption. Trained on the validation split (input: the candidates, target: the gold
caption, loss on the target only), then applied to the test split's candidates. The LM is a decoder (``TextLM``:
chat prompt, then the caption) or, as AUEB published it, an encoder-decoder (Flan-T5, ``medcap.seq2seq``: the
prompt is the source, the caption the target).

This module also holds what the text-only recipes share (the fuser and the synthesizer): ``TextLM``, a text
decoder with the interface of medcap's generation, training core and checkpoints, and its builders.
"""

import random
import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchtune import config, training
from torchtune.modules import TransformerDecoder

from medcap.checkpoint import load_checkpoint
from medcap.metrics import read_predictions
from medcap.models import decoders
from medcap.models.llm_weights import hf_llama_decoder, load_gguf_decoder
from medcap.models.vlm import autocast_to, run_decoder
from medcap.models.lora import DECODER_LINEARS, NF4Linear
from medcap.seq2seq import Seq2SeqLM, Seq2SeqTokenizer, seq2seq_sample
from medcap.text import build_sample

MODES = ("frozen", "full")


class TextLM(nn.Module):
    """A text-only torchtune decoder as medcap's code expects a model: ``parts()`` / ``trainable`` for the
    checkpoints (the part is called ``decoder``), ``setup_caches`` sized by ``generate``, and a forward that
    takes tokens (plus ``mask`` / ``input_pos`` when generating). It holds no image placeholder id."""

    def __init__(self, decoder: TransformerDecoder, trainable: str = "full"):
        super().__init__()
        if trainable not in MODES:
            raise ValueError(f"trainable={trainable!r}: a text LM is {' or '.join(MODES)}")
        self.decoder = decoder
        self.trainable = {"decoder": trainable}
        self.compute_dtype: torch.dtype | None = None  # set by medcap.precision when trained parts are fp32
        decoder.requires_grad_(trainable == "full")

    def parts(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    def setup_caches(self, batch_size: int, dtype: torch.dtype, decoder_max_seq_len: int | None = None) -> None:
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:  # torchtune's delete_kv_caches asks the model it is given
        return self.decoder.caches_are_setup()

    def forward(self, tokens: Tensor, *, encoder_input: Any = None, mask: Tensor | None = None,
                input_pos: Tensor | None = None, output_at: Tensor | str | None = None) -> Tensor:
        if encoder_input is not None:
            raise ValueError("a text-only LM takes no images (encoder_input must be None)")
        with autocast_to(self.compute_dtype, tokens.device):
            return run_decoder(self.decoder, self.decoder.tok_embeddings(tokens), mask=mask, input_pos=input_pos,
                               output_at=output_at)


def smollm2_lm(gguf_path: str | None = None, max_seq_len: int = 2048, trainable: str = "full") -> TextLM:
    """SmolLM2-135M-Instruct from a GGUF file (default: the packaged one), dequantised."""
    decoder = decoders.smollm2_135m(max_seq_len=max_seq_len)
    return TextLM(load_gguf_decoder(decoder, gguf_path), trainable)


def hf_llama_lm(llm_dir: str, family: str = "llama3", trainable: str = "full", quantize_base: bool = False) -> TextLM:
    """A Llama decoder from a local Hugging Face folder (Llama-3.1-8B-Instruct, Llama-3.2-1B-Instruct...).
    ``quantize_base``: the layers' linear weights kept in NF4 (torchao), frozen, as AUEB ran its 4-bit
    synthesizer; the embeddings and the output projection stay in the model's dtype."""
    decoder = hf_llama_decoder(llm_dir, family)
    if quantize_base:
        if trainable != "frozen":
            raise ValueError("quantize_base=true keeps the LLM's weights in NF4, frozen: set trainable to frozen")
        for name, layer in list(decoder.layers.named_modules()):
            if isinstance(layer, nn.Linear) and name.rpartition(".")[2] in DECODER_LINEARS:
                parent, _, child = name.rpartition(".")
                setattr(decoder.layers.get_submodule(parent), child, NF4Linear(layer))
    return TextLM(decoder, trainable)


def tiny_smollm2_lm(max_seq_len: int = 512, trainable: str = "full", seed: int | None = None) -> TextLM:
    """A tiny random decoder with SmolLM2's vocabulary, for tests."""
    if seed is not None:
        torch.manual_seed(seed)
    return TextLM(decoders.tiny_smollm2(max_seq_len=max_seq_len), trainable)


def text_lm_and_tokenizer(cfg, device: torch.device, dtype: torch.dtype, checkpoint: str | Path | None = None,
                          seq2seq: bool = True):
    """``cfg.tokenizer`` and ``cfg.model`` (a ``TextLM``, or with ``seq2seq`` a ``medcap.seq2seq.Seq2SeqLM``,
    built in ``dtype``), with trained weights from ``checkpoint`` (a folder written by ``train_fuser``) if given."""
    tokenizer = config.instantiate(cfg.tokenizer)
    with training.set_default_dtype(dtype):
        model = config.instantiate(cfg.model)
    kinds = (TextLM, Seq2SeqLM) if seq2seq else (TextLM,)
    if not isinstance(model, kinds):
        names = "a medcap.fuser.TextLM (smollm2_lm, hf_llama_lm...)" + (
            " or a medcap.seq2seq.Seq2SeqLM (hf_seq2seq_lm)" if seq2seq else "")
        raise TypeError(f"model._component_ must build {names}, got {type(model).__name__}")
    if isinstance(model, Seq2SeqLM) != isinstance(tokenizer, Seq2SeqTokenizer):
        raise TypeError(f"an encoder-decoder model needs the encoder-decoder tokenizer (medcap.seq2seq."
                        f"hf_seq2seq_tokenizer) and a decoder a chat tokenizer; got {type(model).__name__} with "
                        f"{type(tokenizer).__name__}")
    vocab = model.vocab_size if isinstance(model, Seq2SeqLM) else model.decoder.tok_embeddings.num_embeddings
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only {vocab}; pair "
                         f"a model with the tokenizer of its LLM family")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.to(device), tokenizer


# --- candidates of several runs, merged by ID ---

def merge_runs(paths: list[str | Path]) -> tuple[list[str], dict[str, list[str]]]:
    """Read several runs' ``ID,caption`` CSVs: (IDs in the first file's order, {ID: [caption of each run]}).
    Every run must hold exactly the same IDs; a missing, extra or repeated ID is an error naming the file."""
    if not paths:
        raise ValueError("no candidate runs given: expected a list of predictions CSVs")
    paths = [Path(p) for p in paths]
    runs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"candidate run not found: {path}")
        runs.append(read_predictions(path))  # a repeated ID raises, naming the file and the line
    first, order = paths[0], list(runs[0])
    for path, run in zip(paths[1:], runs[1:]):
        missing = [i for i in order if i not in run]
        if missing:
            raise ValueError(f"{path}: ID {missing[0]!r} (in {first}) is missing"
                             + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
        extra = [i for i in run if i not in runs[0]]
        if extra:
            raise ValueError(f"{path}: ID {extra[0]!r} is not in {first}"
                             + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return order, {i: [run[i] for run in runs] for i in order}


# --- the prompt: the one string both training and fusing use ---

DEFAULT_INSTRUCTION = ("Several systems described the same medical image. Combine their captions into the one "
                       "caption that is most likely correct.")
DEFAULT_TEMPLATE = "{instruction}\n\n{candidates}"
DEFAULT_CANDIDATE_LINE = "Caption {rank}: {caption}"
DEFAULT_SEPARATOR = "\n"
# the keys of a config's ``prompt`` node (strings, or null for the default)
PROMPT_DEFAULTS = {"instruction": DEFAULT_INSTRUCTION, "template": DEFAULT_TEMPLATE,
                   "candidate_line": DEFAULT_CANDIDATE_LINE, "separator": DEFAULT_SEPARATOR, "system": None}
# the placeholders fuser_prompt fills, with a value of each kind for a trial run
PLACEHOLDERS = {"template": {"instruction": "", "candidates": ""}, "candidate_line": {"rank": 1, "caption": ""}}


def prompt_settings(node: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """The prompt keys of ``node`` (a config's ``prompt``) with the defaults for null or absent ones; each must
    be a string (``system`` may stay null). Plain data only: nothing in it is instantiated."""
    node = dict(node or {})
    unknown = sorted(set(node) - set(PROMPT_DEFAULTS))
    if unknown:
        raise ValueError(f"{source}: prompt has unknown key(s) {unknown}; it takes {sorted(PROMPT_DEFAULTS)}")
    settings = {k: node.get(k) if node.get(k) is not None else default for k, default in PROMPT_DEFAULTS.items()}
    for key, value in settings.items():
        if not (isinstance(value, str) or (key == "system" and value is None)):
            raise ValueError(f"{source}: prompt.{key} must be a string, found {type(value).__name__} {value!r}")
    fields = {key: _placeholders(settings[key], f"{source}: prompt.{key}", values)
              for key, values in PLACEHOLDERS.items()}
    if "candidates" not in fields["template"]:
        raise ValueError(f"{source}: prompt.template must contain {{candidates}}; got {settings['template']!r}")
    return settings


def _placeholders(text: str, name: str, values: dict[str, Any]) -> list[str]:
    """The placeholders of ``text`` (the prompt string ``name``), each one of ``values``."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as error:
        raise ValueError(f"{name} is not a format string ({error}): {text!r}") from None
    for field in fields:
        if field not in values:
            raise ValueError(f"{name} has the placeholder {{{field}}}; it takes "
                             + " and ".join(f"{{{v}}}" for v in values))
    try:
        text.format(**values)  # a format spec the value cannot take, or a placeholder nested in a spec
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{name} is not a format string ({error}): {text!r}") from None
    return fields


def fuser_prompt(candidates: list[str], instruction: str = DEFAULT_INSTRUCTION, template: str = DEFAULT_TEMPLATE,
                 candidate_line: str = DEFAULT_CANDIDATE_LINE, separator: str = DEFAULT_SEPARATOR) -> str:
    """The text listing the candidates in the order of the runs: ``template`` with ``{instruction}`` and
    ``{candidates}``, the candidates one ``candidate_line`` each (``{rank}`` from 1, ``{caption}`` with its
    whitespace runs made single spaces) joined by ``separator``. AUEB's LM-Fuser: ``"...more concise:
    {candidates}"``, ``"{rank}. {caption}"``, ``" "``."""
    if "{candidates}" not in template:
        raise ValueError(f"the fuser prompt template must contain {{candidates}}; got {template!r}")
    listed = separator.join(candidate_line.format(rank=n, caption=" ".join(caption.split()))
                            for n, caption in enumerate(candidates, 1))
    return template.format(instruction=instruction.strip(), candidates=listed)


def fuser_prompt_ids(tokenizer, candidates: list[str], instruction: str = DEFAULT_INSTRUCTION,
                     system: str | None = None, **layout: str) -> list[int]:
    """What the fuser reads at inference: the chat prompt up to the assistant header, or an encoder-decoder's
    source (not truncated, as AUEB fused). ``layout``: ``template``, ``candidate_line``, ``separator``."""
    text = fuser_prompt(candidates, instruction, **layout)
    if isinstance(tokenizer, Seq2SeqTokenizer):
        _no_system(system)
        return tokenizer.source_ids(text)
    return tokenizer.prompt_ids(text, 0, system)


def _no_system(system: str | None) -> None:
    if system:
        raise ValueError("an encoder-decoder fuser has no system turn: set prompt.system to null")


def fuser_sample(tokenizer, candidates: list[str], target: str, max_seq_len: int,
                 instruction: str = DEFAULT_INSTRUCTION, system: str | None = None, **layout: str) -> dict[str, Any]:
    """A training sample: the same prompt as ``fuser_prompt_ids``, then the target caption; labels on the
    target and its end-of-turn token only. An encoder-decoder's source and target are each cut at
    ``max_seq_len`` tokens (AUEB: 300); a decoder's prompt and caption together."""
    text = fuser_prompt(candidates, instruction, **layout)
    if isinstance(tokenizer, Seq2SeqTokenizer):
        _no_system(system)
        return seq2seq_sample(tokenizer, text, target, max_seq_len, max_seq_len)
    sample = build_sample(tokenizer, text, target, 0, max_seq_len, system)  # a prompt that does not fit raises
    return {**sample, "source_truncated": False, "target_truncated": sample["truncated"]}


class FuserDataset(torch.utils.data.Dataset):
    """Training samples from merged candidates and gold captions: one per (ID, reference caption).
    Every candidate ID needs a reference; ``ids`` picks a subset (e.g. a held-out share)."""

    def __init__(self, tokenizer, candidates: dict[str, list[str]], references: dict[str, list[str]],
                 max_seq_len: int, instruction: str = DEFAULT_INSTRUCTION, system: str | None = None,
                 ids: list[str] | None = None, references_file: str = "references", **layout: str):
        self.samples = []
        for sample_id in ids if ids is not None else list(candidates):
            if sample_id not in references:
                raise ValueError(f"{references_file}: no reference caption for ID {sample_id!r} (it has candidates)")
            for target in references[sample_id]:
                try:
                    sample = fuser_sample(tokenizer, candidates[sample_id], target, max_seq_len, instruction, system,
                                          **layout)
                except ValueError as error:
                    raise ValueError(f"ID {sample_id!r}: {error}") from None
                self.samples.append({"id": sample_id, **sample})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def truncation_warnings(samples: list[dict[str, Any]], max_seq_len: int) -> list[str]:
    """One line for the samples whose source (the candidates) was cut and one for those whose target caption
    was cut, if any, with their first IDs. Only an encoder-decoder's source is cut (a decoder's prompt that does
    not fit is an error); ``fuse`` never cuts it."""
    lines = []
    for field, what, why in (
            ("source_truncated", "source (the candidates)",
             ", losing their last candidates; fuse does not truncate, so at test time the model sees all candidates"),
            ("target_truncated", "target caption", "")):
        ids = [s["id"] for s in samples if s[field]]
        if ids:
            shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            lines.append(f"{len(ids)} of {len(samples)} samples have their {what} cut to max_seq_len={max_seq_len} "
                         f"tokens ({'IDs' if len(ids) > 1 else 'ID'} {shown}){why}")
    return lines


def split_ids(ids: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training IDs, ``holdout`` IDs drawn with ``seed``), each in the original order."""
    if holdout < 0 or holdout >= len(ids):
        raise ValueError(f"holdout={holdout}: expected 0 <= holdout < {len(ids)} (the number of IDs)")
    held = set(random.Random(seed).sample(ids, holdout))
    return [i for i in ids if i not in held], [i for i in ids if i in held]



def check_prompts_fit(model, ids: list[str], prompts: list[list[int]], max_new_tokens: int, built_from: str) -> None:
    """A decoder reads each prompt and writes up to ``max_new_tokens`` within its ``max_seq_len``: an ID whose
    prompt leaves no room is an error naming it and what the prompt was ``built_from`` (an encoder-decoder has no
    such bound)."""
    if not isinstance(model, TextLM):
        return
    limit = model.decoder.max_seq_len
    over = [(i, len(p)) for i, p in zip(ids, prompts) if len(p) + max_new_tokens > limit]
    if over:
        (first, length), more = over[0], len(over) - 1
        others = f", and {more} more ID{'s' if more > 1 else ''}" if more else ""
        raise ValueError(f"ID {first!r}: the prompt {built_from} is {length} tokens, and with max_new_tokens="
                         f"{max_new_tokens} needs {length + max_new_tokens}, more than the decoder's max_seq_len "
                         f"{limit}{others}")


def generate_texts(model, tokenizer, prompts: list[list[int]], *, batch_size: int, seed: int = 0,
                   progress: str | None = None, **decoding) -> list[str]:
    """Decoded text per prompt, generated in batches of ``batch_size`` in order; sampling is seeded per batch
    (``seed`` + batch index), as in the ``generate`` recipe. ``decoding``: ``medcap.generation.generate``'s
    settings."""
    from tqdm import tqdm

    from medcap.generation import generate

    device = next(model.parameters()).device
    seq2seq = isinstance(model, Seq2SeqLM)
    if not seq2seq and decoding.get("early_stopping"):
        raise ValueError("early_stopping applies to the encoder-decoder fuser (transformers' beam search); "
                         "medcap's beam search stops as transformers' early_stopping=false does")
    decoding = {k: v for k, v in decoding.items() if k != "early_stopping" or seq2seq}
    generator = torch.Generator(device=device)
    texts = []
    starts = range(0, len(prompts), batch_size)
    for index, start in enumerate(tqdm(starts, desc=progress or "generate", unit="batch", disable=progress is None)):
        generator.manual_seed(seed + index)
        if seq2seq:
            outputs = model.generate(prompts[start:start + batch_size], generator=generator, **decoding)
        else:
            outputs = generate(model, prompts[start:start + batch_size], None, stop_ids=tokenizer.stop_ids,
                               pad_id=tokenizer.pad_id, generator=generator, **decoding)
        texts += [tokenizer.decode(ids).strip() for ids in outputs]
    return texts
