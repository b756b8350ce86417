"""Projectors: map vision tokens [B, N, D_vision] into the LLM's embedding space [B, N', D_llm]."""

from torch import nn, Tensor


class PooledToTokens(nn.Module):
    """medcap's projector: one pooled image embedding -> ``num_tokens`` LLM tokens.

    Linear(D_vision -> hidden), GELU, Linear(hidden -> num_tokens * D_llm); patch tokens are not used.
    Input [B, 1, D_vision] (or [B, D_vision]), output [B, num_tokens, D_llm].
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 50, hidden_dim: int | None = None):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        hidden_dim = hidden_dim or out_dim
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            if x.shape[1] != 1:
                raise ValueError(f"PooledToTokens expects one pooled embedding per image, got {x.shape[1]} tokens")
            x = x[:, 0]
        return self.net(x).view(x.shape[0], self.num_tokens, self.out_dim)


def build_projector(kind: str, in_dim: int, out_dim: int, num_tokens: int | None = None) -> nn.Module:
    """``linear`` | ``mlp2`` (Linear, GELU, Linear as in LLaVA 1.5) | ``linear_ln`` (Linear + LayerNorm as in
    R2GenGPT) | ``pooled_mlp`` (medcap's pooled embedding -> ``num_tokens`` tokens; None: 50). The others keep the
    encoder's token count."""
    if num_tokens is not None and kind != "pooled_mlp":
        raise ValueError(f"num_tokens applies to projector 'pooled_mlp'; {kind!r} keeps the encoder's token count "
                         f"(remove num_tokens, e.g. ~model.num_tokens)")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear_ln":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
    if kind == "pooled_mlp":
        return PooledToTokens(in_dim, out_dim, 50 if num_tokens is None else num_tokens)
    raise ValueError(f"unknown projector {kind!r}; choose one of linear, mlp2, linear_ln, pooled_mlp")


def projector_num_tokens(projector: nn.Module, encoder_tokens: int) -> int:
    """How many LLM tokens one image becomes after this projector."""
    projector = getattr(projector, "mapper", projector)  # FEM in front of a mapper keeps the token count
    return projector.num_tokens if isinstance(projector, PooledToTokens) else encoder_tokens
