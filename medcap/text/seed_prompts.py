"""The medcap seed's prompts as text, and the token ids its generation recipe fed the model.

The seed (torchtune 0.2.1, Llama 3.1 Instruct) built each prompt as a chat (``tokenize_messages``), decoded it to
a string and passed that string to its generation recipe, which encoded it again with ``encode(prompt,
add_bos=True)``. Two things follow from torchtune 0.2.1's tokenizer: the decoded string has no
``<|begin_of_text|>`` (its ``decode`` drops the BOS id), and ``encode`` spells special tokens as ordinary text
(``<|eot_id|>`` becomes the six tokens ``<``, ``|``, ``eot``, ``_id``, ``|``, ``>``). So at inference the seed's
model read the chat markers as plain text after one real BOS, while it was trained on the real special tokens.
Its image placeholder was the character ``①`` (Llama 3 token 118075), 50 per image, in the user turn.

``rendered_prompt`` writes medcap's prompt ids as the seed's string (for comparison with the seed's logged
prompts); ``seed_text_ids`` gives the ids the seed's recipe fed the model, with medcap's image placeholder id
where the seed had ``①`` (``vqa`` ``prompt_encoding: seed_text``).
"""

SEED_PLACEHOLDER = "①"


def rendered_prompt(tokenizer, ids: list[int]) -> str:
    """``ids`` as the seed rendered prompts: special tokens spelled out, the leading BOS left out, each image
    placeholder written as ``①``."""
    bos = getattr(tokenizer, "bos_id", None)
    if ids and ids[0] == bos:
        ids = ids[1:]
    pieces, run = [], []
    for token in ids + [None]:
        if token == tokenizer.image_token_id or token is None:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            if token is not None:
                pieces.append(SEED_PLACEHOLDER)
        else:
            run.append(token)
    return "".join(pieces)


def seed_text_ids(tokenizer, ids: list[int]) -> list[int]:
    """The ids the seed's generation recipe fed the model for the chat prompt ``ids``: BOS, then the rendered
    prompt encoded as plain text, with medcap's image placeholder id where the text has ``①``. Needs a tokenizer
    with a BOS in which ``①`` is one token (Llama 3's 118075)."""
    seed_id = tokenizer.encode(SEED_PLACEHOLDER)
    bos = getattr(tokenizer, "bos_id", None)
    if len(seed_id) != 1 or bos is None:
        raise ValueError(f"seed_text prompts need a tokenizer with a BOS token in which {SEED_PLACEHOLDER!r} is a "
                         f"single token, as in Llama 3 (the medcap seed's); {type(tokenizer).__name__} has "
                         f"{'no BOS' if bos is None else f'{len(seed_id)} tokens for it'}")
    out = [bos] + [tokenizer.image_token_id if t == seed_id[0] else t
                   for t in tokenizer.encode(rendered_prompt(tokenizer, ids))]
    expected, found = ids.count(tokenizer.image_token_id), out.count(tokenizer.image_token_id)
    if found != expected:
        raise ValueError(f"the prompt holds {expected} image placeholders but its text {found} "
                         f"{SEED_PLACEHOLDER!r} (one in the text itself, e.g. a description or question?)")
    return out


def assistant_header_length(tokenizer) -> int:
    """How many tokens open the assistant's turn at the end of ``prompt_ids``, after the user turn's end-of-turn
    token (Llama 3: ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``, 4 tokens). The seed's torchtune masked
    whole messages, so its labels covered this header of every assistant message. SmolLM2 (ChatML): 4 tokens,
    ``<|im_start|>assistant\\n``; the newline after ``<|im_end|>`` belongs to the user's message."""
    probe = tokenizer.encode("x")
    ids = tokenizer.prompt_ids("x")
    start = next(i for i in range(len(ids)) if ids[i:i + len(probe)] == probe) + len(probe)
    end = next((i for i in range(start, len(ids)) if ids[i] in tokenizer.stop_ids), None)
    if end is None:
        raise ValueError(f"label_assistant_header needs a chat template whose user turn ends with an end-of-turn "
                         f"token (Llama 3, SmolLM2); {type(tokenizer).__name__}'s does not")
    while end + 1 < len(ids) and not tokenizer.decode([ids[end + 1]], skip_special_tokens=False).strip():
        end += 1  # ChatML's "\n" after <|im_end|> still ends the user's message
    return len(ids) - end - 1
