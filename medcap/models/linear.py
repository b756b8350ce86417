"""The decoder's linear layers, multiplied the faster way round for the few rows of a decoding step on a CPU.

A decoding step multiplies one row per sequence (16-256 rows) by every weight. For such shapes MKL's CPU product
``weight @ x.T`` runs 1.2-1.6x faster (each product timed alone) than ``x @ weight.T`` (what ``F.linear`` asks)
and gives the same numbers bit for bit (checked from 64 to 14336 wide on the CPU measured); the output
projection's [vocabulary, dim] weight goes in blocks of 4096 rows, which streams it ~1.2x faster again. The result
is a transposed view, so a later reduction over it may round its last bit differently than after ``F.linear``;
decoded tokens are those of transformers in every benchmark row (benchmarks/vs_transformers.py) and test. Below 16
rows the transposed order rounds differently and is not faster; with autograd recording, or off the CPU, it is
``F.linear`` as before.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.tied_linear import Linear as TiedProduct

FEW_ROWS = (16, 256)
VOCAB_BLOCK = 4096  # rows of a large output weight multiplied at a time


def few_rows(x: Tensor, weight: Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and FEW_ROWS[0] <= rows <= FEW_ROWS[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias), as ``(weight @ x.T).T`` where ``few_rows`` says that is faster."""
    if not few_rows(x, weight):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1]).t()
    if weight.shape[0] > 2 * VOCAB_BLOCK:  # logits: made contiguous block by block, for the reductions over them
        out = torch.cat([torch.mm(block, rows).t() for block in weight.split(VOCAB_BLOCK)], dim=1)
    else:
        out = torch.mm(weight, rows).t()  # a transposed view: the layers' next steps read it as it is
    return out.view(*x.shape[:-1], weight.shape[0])


# UPDATED: torch.nn.Linear.forward - the decoder's bias-free projections use ``linear`` above.
class FewRowsLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight) if self.bias is None else super().forward(x)


# UPDATED: torchtune.modules.tied_linear.Linear.forward - the tied output projection uses ``linear`` above; it
# stays the module TiedLinear calls, so torchtune's hooks on it (activation offloading) still find it.
class FewRowsTiedProduct(TiedProduct):
    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return linear(x, weight)


def use_few_rows_products(decoder: TransformerDecoder) -> None:
    """Make ``decoder``'s plain ``nn.Linear``s (attention, MLP, untied output) ``FewRowsLinear``s holding the same
    parameters, and its tied output projection call ``FewRowsTiedProduct``. Names and state dicts do not change."""
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                with torch.device("meta"):
                    swapped = FewRowsLinear(child.in_features, child.out_features, bias=False)
                swapped.weight = child.weight  # the same Parameter: loaded weights and requires_grad kept
                swapped.train(child.training)
                setattr(parent, name, swapped)
    if isinstance(decoder.output, TiedLinear):
        decoder.output.linear = FewRowsTiedProduct()
