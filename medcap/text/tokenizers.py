"""Tokenizers with their chat templates, behind one interface.

Each tokenizer has ``vocab_size`` (ids the LLM embeds), ``pad_id``, ``eos_id``, ``stop_ids`` (ids that end the
assistant turn), ``image_token_id`` (reserved for image placeholders: ``encode`` never produces it and the LLM
never embeds it), and the methods ``encode(text)``, ``decode(ids)``, ``prompt_ids(user_text,
num_image_tokens, system)`` (the chat prefix up to and including the assistant header, the image placeholders
first in the user turn, then a newline and the text) and ``answer_ids(text)`` (the answer and its end-of-turn
token).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from medcap.models.gguf_file import GGUFFile

_CONTROL = 3  # GGUF token type of special/control tokens


class SmolLM2Tokenizer:
    """Byte-level BPE from a GGUF file's metadata, with the ChatML template.

    The pre-tokenizer is SmolLM2's (GGUF ``tokenizer.ggml.pre = smollm``): every digit on its own, then GPT-2's
    byte-level split."""

    def __init__(self, path: str | Path):
        meta = GGUFFile(path).metadata
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r}, expected byte-level BPE")
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta["tokenizer.ggml.token_type"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        self._tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        self._tok.decoder = decoders.ByteLevel()
        self.special_ids = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL}
        self._tok.add_special_tokens(list(self.special_ids))
        self.vocab_size = len(tokens)
        self.image_token_id = self.vocab_size
        self.im_start, self.im_end = self.special_ids["<|im_start|>"], self.special_ids["<|im_end|>"]
        self.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", self.im_end))
        self.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", self.eos_id))
        self.stop_ids = sorted({self.im_end, self.eos_id})

    def encode(self, text: str) -> list[int]:
        # special-token strings in user text stay plain text: encode only ever sees ordinary text pieces
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < self.vocab_size and i not in self.special_ids.values()])

    def _turn(self, role: str, content: list[int]) -> list[int]:
        return [self.im_start, *self.encode(f"{role}\n"), *content, self.im_end, *self.encode("\n")]

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        ids = self._turn("system", self.encode(system)) if system else []
        user = [self.image_token_id] * num_image_tokens + self.encode(("\n" if num_image_tokens else "") + user_text)
        return ids + self._turn("user", user) + [self.im_start, *self.encode("assistant\n")]

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text) + [self.im_end]


class Llama3ChatTokenizer:
    """Llama 3 (tiktoken ``tokenizer.model``) through torchtune, with the Llama 3 chat header format."""

    def __init__(self, path: str | Path):
        from torchtune.models.llama3 import llama3_tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"Llama 3 tokenizer not found: {path} (it is original/tokenizer.model "
                                    f"in a Hugging Face download)")
        self._tok = llama3_tokenizer(str(path))
        special = self._tok.special_tokens
        self.image_token_id = special["<|image|>"]  # 128256, outside the 128256-row embedding
        self.vocab_size = self.image_token_id
        self.bos_id, self.eos_id, self.pad_id = self._tok.bos_id, self._tok.eos_id, self._tok.pad_id
        self.eot_id = self._tok.eot_id
        self.start_header, self.end_header = special["<|start_header_id|>"], special["<|end_header_id|>"]
        self.stop_ids = sorted(self._tok.stop_tokens)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False, add_eos=False) if text else []

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.image_token_id], truncate_at_eos=False,
                                skip_special_tokens=True)

    def _header(self, role: str) -> list[int]:
        return [self.start_header, *self.encode(role), self.end_header, *self.encode("\n\n")]

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        ids = [self.bos_id]
        if system:
            ids += self._header("system") + self.encode(system) + [self.eot_id]
        user = [self.image_token_id] * num_image_tokens + self.encode(("\n" if num_image_tokens else "") + user_text)
        return ids + self._header("user") + user + [self.eot_id] + self._header("assistant")

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text) + [self.eot_id]


class Llama2ChatTokenizer:
    """Llama 2 (SentencePiece ``tokenizer.model``) through torchtune, with the ``[INST] ... [/INST]`` format."""

    def __init__(self, path: str | Path):
        from torchtune.models.llama2 import llama2_tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"Llama 2 tokenizer not found: {path}")
        self._tok = llama2_tokenizer(str(path))
        self.vocab_size = self._tok.vocab_size
        self.image_token_id = self.vocab_size
        self.bos_id, self.eos_id = self._tok.bos_id, self._tok.eos_id
        self.pad_id = self._tok.pad_id if self._tok.pad_id >= 0 else self.eos_id
        self.stop_ids = [self.eos_id]

    def encode(self, text: str, leading: bool = False) -> list[int]:
        """``leading`` marks text at the start of a line/turn, where SentencePiece adds its word-start marker."""
        if not text:
            return []
        return self._tok.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=not leading)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < self.vocab_size and i not in (self.bos_id, self.eos_id)])

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        head = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n" if system else "[INST]"
        ids = [self.bos_id, *self.encode(head, leading=True)]
        text = ("\n" if num_image_tokens or system else " ") + user_text + " [/INST]"
        return ids + [self.image_token_id] * num_image_tokens + self.encode(text)

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(" " + text) + [self.eos_id]


def smollm2_tokenizer(path: str | None = None) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer; by default from the packaged SmolLM2-135M-Instruct GGUF."""
    from medcap.models.llm_weights import smollm2_gguf_path

    return SmolLM2Tokenizer(path or smollm2_gguf_path())


def llama3_tokenizer(path: str) -> Llama3ChatTokenizer:
    return Llama3ChatTokenizer(path)


def llama2_tokenizer(path: str) -> Llama2ChatTokenizer:
    return Llama2ChatTokenizer(path)
