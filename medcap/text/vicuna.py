"""Vicuna v1's chat format as LLaVA 1.5 uses it, on the SentencePiece ``tokenizer.model`` of a llava-hf folder
(``llava-hf/llava-1.5-7b-hf``: the 32000 Llama pieces, then ``<image>`` = 32000 and ``<pad>`` = 32001 as added
tokens; the LLM's embedding has 32064 rows, so these ids lie inside it)::

    <s>USER: <image>\\n{user_text} ASSISTANT: {answer}</s>USER: {user_text} ASSISTANT:
    <s>{system} USER: ...                                                        (with a system text)

``<image>`` stands for the image's placeholder block (one id per vision token). ``separator`` is the text between
the user text and ``ASSISTANT:`` (a space in Vicuna v1; the AUEB thesis wrote a newline). ``answer_eos=False``
ends an answer without ``</s>`` and ``loss_on_prompt=True`` puts labels on the prompt text too (both as the AUEB
thesis trained; see ``medcap.text.samples``). ``render_prompt`` gives the prompt as text, ``<image>`` marking each
image block, so that a prompt can be compared with a published one character for character.
"""

from pathlib import Path

from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

from medcap.models.tensor_files import read_json

IMAGE_TEXT = "<image>"  # how LLaVA writes the image in its prompts (the llava-hf added token)


class VicunaTokenizer:
    def __init__(self, path: str | Path, image_token_id: int | None = None, pad_id: int | None = None,
                 separator: str = " ", answer_eos: bool = True, loss_on_prompt: bool = False):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
        try:
            self._sp = SentencePieceBaseTokenizer(str(path))
        except RuntimeError as error:
            raise ValueError(f"{path}: expected a SentencePiece model (tokenizer.model of a llava-hf folder), found a "
                             f"file SentencePiece cannot read ({error})") from None
        self._spm = self._sp.spm_model
        self.vocab_size = self._spm.vocab_size()
        self.image_token_id = self.vocab_size if image_token_id is None else image_token_id
        if self.image_token_id < self.vocab_size:
            raise ValueError(f"{path}: image_token_id {self.image_token_id} is a SentencePiece piece "
                             f"({self._spm.id_to_piece(self.image_token_id)!r}); the image id must come after the "
                             f"{self.vocab_size} pieces")
        self.bos_id, self.eos_id = self._spm.bos_id(), self._spm.eos_id()
        self.pad_id = pad_id if pad_id is not None else self._spm.unk_id()
        self.stop_ids = [self.eos_id]
        self.separator, self.answer_eos, self.loss_on_prompt = separator, answer_eos, loss_on_prompt

    # -- text <-> ids

    def encode(self, text: str) -> list[int]:
        """``text`` on its own: SentencePiece marks the start of its first word, as at the start of a document."""
        return self._sp.encode(text, add_bos=False, add_eos=False)

    def _continue(self, text: str) -> list[int]:
        # text that goes on after other text or an image block: no word-start marker of its own
        return self._sp.encode(text, add_bos=False, add_eos=False, trim_leading_whitespace=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; each run of ordinary pieces is decoded on its own (its word-start marker after
        ``<s>``, ``</s>`` or an image block dropped), as the prompt's texts were encoded each on its own."""
        names = {self.image_token_id: IMAGE_TEXT, **({self.pad_id: "<pad>"} if self.pad_id >= self.vocab_size else {})}
        out, run = [], []
        for i in [*ids, None]:
            if i is not None and i < self.vocab_size and not self._spm.is_control(i):
                run.append(i)
                continue
            out.append(self._spm.decode(run))
            run = []
            if i is not None and not skip_special_tokens:
                out.append(names.get(i, f"<{i}>") if i >= self.vocab_size else self._spm.id_to_piece(i))
        return "".join(out)

    # -- the chat format: each turn is a list of segments, text or an image block

    def _user_turn(self, user_text: str, num_image_tokens: int, system: str | None) -> list:
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        head = f"{system.strip()} USER: " if system else "USER: "
        tail = f"{user_text.strip()}{self.separator}ASSISTANT:"
        if not num_image_tokens:
            return [head + tail]
        return [head, num_image_tokens, "\n" + tail]

    def _ids(self, segments: list, after_text: bool) -> list[int]:
        """Each text gets SentencePiece's word-start marker, as a text of its own: after ``<s>``, ``</s>`` or an
        image block, LLaVA 1.5 tokenised each piece of a conversation separately (``tokenizer_image_token``),
        and llava-hf's tokenizer gives the same ids (``USER: <image>\\n`` is ``[3148, 1001, 29901, 29871, 32000,
        29871, 13]``). Only a turn that goes straight on from an answer's text (``after_text``: an answer without
        ``</s>``) continues without one."""
        ids: list[int] = []
        for index, segment in enumerate(segments):
            if isinstance(segment, int):
                ids += [self.image_token_id] * segment
            else:
                ids += self._continue(segment) if after_text and index == 0 else self.encode(segment)
        return ids

    @staticmethod
    def _text(segments: list) -> str:
        return "".join(IMAGE_TEXT if isinstance(s, int) else s for s in segments)

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        return [self.bos_id] + self._ids(self._user_turn(user_text, num_image_tokens, system), after_text=False)

    def followup_ids(self, user_text: str, num_image_tokens: int = 0) -> list[int]:
        return self._ids(self._user_turn(user_text, num_image_tokens, None), after_text=not self.answer_eos)

    def answer_ids(self, text: str) -> list[int]:
        return self._continue(f" {text.strip()}") + ([self.eos_id] if self.answer_eos else [])

    def render_prompt(self, user_text: str, num_images: int = 0, system: str | None = None) -> str:
        """The text ``prompt_ids`` encodes (without ``<s>``), each image block written ``<image>``."""
        return self._text(self._user_turn(user_text, num_images, system))

    def render_answer(self, text: str) -> str:
        return f" {text.strip()}" + ("</s>" if self.answer_eos else "")


def _added_token_ids(folder: Path) -> dict[str, int]:
    """{token: id} of a Hugging Face tokenizer folder's added tokens (added_tokens.json, or tokenizer_config.json's
    ``added_tokens_decoder``); empty when the folder has neither."""
    if (folder / "added_tokens.json").is_file():
        return read_json(folder / "added_tokens.json")
    if (folder / "tokenizer_config.json").is_file():
        decoder = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
        return {entry["content"]: int(i) for i, entry in decoder.items()}
    return {}


def llava_hf_tokenizer(model_dir: str, separator: str = " ", answer_eos: bool = True,
                       loss_on_prompt: bool = False) -> VicunaTokenizer:
    """The tokenizer of a llava-hf folder: ``tokenizer.model``, the image id of config.json's ``image_token_index``
    and the pad id of its ``pad_token_id``, checked against the folder's added tokens where it lists them."""
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a llava-hf folder such as llava-1.5-7b-hf)")
    config = read_json(config_file)
    image_id, pad_id = config.get("image_token_index", 32000), config.get("pad_token_id")
    added = _added_token_ids(folder)
    for name, expected in (("<image>", image_id), ("<pad>", pad_id)):
        if name in added and expected is not None and added[name] != expected:
            raise ValueError(f"{folder}: the added token {name} has id {added[name]}, but config.json says "
                             f"{expected}")
    return VicunaTokenizer(folder / "tokenizer.model", image_token_id=image_id, pad_id=pad_id, separator=separator,
                           answer_eos=answer_eos, loss_on_prompt=loss_on_prompt)
