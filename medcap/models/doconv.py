"""DO-Conv (Cao et al. 2020, "Depthwise Over-parameterized Convolution", arXiv 2006.12030), as MeGPT's FEM uses it.

A conv kernel is trained as two factors: ``W`` (C_out, C_in / groups, D_mul) and a depthwise ``D``
(C_in, M*N, D_mul) that starts at zero and is added to a fixed identity ``I``. The kernel the convolution uses is
``einsum('ims,ois->oim', D + I, W)`` reshaped to (C_out, C_in / groups, M, N) (with groups, W is read as
(C_out / groups, C_in, D_mul) for the product, as the definition does). With D = 0 and D_mul = M*N that kernel is
W itself, so training starts from a plain convolution; after training the two factors fold into one kernel, so
inference costs what a plain convolution costs (``fold()``, and the cached kernel used in eval mode).

``I`` is the M*N identity tiled along D_mul (D_mul // (M*N) copies, then zero columns for the remainder), so with
D = 0 the kernel sums W's M*N-wide slices. A 1x1 kernel has no depthwise part (D_mul = 1, the kernel is W).
The kernel is composed in the parameters' dtype (autocast off; the convolution itself still runs under autocast),
so training, the eval-mode cache and ``fold()`` use the same kernel. The cache is refolded when a parameter is
changed in place (its version), replaced (its storage) or loaded, or on ``train()`` / ``eval()``; a write through
``.data`` bypasses the version, so call ``eval()`` again after one.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torch.nn.modules.utils import _pair


class DOConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int = 1, padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1, bias: bool = True, d_mul: int | None = None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible by "
                             f"groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        m, n = self.kernel_size
        self.d_mul = d_mul or m * n
        if m * n == 1 and self.d_mul != 1:
            raise ValueError(f"d_mul {self.d_mul}: a 1x1 kernel has no depthwise part, so d_mul must be 1 or unset")
        if self.d_mul < m * n:
            raise ValueError(f"d_mul {self.d_mul} must be at least M*N = {m * n}")
        self.W = nn.Parameter(torch.empty(out_channels, in_channels // groups, self.d_mul))
        # fan-in initialisation of a plain conv with this kernel (nn.Conv2d's default)
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if m * n > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, m * n, self.d_mul))
            tiled = torch.eye(m * n).repeat(1, self.d_mul // (m * n))
            identity = torch.cat([tiled, torch.zeros(m * n, self.d_mul % (m * n))], dim=1)
            self.register_buffer("identity", identity, persistent=False)  # (M*N, D_mul), the same for each channel
        else:  # a 1x1 kernel has nothing to over-parameterise: W is the kernel
            self.register_parameter("D", None)
            self.identity = None
        if bias:
            bound = 1 / math.sqrt(in_channels // groups * m * n)
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._folded: tuple[tuple, Tensor] | None = None

    def kernel(self) -> Tensor:
        """The composed kernel (C_out, C_in / groups, M, N)."""
        m, n = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, m, n)
        if self.D is None:
            return self.W.reshape(shape)
        w = self.W.reshape(self.out_channels // self.groups, self.in_channels, self.d_mul)
        autocast_off = contextlib.nullcontext()
        if torch.amp.is_autocast_available(self.W.device.type):  # not on meta tensors
            autocast_off = torch.autocast(self.W.device.type, enabled=False)
        with autocast_off:
            return torch.einsum("ims,ois->oim", self.D + self.identity, w).reshape(shape)

    def _cached_kernel(self) -> Tensor:
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in (self.W, self.D) if p is not None)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, self.kernel())
        return self._folded[1]

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel() if self.training or torch.is_grad_enabled() else self._cached_kernel()
        return F.conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def train(self, mode: bool = True) -> "DOConv2d":
        self._folded = None
        return super().train(mode)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the composed kernel: the same function at a plain convolution's cost."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None,
                         device=self.W.device, dtype=self.W.dtype)
        conv.weight.copy_(self.kernel())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, d_mul={self.d_mul}")
