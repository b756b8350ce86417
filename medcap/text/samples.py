"""Training samples: chat prompt (with image placeholders) + answer, with labels only on the answer."""

from typing import Any

from medcap.text.tokenizers import ChatTokenizer

IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)


def build_sample(tokenizer: ChatTokenizer, prompt: str, caption: str, num_image_tokens: int, max_seq_len: int,
                 system: str | None = None) -> dict[str, Any]:
    """``tokens`` = ``prompt_ids`` + ``answer_ids(caption)``. ``labels`` are aligned with ``tokens`` (the loss
    shifts them): IGNORE_INDEX on the whole prompt (its text, the image placeholders, the assistant header), the
    token ids on the caption and its end-of-turn token.

    A caption that does not fit ``max_seq_len`` is cut, keeping its end-of-turn token (``truncated`` is then
    True); the prompt and the image placeholders are never cut. ValueError when the prompt leaves no room for
    at least one caption token and the end-of-turn token."""
    prompt_ids = tokenizer.prompt_ids(prompt, num_image_tokens, system)
    answer = tokenizer.answer_ids(caption)
    room = max_seq_len - len(prompt_ids)
    if room < 2:
        raise ValueError(f"the prompt needs {len(prompt_ids)} tokens ({num_image_tokens} of them image tokens) and "
                         f"the caption at least 2 more, but max_seq_len is {max_seq_len}")
    truncated = len(answer) > room
    if truncated:
        answer = answer[:room - 1] + answer[-1:]
    return {"tokens": prompt_ids + answer, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer, "truncated": truncated}
