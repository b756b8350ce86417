"""Training samples: chat prompt (with image placeholders) + answer, with labels only on the answer."""

from typing import Any

from medcap.text.tokenizers import ChatTokenizer

IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)


def prompt_labels(tokenizer: ChatTokenizer, prompt_ids: list[int], labelled_tail: int = 0) -> list[int]:
    """Labels of prompt tokens: IGNORE_INDEX, or, for a tokenizer with ``loss_on_prompt`` (the AUEB thesis trained
    LLaVA so), the token ids themselves, image placeholders still ignored. ``labelled_tail``: the prompt's last
    tokens are labelled anyway (the medcap seed trained on the assistant turn's header too:
    ``medcap.text.seed_prompts.assistant_header_length``)."""
    if getattr(tokenizer, "loss_on_prompt", False):
        return [IGNORE_INDEX if i == tokenizer.image_token_id else i for i in prompt_ids]
    keep = min(labelled_tail, len(prompt_ids))
    return [IGNORE_INDEX] * (len(prompt_ids) - keep) + prompt_ids[len(prompt_ids) - keep:]


def _cut(answer: list[int], room: int, tokenizer: ChatTokenizer) -> list[int]:
    """``answer`` cut to ``room`` tokens, keeping its end-of-turn token when it ends with one (an answer without
    one, e.g. ``VicunaTokenizer(answer_eos=False)``, is simply cut)."""
    if answer[-1] in getattr(tokenizer, "stop_ids", answer[-1:]):
        return answer[:room - 1] + answer[-1:]
    return answer[:room]


def build_sample(tokenizer: ChatTokenizer, prompt: str, caption: str, num_image_tokens: int, max_seq_len: int,
                 system: str | None = None, *, labelled_header: int = 0,
                 max_answer_tokens: int | None = None) -> dict[str, Any]:
    """``tokens`` = ``prompt_ids`` + ``answer_ids(caption)``. ``labels`` are aligned with ``tokens`` (the loss
    shifts them): IGNORE_INDEX on the whole prompt (its text, the image placeholders, the assistant header; see
    ``prompt_labels`` for the exception), the token ids on the caption and its end-of-turn token.

    A caption that does not fit ``max_seq_len`` is cut, keeping its end-of-turn token (``truncated`` is then
    True); the prompt and the image placeholders are never cut. ValueError when the prompt leaves no room for
    at least one caption token and the end-of-turn token. ``max_answer_tokens`` also limits the answer (caption
    and end-of-turn token) on its own, as R2GenGPT cut its reports to 60 / 100 tokens (its cut dropped the end
    token; here the end token stays and the caption gives way)."""
    prompt_ids = tokenizer.prompt_ids(prompt, num_image_tokens, system)
    answer = tokenizer.answer_ids(caption)
    room = max_seq_len - len(prompt_ids)
    if max_answer_tokens is not None:
        if max_answer_tokens < 2:
            raise ValueError(f"max_answer_tokens must leave room for a caption token and the end token, got "
                             f"{max_answer_tokens}")
        room = min(room, max_answer_tokens)
    if room < 2:
        raise ValueError(f"the prompt needs {len(prompt_ids)} tokens ({num_image_tokens} of them image tokens) and "
                         f"the caption at least 2 more, but max_seq_len is {max_seq_len}")
    truncated = len(answer) > room
    if truncated:
        answer = _cut(answer, room, tokenizer)
    return {"tokens": prompt_ids + answer, "labels": prompt_labels(tokenizer, prompt_ids, labelled_header) + answer,
            "truncated": truncated}


def build_conversation_sample(tokenizer: ChatTokenizer, turns: list[tuple[str, str]], num_image_tokens: int,
                              max_seq_len: int, system: str | None = None, *, labelled_header: int = 0,
                              max_answer_tokens: int | None = None) -> dict[str, Any]:
    """A multi-turn conversation ``[(user, assistant), ...]``: the first user turn carries the image
    placeholders (``prompt_ids``), later ones are ``followup_ids``; labels only on the assistant answers and their
    end-of-turn tokens. One exchange gives exactly ``build_sample``.

    Too long for ``max_seq_len``: whole trailing exchanges are dropped first; the last exchange kept has its
    answer cut (keeping its end-of-turn token) when its user turn and two answer tokens fit, else it is dropped
    too; the first user turn and the image placeholders are never cut (ValueError when they leave no room for
    two answer tokens). ``max_answer_tokens`` caps every answer (with its end-of-turn token) as in
    ``build_sample``; a capped answer does not end the conversation. ``truncated`` says whether anything was dropped
    or cut."""
    if not turns:
        raise ValueError("a conversation needs at least one (user, assistant) exchange")
    first = build_sample(tokenizer, turns[0][0], turns[0][1], num_image_tokens, max_seq_len, system,
                         labelled_header=labelled_header, max_answer_tokens=max_answer_tokens)
    tokens, labels, truncated = first["tokens"], first["labels"], first["truncated"]
    for index, (user, answer) in enumerate(turns[1:], 1):
        prompt, reply = tokenizer.followup_ids(user), tokenizer.answer_ids(answer)
        room = max_seq_len - len(tokens) - len(prompt)  # < 2 as well after an answer cut to fit max_seq_len
        if room < 2:
            truncated = True
            break
        if max_answer_tokens is not None:
            room = min(room, max_answer_tokens)
        if len(reply) > room:
            reply, truncated = _cut(reply, room, tokenizer), True
        tokens = tokens + prompt + reply
        labels = labels + prompt_labels(tokenizer, prompt, labelled_header) + reply
    return {"tokens": tokens, "labels": labels, "truncated": truncated}
