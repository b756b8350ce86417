import math

import pytest
import torch
from torchtune.models.llama2._component_builders import llama2

from medcap.generation import beam_search, generate
from medcap.models.projectors import build_projector
from medcap.models.vlm import VisionLanguageModel
from tests.test_generation import A, B, C, D, S, MarkovModel
from tests.tiny_vlm import IMAGE_ID, PAD, STOP, PatchEncoder


def run(model, prompts, **kw):
    kw = {"stop_ids": [STOP], "pad_id": PAD, "use_cache": False, **kw}
    return beam_search(model, prompts, None, **kw)


def test_beam_search_finds_the_sequence_greedy_misses():
    # S -> A 0.5 | B 0.4 | stop 0.1;  A -> stop 0.4 | A 0.3 | B 0.3;  B -> stop 0.9 | A 0.05 | B 0.05.
    # Greedy: A, stop (0.5 * 0.4 = 0.20). Beam 2 keeps B alive and finds B, stop (0.4 * 0.9 = 0.36).
    model = MarkovModel({S: {A: 0.5, B: 0.4, STOP: 0.1}, A: {STOP: 0.4, A: 0.3, B: 0.3},
                         B: {STOP: 0.9, A: 0.05, B: 0.05}})
    greedy = generate(model, [[S]], None, max_new_tokens=5, stop_ids=[STOP], pad_id=PAD, use_cache=False)
    assert greedy == [[A]]
    assert run(model, [[S]], num_beams=1, max_new_tokens=5) == [[A]]
    ids, scores = run(model, [[S]], num_beams=2, max_new_tokens=5, length_penalty=1.0, return_scores=True)
    assert ids == [[B]]
    assert scores[0] == pytest.approx((math.log(0.4) + math.log(0.9)) / 2)


def test_length_penalty_decides_between_short_and_long_hypotheses():
    # S -> C 0.6 | stop 0.3 | D 0.1;  C -> C 0.55 | stop 0.45;  D -> stop 1.
    # Finished hypotheses found by beam 2 within 3 tokens (stop counted in the length):
    #   []      log .3                   length 1
    #   [C]     log .6 + log .45         length 2
    #   [C,C,C] log .6 + 2 log .55       length 3 (max_new_tokens reached)
    # length_penalty 0 ranks by the sum: [] wins (-1.204 vs -1.310 vs -1.707);
    # length_penalty 1 ranks by the mean: [C,C,C] wins (-0.569 vs -0.655 vs -1.204).
    model = MarkovModel({S: {C: 0.6, STOP: 0.3, D: 0.1}, C: {C: 0.55, STOP: 0.45}, D: {STOP: 1.0}})
    ids, scores = run(model, [[S]], num_beams=2, max_new_tokens=3, length_penalty=0.0, return_scores=True)
    assert ids == [[]] and scores[0] == pytest.approx(math.log(0.3))
    ids, scores = run(model, [[S]], num_beams=2, max_new_tokens=3, length_penalty=1.0, return_scores=True)
    assert ids == [[C, C, C]] and scores[0] == pytest.approx((math.log(0.6) + 2 * math.log(0.55)) / 3)
    # length_penalty 2 divides by length squared: [C,C,C] still best (-0.190 vs -0.327 vs -1.204)
    ids, scores = run(model, [[S]], num_beams=2, max_new_tokens=3, length_penalty=2.0, return_scores=True)
    assert ids == [[C, C, C]] and scores[0] == pytest.approx((math.log(0.6) + 2 * math.log(0.55)) / 9)


def test_min_new_tokens_and_no_repeat_ngram_steer_beam_search():
    model = MarkovModel({S: {A: 0.5, B: 0.4, STOP: 0.1}, A: {STOP: 0.4, A: 0.3, B: 0.3},
                         B: {STOP: 0.9, A: 0.05, B: 0.05}})
    out = run(model, [[S]], num_beams=2, max_new_tokens=6, min_new_tokens=3)
    assert len(out[0]) >= 3
    # with no_repeat_ngram_size=1 no token may appear twice (the prompt's S included)
    out = run(model, [[S]], num_beams=2, max_new_tokens=6, min_new_tokens=2, no_repeat_ngram_size=1)
    assert len(out[0]) >= 2 and len(set(out[0] + [S])) == len(out[0]) + 1


def tiny_llama2_decoder(seed=0):
    """A tiny random Llama 2 with untied, scaled-up output weights: peaked next-token distributions that do not
    just repeat the last token (tests.tiny_vlm's tied embeddings mostly do), so beams and greedy part ways."""
    torch.manual_seed(seed)
    decoder = llama2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=256,
                     intermediate_dim=64)
    with torch.no_grad():
        decoder.output.weight.mul_(4)
    return decoder


def vlm(decoder) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(decoder, PatchEncoder(), build_projector("mlp2", 16, 32), IMAGE_ID).eval()


def prompts_and_images(lengths=(3, 7, 5)):
    g = torch.Generator().manual_seed(1)
    prompts = [[IMAGE_ID] * 4 + torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]
    return prompts, torch.randn(len(lengths), 3, 32, 32, generator=g)


R2GENGPT = dict(num_beams=3, length_penalty=2.0, repetition_penalty=2.0, min_new_tokens=4, max_new_tokens=12)


def test_one_beam_equals_greedy():
    model = vlm(tiny_llama2_decoder(3))
    prompts, images = prompts_and_images()
    for rules in ({}, {"no_repeat_ngram_size": 2, "min_new_tokens": 3}):
        kw = dict(max_new_tokens=12, stop_ids=[STOP], pad_id=PAD, **rules)
        assert beam_search(model, prompts, images, num_beams=1, **kw) == generate(model, prompts, images, **kw)


@pytest.mark.parametrize("settings", [R2GENGPT, dict(num_beams=4, no_repeat_ngram_size=2, max_new_tokens=10)])
def test_beam_search_with_cache_equals_full_recompute(settings):
    model = vlm(tiny_llama2_decoder(3))
    prompts, images = prompts_and_images()
    kw = dict(stop_ids=[STOP], pad_id=PAD, **settings)
    cached, cached_scores = beam_search(model, prompts, images, use_cache=True, return_scores=True, **kw)
    recomputed, scores = beam_search(model, prompts, images, use_cache=False, return_scores=True, **kw)
    assert cached == recomputed
    assert cached_scores == pytest.approx(scores, rel=1e-5)
    assert all(len(ids) >= settings.get("min_new_tokens", 1) for ids in cached)


def test_batched_beam_search_equals_each_prompt_alone():
    model = vlm(tiny_llama2_decoder(5))
    prompts, images = prompts_and_images((2, 9, 4, 6))
    kw = dict(stop_ids=[STOP], pad_id=PAD, **R2GENGPT)
    batched = generate(model, prompts, images, **kw)
    single = [generate(model, [p], images[i:i + 1], **kw)[0] for i, p in enumerate(prompts)]
    assert batched == single
    # the beams made a difference on this model: beam search is not greedy here
    assert batched != generate(model, prompts, images, **{**kw, "num_beams": 1})


def test_a_decided_prompt_leaves_the_batch_with_its_beams():
    model = vlm(tiny_llama2_decoder(3))  # three of its prompts are decided early, each at its own step
    prompts, images = prompts_and_images((2, 9, 4, 6))
    kw = dict(stop_ids=[STOP], pad_id=PAD, **{**R2GENGPT, "max_new_tokens": 40, "length_penalty": 1.0})
    sizes = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    cached, cached_scores = beam_search(model, prompts, images, return_scores=True, **kw)
    seen = list(sizes)
    recomputed, scores = beam_search(model, prompts, images, use_cache=False, return_scores=True, **kw)
    assert cached == recomputed and cached_scores == pytest.approx(scores, rel=1e-5)
    # prefill: one row per prompt; then 3 beams per prompt still open, fewer once prompts are decided
    assert seen == [4] + [12] * 20 + [9] * 7 + [6] * 6 + [3] * 6


def test_the_vision_tower_runs_once_per_batch():
    model = vlm(tiny_llama2_decoder(3))
    prompts, images = prompts_and_images()
    seen = []
    model.vision.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    generate(model, prompts, images, stop_ids=[STOP], pad_id=PAD, **R2GENGPT)
    assert seen == [3]  # one call, one row per image: not once per beam, not once per step


def test_beam_search_refuses_sampling_and_bad_settings():
    model = vlm(tiny_llama2_decoder())
    prompts, images = prompts_and_images()
    kw = dict(max_new_tokens=4, stop_ids=[STOP], pad_id=PAD)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        generate(model, prompts, images, num_beams=2, temperature=0.7, **kw)
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        generate(model, prompts, images, repetition_penalty=0.0, **kw)
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        generate(model, prompts, images, num_beams=0, **kw)


def hf_pair(seed=0):
    """The same tiny random Llama 2 as a torchtune decoder (inside our VLM) and as a transformers model."""
    from torchtune.models.convert_weights import tune_to_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    decoder = tiny_llama2_decoder(seed)
    weights = tune_to_hf({k: v.clone() for k, v in decoder.state_dict().items()}, num_heads=4, num_kv_heads=2, dim=32)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(weights)
    return vlm(decoder), hf


def hf_new_tokens(out: list[int]) -> list[int]:
    while out and out[-1] == PAD:
        out = out[:-1]
    return out[:-1] if out and out[-1] == STOP else out


@pytest.mark.parametrize("settings", [
    R2GENGPT,
    dict(num_beams=4, no_repeat_ngram_size=2, max_new_tokens=15),
    dict(num_beams=2, length_penalty=-1.0, max_new_tokens=10),
    dict(num_beams=1, repetition_penalty=1.5, no_repeat_ngram_size=3, min_new_tokens=4, max_new_tokens=12),
])
def test_decoding_matches_hugging_face_generate(settings):
    """transformers' generate on the same weights is the reference for what the settings mean."""
    ours, hf = hf_pair()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        prompt = torch.randint(2, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=STOP, pad_token_id=PAD,
                                    **settings)[0, len(prompt):].tolist()
        assert generate(ours, [prompt], None, stop_ids=[STOP], pad_id=PAD, **settings)[0] == hf_new_tokens(reference)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_penalize_prompt_false_matches_hugging_face_given_embeddings():
    # R2GenGPT passed its prompt as inputs_embeds: Hugging Face then penalises generated tokens only
    ours, hf = hf_pair()
    g = torch.Generator().manual_seed(2)
    differs = False
    for _ in range(4):
        prompt = torch.randint(2, 64, (6,), generator=g).tolist()
        with torch.no_grad():
            embeds = hf.get_input_embeddings()(torch.tensor([prompt]))
            reference = hf.generate(inputs_embeds=embeds, do_sample=False, eos_token_id=STOP, pad_token_id=PAD,
                                    **R2GENGPT)[0].tolist()
        kw = dict(stop_ids=[STOP], pad_id=PAD, **R2GENGPT)
        out = generate(ours, [prompt], None, penalize_prompt=False, **kw)[0]
        assert out == hf_new_tokens(reference)
        differs |= out != generate(ours, [prompt], None, penalize_prompt=True, **kw)[0]
    assert differs  # the setting matters on these prompts
