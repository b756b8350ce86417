import pytest

from medcap.models.decoders import llama_decoder, smollm2_135m
from medcap.models.llm_weights import check_gguf_settings, load_gguf_decoder, smollm2_gguf_path
from medcap.models.llm_weights import deferred_weights


def smollm2_shaped(**changed):
    settings = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
                    intermediate_dim=1536, max_seq_len=64, rope_base=100_000, tie_embeddings=True)
    return llama_decoder(**{**settings, **changed})


def test_gguf_settings_must_be_the_decoders():
    check_gguf_settings(smollm2_135m(max_seq_len=64), smollm2_gguf_path())  # the packaged file fits its builder
    with pytest.raises(ValueError, match=r"SmolLM2.*does not fit the decoder it is loaded into: "
                                         r"llama.rope.freq_base = 100000 \(the decoder: 10000\)"):
        load_gguf_decoder(smollm2_shaped(rope_base=10_000))  # same shapes, another RoPE base
    with deferred_weights(), pytest.raises(ValueError, match=r"llama.attention.layer_norm_rms_epsilon = 1e-05 "
                                                             r"\(the decoder: 0.001\)"):
        load_gguf_decoder(smollm2_shaped(norm_eps=1e-3))  # checked when the weights come later too
