"""Training samples: prompt (with image placeholders) + answer, labels only on the answer."""

IGNORE_INDEX = -100


def build_sample(tokenizer, prompt: str, caption: str, num_image_tokens: int, max_seq_len: int,
                 system: str | None = None) -> dict:
    """``tokens`` = chat prompt + caption + end-of-turn; ``labels`` aligned with ``tokens``: IGNORE_INDEX on the
    prompt (its text, the image placeholders and the assistant header), the token ids on the caption and its
    end-of-turn token. A caption that does not fit ``max_seq_len`` is cut (its end-of-turn token kept); the
    prompt and image tokens never are."""
    prompt_ids = tokenizer.prompt_ids(prompt, num_image_tokens, system)
    answer = tokenizer.answer_ids(caption)
    room = max_seq_len - len(prompt_ids)
    if room < 2:
        raise ValueError(f"the prompt needs {len(prompt_ids)} tokens ({num_image_tokens} of them image tokens), "
                         f"leaving no room for a caption within max_seq_len={max_seq_len}")
    truncated = len(answer) > room
    if truncated:
        answer = answer[:room - 1] + answer[-1:]
    return {"tokens": prompt_ids + answer, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer, "truncated": truncated}
