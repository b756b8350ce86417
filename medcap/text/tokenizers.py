"""The interface every medcap tokenizer follows (``ChatTokenizer``) and the bits the implementations share.

Implementations: ``medcap.text.smollm2`` (SmolLM2, from a GGUF file) and ``medcap.text.llama`` (Llama 3 and
Llama 2, through torchtune). All of them:

- treat text as text: a special token's spelling inside a prompt or caption (``<|im_end|>``, ``<s>``...) is
  encoded as ordinary characters, never as the special token;
- reserve ``image_token_id == vocab_size``, one past the last id the LLM embeds, for image placeholders: the
  vision-language model swaps the embeddings at those positions for image features;
- strip surrounding whitespace from the system text, the user text and the answer before templating them;
- put the image placeholders at the start of the user's content, right before the user text; the text keeps
  exactly the tokens it has in the text-only prompt.
"""

from typing import Protocol

# How ``decode(ids, skip_special_tokens=False)`` shows an image placeholder (Llama 3's own name for it).
IMAGE_PLACEHOLDER = "<|image|>"


class ChatTokenizer(Protocol):
    vocab_size: int  # ids the LLM's embedding covers
    pad_id: int
    eos_id: int
    stop_ids: list[int]  # generation stops at any of these (the end-of-turn token among them)
    image_token_id: int  # == vocab_size: never produced by encode, never embedded by the LLM

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids to text; special tokens and image placeholders are dropped unless ``skip_special_tokens`` is
        False, which shows them by name (image placeholders as ``IMAGE_PLACEHOLDER``)."""
        ...

    def prompt_ids(self, user_text: str, num_image_tokens: int = 0, system: str | None = None) -> list[int]:
        """The chat prefix up to and including the assistant header: generation continues from there."""
        ...

    def followup_ids(self, user_text: str, num_image_tokens: int = 0) -> list[int]:
        """A later user turn of a conversation (no system text) up to and including the assistant header; it
        follows the previous ``answer_ids``. Its image placeholders, if any, sit at the start of its user content
        as in ``prompt_ids`` (kNN few-shot turns carry each neighbour's image)."""
        ...

    def answer_ids(self, text: str) -> list[int]:
        """The assistant's text followed by its end-of-turn token."""
        ...


def image_block(image_token_id: int, count: int) -> list[int]:
    if count < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {count}")
    return [image_token_id] * count
