"""Cross-entropy of ``hidden @ weight.T`` without the [N, vocab] logits, their fp32 copy or their gradient ever
existing whole: the rows go through in chunks, and each chunk's gradients (softmax minus one-hot, times the
weight / the hidden states) are computed in the forward pass, while its logits are at hand. The backward only
scales them by the incoming gradient. Same loss and gradients as ``F.cross_entropy(hidden @ weight.T, targets)``
up to float rounding; it pays off on a CPU, where every fresh [N, vocab] buffer is paged in anew each step."""

import torch
from torch import Tensor

CHUNK_ELEMENTS = 2 ** 22  # logits per chunk (16 MB in fp32)
# exp() of a log-probability below this is a denormal float, and denormals make the next matrix product tens of
# times slower on a CPU; such probabilities (< 1e-37) count as zero
LOG_DENORMAL = -86.0


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, want_hidden_grad: bool,
                want_weight_grad: bool) -> Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        # a trained weight's gradient [vocab, D] would be read and written once per chunk: one chunk then
        chunk = rows if want_weight_grad else max(1, CHUNK_ELEMENTS // vocab)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk].to(weight.dtype)
            t = targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            logp = logits.sub_(lse[:, None])
            probs = logp.masked_fill_(logp < LOG_DENORMAL, float("-inf")).exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits, row by row
            g = probs.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)`` for hidden [N, D], weight [V, D],
    targets [N] (every row labelled), reduction ``mean`` or ``sum``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    grad = torch.is_grad_enabled()
    total = _LinearCrossEntropy.apply(hidden, weight, targets, grad and hidden.requires_grad,
                                      grad and weight.requires_grad)
    return total / max(len(targets), 1) if reduction == "mean" else total
