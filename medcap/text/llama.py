"""Llama 3 (tiktoken) and Llama 2 (SentencePiece) tokenizers through torchtune, with Meta's chat formats."""

from pathlib import Path

from torchtune.models.llama3 import llama3_tokenizer as torchtune_llama3_tokenizer
from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

from medcap.text.tokenizers import IMAGE_PLACEHOLDER, image_block


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


class Llama3ChatTokenizer:
    """Llama 3 / 3.1 Instruct (``original/tokenizer.model`` of a Meta or Hugging Face download).

    The image placeholder is torchtune's ``<|image|>`` (128256), one past the 128256 ids Llama 3 embeds; it comes
    right before the user text, as in Llama 3.2 Vision's format. No default system turn::

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>   (only when given)
        <|start_header_id|>user<|end_header_id|>\\n\\n{image placeholders}{user_text}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
        {answer}<|eot_id|>
    """

    def __init__(self, path: str | Path):
        path = _existing_file(path, "Llama 3 tokenizer (original/tokenizer.model in a Llama 3 download)")
        try:
            self._tok = torchtune_llama3_tokenizer(str(path))
        except ValueError as error:  # tiktoken only names the line it could not parse
            raise ValueError(f"{path}: expected Llama 3's tiktoken tokenizer.model (original/tokenizer.model in a "
                             f"Llama 3 download), found a file tiktoken cannot read ({error})") from None
        special = self._tok.special_tokens
        self._special_ids = set(special.values())
        self.image_token_id = special["<|image|>"]
        self.vocab_size = self.image_token_id
        self.bos_id, self.eos_id, self.pad_id, self.eot_id = (self._tok.bos_id, self._tok.eos_id, self._tok.pad_id,
                                                              self._tok.eot_id)
        self.stop_ids = sorted(self._tok.stop_tokens)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False, add_eos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.tt_model.decode(ids, truncate_at_eos=False)

    def _header(self, role: str) -> list[int]:
        return [self._tok.start_header_id, *self.encode(role), self._tok.end_header_id, *self.encode("\n\n")]

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        ids = [self.bos_id]
        if system:
            ids += self._header("system") + self.encode(system.strip()) + [self.eot_id]
        ids += self._header("user") + image_block(self.image_token_id, num_image_tokens)
        ids += self.encode(user_text.strip()) + [self.eot_id]
        return ids + self._header("assistant")

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text.strip()) + [self.eot_id]

    def followup_ids(self, user_text: str, num_image_tokens: int = 0) -> list[int]:
        return self.prompt_ids(user_text, num_image_tokens)[1:]  # a later user turn: no <|begin_of_text|>


class Llama2ChatTokenizer:
    """Llama 2 chat (SentencePiece ``tokenizer.model``), through torchtune's SentencePiece wrapper (the one its
    ``llama2_tokenizer`` uses). Meta's reference format, with the image placeholders (id ``vocab_size``) between
    ``[INST]`` and the user text::

        <s>[INST]{image placeholders} {user_text} [/INST]
        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{image placeholders}{user_text} [/INST]   (with a system text)
         {answer} </s>

    The text pieces are exactly those of the template without images: SentencePiece's word-start marker before
    the user text stays on the user text's first token.

    ``template="r2gengpt"``: R2GenGPT's raw prompt instead (no ``[INST]``, no system text, one turn)::

        <s>Human: <Img>{image placeholders}</Img> {user_text} \nAssistant: {answer}</s>

    tokenised as R2GenGPT did with transformers 4.30's SentencePiece ``LlamaTokenizer``: ``Human: <Img>`` and
    ``</Img> {user_text} \nAssistant:`` each encoded on its own (so each starts with a word-start marker, which
    decodes to nothing at the start of a text), the answer encoded on its own, then ``</s>``.
    """

    TEMPLATES = ("llama2_chat", "r2gengpt")

    def __init__(self, path: str | Path, template: str = "llama2_chat"):
        if template not in self.TEMPLATES:
            raise ValueError(f"template must be one of {list(self.TEMPLATES)}, got {template!r}")
        self.template = template
        path = _existing_file(path, "SentencePiece tokenizer model")
        try:
            self._sp = SentencePieceBaseTokenizer(str(path))
        except RuntimeError as error:  # SentencePiece only says it could not parse the protobuf
            raise ValueError(f"{path}: expected a SentencePiece model (tokenizer.model in a Llama 2 download), "
                             f"found a file SentencePiece cannot read ({error})") from None
        self._spm = self._sp.spm_model
        self.vocab_size = self._spm.vocab_size()
        self.image_token_id = self.vocab_size
        self.bos_id, self.eos_id = self._spm.bos_id(), self._spm.eos_id()
        self.pad_id = self._spm.pad_id() if self._spm.pad_id() >= 0 else self._spm.unk_id()  # as torchtune's llama2
        self.stop_ids = [self.eos_id]

    def encode(self, text: str) -> list[int]:
        """``text`` on its own: SentencePiece marks the start of its first word, as at the start of a document."""
        return self._sp.encode(text, add_bos=False, add_eos=False)

    def _encode_continuation(self, text: str) -> list[int]:
        # text that continues a line: no word-start marker unless the text itself begins with a space
        return self._sp.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self._spm.decode([i for i in ids if i < self.vocab_size and not self._spm.is_control(i)])
        # One proto piece per id; image ids go through as <unk> and are renamed.
        unk = self._spm.unk_id()
        pieces = self._spm.decode_ids_as_proto([unk if i == self.image_token_id else i for i in ids]).pieces
        return "".join(IMAGE_PLACEHOLDER if i == self.image_token_id else p.piece if self._spm.is_control(i)
                       else p.surface for i, p in zip(ids, pieces))

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        if self.template == "r2gengpt":
            if system:
                raise ValueError("R2GenGPT's prompt template has no system text; drop `system` or use the llama2_chat "
                                 "template")
            return ([self.bos_id] + self.encode("Human: <Img>") + image_block(self.image_token_id, num_image_tokens)
                    + self.encode(f"</Img> {user_text.strip()} \nAssistant:"))
        if system:
            head, user = f"[INST] <<SYS>>\n{system.strip()}\n<</SYS>>\n\n", user_text.strip()
        else:
            head, user = "[INST]", f" {user_text.strip()}"
        return ([self.bos_id] + self.encode(head) + image_block(self.image_token_id, num_image_tokens)
                + self._encode_continuation(f"{user} [/INST]"))

    def answer_ids(self, text: str) -> list[int]:
        if self.template == "r2gengpt":
            return self.encode(text.strip()) + [self.eos_id]
        # Meta's reference encodes " {answer} " before </s>: the trailing space is part of Llama 2 chat's turns
        return self._encode_continuation(f" {text.strip()} ") + [self.eos_id]

    def followup_ids(self, user_text: str, num_image_tokens: int = 0) -> list[int]:
        if self.template == "r2gengpt":
            raise ValueError("R2GenGPT's prompt template has one turn; a conversation needs the llama2_chat template")
        # Meta's format: each exchange is <s>[INST] ... [/INST] ... </s>
        return self.prompt_ids(user_text, num_image_tokens)


def llama3_tokenizer(path: str) -> Llama3ChatTokenizer:
    return Llama3ChatTokenizer(path)


def llama2_tokenizer(path: str, template: str = "llama2_chat") -> Llama2ChatTokenizer:
    return Llama2ChatTokenizer(path, template)


def llama3_user_turns_ids(tokenizer: Llama3ChatTokenizer, turns: list[str], system: str | None = None) -> list[int]:
    """Several user turns in a row, then the assistant header (AUEB's synthesizer sent the draft caption and the
    instruction as two user messages)::

        <|begin_of_text|>[system turn]<|start_header_id|>user<|end_header_id|>\\n\\n{turn}<|eot_id|>...
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """
    if not turns:
        raise ValueError("at least one user turn is needed")
    ids = tokenizer.prompt_ids(turns[0], 0, system)[:-len(tokenizer._header("assistant"))]
    for text in turns[1:]:
        ids += tokenizer._header("user") + tokenizer.encode(text.strip()) + [tokenizer.eot_id]
    return ids + tokenizer._header("assistant")
