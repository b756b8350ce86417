"""R2GenGPT as published (issue 16): its prompt template, report cleaning, schedule, decoding, configs and the import
of its MIMIC delta checkpoints."""

import sentencepiece
import pytest

from medcap.data.reports import clean_report_iu_xray, clean_report_mimic_cxr
from medcap.text import llama2_tokenizer
from tests.test_tokenizers import SENTENCEPIECE_MODEL

PROMPT = "Generate a comprehensive and detailed diagnosis report for this chest xray image."
# REFERENCE.md section 6, R2GenGPT's prompt as its code assembles it (the \n is a newline)
PUBLISHED = ("<s>Human: <Img>{image tokens}</Img> Generate a comprehensive and detailed diagnosis report for this "
             "chest xray image. \nAssistant: {report}</s>")


def test_r2gengpt_template_renders_the_published_prompt_character_for_character():
    tok = llama2_tokenizer(str(SENTENCEPIECE_MODEL), template="r2gengpt")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    report = "the heart is normal in size . no effusion ."
    ids = tok.prompt_ids(PROMPT, 3) + tok.answer_ids(report)
    # R2GenGPT split its prompt at <ImageHere> and tokenised each half, and the report + </s>, on their own
    before = sp.encode("Human: <Img>")
    after = sp.encode(f"</Img> {PROMPT} \nAssistant:")
    answer = sp.encode(report)
    assert ids == [sp.bos_id()] + before + [32000] * 3 + after + answer + [sp.eos_id()]
    assert ids[0] == 1 and ids[-1] == 2 and sp.id_to_piece(after[0]).startswith("\u2581")  # a word-start marker
    start, end = ids.index(32000), len(ids) - ids[::-1].index(32000)
    rendered = ("<s>" + sp.decode(ids[1:start]) + "{image tokens}" + sp.decode(ids[end:-1]) + "</s>")
    assert rendered == PUBLISHED.replace("{report}", report)
    # the chat template stays the default
    chat = llama2_tokenizer(str(SENTENCEPIECE_MODEL))
    assert chat.template == "llama2_chat" and "[INST]" in chat.decode(chat.prompt_ids(PROMPT, 1), False)
    with pytest.raises(ValueError, match="no system text"):
        tok.prompt_ids(PROMPT, 3, system="be brief")
    with pytest.raises(ValueError, match="template must be one of"):
        llama2_tokenizer(str(SENTENCEPIECE_MODEL), template="r2gen")


def test_r2gengpt_mimic_cleaning_keeps_colon_and_comparison_signs():
    report = "FINDINGS: The heart <normal>. 1. No effusion @ base = stable.\nIMPRESSION: None."
    assert clean_report_mimic_cxr(report, "r2gengpt") == (
        "findings : the heart <normal> . no effusion @ base = stable . impression : none .")
    assert clean_report_mimic_cxr(report) == "findings the heart normal . no effusion  base  stable . impression none ."
    # the rest is R2Gen's: runs of blanks and dots shrink, brackets and the like go
    assert clean_report_mimic_cxr("Seen on ___ (prior)...  Stable:yes", "r2gengpt") == "seen on  prior . stable :yes ."
    assert clean_report_iu_xray("Heart: normal.", "r2gengpt") == clean_report_iu_xray("Heart: normal.") == \
        "heart normal ."
    with pytest.raises(ValueError, match="variant must be one of"):
        clean_report_mimic_cxr("x", "r2genx")


def test_length_normalization_hf_4_30_counts_one_more_for_a_hypothesis_cut_at_max_new_tokens():
    """transformers 4.30 (R2GenGPT) divided by len(input_ids) without the end token, input_ids = <s> + generated:
    a hypothesis ending with the stop token after n tokens -> n + 1 (as today); one cut at max_new_tokens m -> m + 1
    (today: m). Hand-computed, length_penalty 1, max_new_tokens 2:
      [C]     stop at step 2: log .5 + log .5             = -1.386 / 2 = -0.693 (both conventions)
      [C, C]  cut at 2 tokens: log .5 + log .45            = -1.492 / 2 = -0.746 (with_end_token)
                                                                  / 3 = -0.497 (hf_4_30)
    """
    import math

    from medcap.generation import beam_search
    from tests.test_generation import A, B, C, D, S, MarkovModel
    from tests.tiny_vlm import PAD, STOP

    # D (kept by the first step) only leads to worse hypotheses: D A -1.877, D B and D stop -1.907
    model = MarkovModel({S: {C: 0.5, D: 0.45, STOP: 0.05}, C: {STOP: 0.5, C: 0.45, D: 0.05},
                         D: {A: 0.34, B: 0.33, STOP: 0.33}})
    kw = dict(num_beams=2, max_new_tokens=2, stop_ids=[STOP], pad_id=PAD, use_cache=False, length_penalty=1.0,
              return_scores=True)
    ids, scores = beam_search(model, [[S]], None, **kw)
    assert ids == [[C]] and scores[0] == pytest.approx((math.log(0.5) + math.log(0.5)) / 2)
    ids, scores = beam_search(model, [[S]], None, length_normalization="hf_4_30", **kw)
    assert ids == [[C, C]] and scores[0] == pytest.approx((math.log(0.5) + math.log(0.45)) / 3)
    with pytest.raises(ValueError, match="length_normalization must be one of"):
        beam_search(model, [[S]], None, length_normalization="without_end", **kw)


def test_cosine_per_epoch_equals_cosine_annealing_lr_stepped_each_epoch():
    import torch

    from medcap.optim import cosine_per_epoch

    def optimizer():
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 3e-4}])

    epochs, per_epoch = 5, 7
    ours = optimizer()
    scheduler = cosine_per_epoch(ours, num_training_steps=epochs * per_epoch, epochs=epochs, eta_min=1e-6)
    reference = optimizer()
    torch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=epochs, eta_min=1e-6)
    for step in range(epochs * per_epoch):
        if step and step % per_epoch == 0:
            torch_scheduler.step()
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in reference.param_groups],
                                                                     rel=1e-9, abs=1e-15), step
        ours.step()
        scheduler.step()
    torch_scheduler.step()  # after the last epoch both reach eta_min
    assert ours.param_groups[1]["lr"] == pytest.approx(reference.param_groups[1]["lr"]) == pytest.approx(1e-6)
