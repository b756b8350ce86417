"""Decoder-only LLMs as torchtune ``TransformerDecoder``s.

The full-size Llama models come straight from torchtune (``torchtune.models.llama3_1.llama3_1_8b``,
``torchtune.models.llama2.llama2_7b``, ``torchtune.models.llama3_2.llama3_2_1b``); this module adds SmolLM2 and
tiny random members of each family for tests.
"""

from torch import nn
from torchtune.models.llama2._component_builders import llama2
from torchtune.models.llama3_1._component_builders import llama3_1
from torchtune.modules import (
    FeedForward,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from medcap.models.attention import GroupedQueryAttention


def llama_decoder(vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                  intermediate_dim: int, max_seq_len: int, rope_base: float = 10_000, norm_eps: float = 1e-5,
                  tie_embeddings: bool = False) -> TransformerDecoder:
    """A Llama-architecture decoder with plain RoPE (no Llama 3 frequency scaling), grouped-query attention
    (``GroupedQueryAttention``: the key / value heads shared inside SDPA, not copied),
    SwiGLU MLP and RMSNorm; optionally with the output projection tied to the token embeddings."""
    head_dim = embed_dim // num_heads
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = GroupedQueryAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(embed_dim, embed_dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len,
        )
        mlp = FeedForward(gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
                          down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
                          up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False))
        layers.append(TransformerSelfAttentionLayer(attn=attn, mlp=mlp, sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                                                    mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len,
                              num_heads=num_heads, head_dim=head_dim, norm=RMSNorm(embed_dim, eps=norm_eps),
                              output=output)


def smollm2_135m(max_seq_len: int = 2048) -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): Llama architecture, 30 layers, dim 576, 9 heads / 3 KV heads, tied embeddings."""
    return llama_decoder(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
                         intermediate_dim=1536, max_seq_len=max_seq_len, rope_base=100_000, tie_embeddings=True)


def tiny_smollm2(vocab_size: int = 49152, max_seq_len: int = 512) -> TransformerDecoder:
    return llama_decoder(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                         intermediate_dim=128, max_seq_len=max_seq_len, rope_base=100_000, tie_embeddings=True)


def tiny_llama3(vocab_size: int = 128256, max_seq_len: int = 512, embed_dim: int = 64,
                num_layers: int = 2) -> TransformerDecoder:
    """Llama 3.1 family (scaled RoPE, untied output), tiny."""
    return llama3_1(vocab_size=vocab_size, num_layers=num_layers, num_heads=4, num_kv_heads=2, embed_dim=embed_dim,
                    max_seq_len=max_seq_len, intermediate_dim=2 * embed_dim)


def tiny_llama2(vocab_size: int = 32000, max_seq_len: int = 512) -> TransformerDecoder:
    return llama2(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64,
                  max_seq_len=max_seq_len, intermediate_dim=128)
