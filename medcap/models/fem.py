"""MeGPT's Feature Enhancement Module (FEM): multi-branch feature extraction and fusion with DO-Conv on the
vision encoder's token grid, before the mapper. The seed names the idea only; the design here is ours:

- tokens [B, N, C] with N a square (Swin-B: 7 x 7 = 49 tokens of 1024; the demo's EfficientNet: 4 x 4 or
  7 x 7 of 1280) are laid out as a map [B, C, s, s];
- parallel DO-Conv branches with different receptive fields (default: 1x1, 3x3, 3x3 dilated 2), each
  C -> C / reduction channels, followed by GELU;
- the branch outputs, concatenated, are fused by a 1x1 convolution back to C channels and added to the input
  (residual). The fusion starts at zero (``zero_init_fuse``), so a model with FEM starts as exactly the model
  without it and the branches learn from there (gradients reach them once the fusion moves off zero).
"""

import math

from torch import nn, Tensor
import torch

from medcap.models.doconv import DOConv2d

DEFAULT_BRANCHES = ({"kernel_size": 1}, {"kernel_size": 3}, {"kernel_size": 3, "dilation": 2})


class FeatureEnhancement(nn.Module):
    def __init__(self, channels: int, branches: list[dict] | tuple[dict, ...] = DEFAULT_BRANCHES,
                 reduction: int = 4, width: int | None = None, zero_init_fuse: bool = True):
        super().__init__()
        if not branches:
            raise ValueError("fem.branches: give at least one branch ({kernel_size: K, dilation: D})")
        self.channels = channels
        self.width = width or max(channels // reduction, 1)
        self.branches = nn.ModuleList()
        for i, branch in enumerate(branches):
            branch = dict(branch)
            unknown = set(branch) - {"kernel_size", "dilation"}
            if unknown or "kernel_size" not in branch:
                raise ValueError(f"fem.branches[{i}]={branch}: each branch is {{kernel_size: K, dilation: D}}")
            k, d = int(branch["kernel_size"]), int(branch.get("dilation", 1))
            if k % 2 == 0:
                raise ValueError(f"fem.branches[{i}]: kernel_size {k} must be odd (the map keeps its size)")
            self.branches.append(nn.Sequential(
                DOConv2d(channels, self.width, k, padding=d * (k // 2), dilation=d), nn.GELU()))
        self.fuse = nn.Conv2d(self.width * len(branches), channels, 1)
        if zero_init_fuse:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, n, c = tokens.shape
        side = math.isqrt(n)
        if side * side != n or n == 1 or c != self.channels:
            raise ValueError(f"FEM needs a square grid (at least 2 x 2) of {self.channels}-d tokens, got {n} tokens "
                             f"of {c} (pooled encoders, output=pooled or global_only, have no grid)")
        x = tokens.transpose(1, 2).reshape(batch, c, side, side)
        fused = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        return tokens + fused.flatten(2).transpose(1, 2)


class EnhancedProjector(nn.Module):
    """FEM, then the mapper: the projector part of a MeGPT model (it trains, and is saved, as the projector)."""

    def __init__(self, fem: FeatureEnhancement, mapper: nn.Module):
        super().__init__()
        self.fem, self.mapper = fem, mapper

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mapper(self.fem(tokens))


def fem_macs(fem: FeatureEnhancement, num_tokens: int) -> int:
    """Multiply-accumulates of one image through FEM at inference (folded kernels), ``num_tokens`` positions."""
    macs = 0
    for branch in fem.branches:
        conv = branch[0]
        m, n = conv.kernel_size
        macs += num_tokens * conv.out_channels * conv.in_channels // conv.groups * m * n
    macs += num_tokens * fem.fuse.out_channels * fem.fuse.in_channels
    return macs


def inference_parameters(fem: FeatureEnhancement) -> int:
    """Parameters after folding (what inference holds): each DO-Conv becomes one M x N kernel."""
    total = sum(p.numel() for p in fem.fuse.parameters())
    for branch in fem.branches:
        conv = branch[0]
        total += conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        total += conv.out_channels if conv.bias is not None else 0
    return total
