"""Depthwise convolutions backpropagated in bf16 on a CPU, through oneDNN's fp32 kernel.

Training a CNN encoder under bf16 autocast on a CPU, oneDNN's bf16 backward of a depthwise convolution is 3-6x
slower than its fp32 one (EfficientNet-Lite0's 5x5 depthwise at 4 x 1152 x 7 x 7: 16 ms against 2.7 ms on the
2-core EPYC measured); the 16 depthwise layers were a quarter of the demo's training step. Here the forward is the
bf16 convolution autocast would run, and the backward upcasts the saved bf16 tensors, runs the fp32 kernel and
rounds the gradients to bf16. Both kernels accumulate in fp32 and round once, so on EfficientNet-Lite0 the image
gradient and every gradient but the depthwise weights' are those of the bf16 kernel bit for bit, and the depthwise
weights' differ in the last bit of a few elements (a large map's positions summed in another order;
tests/test_depthwise.py). Layers with a bias or another padding mode are not swapped; without autocast to bf16,
without a gradient or on another device a swapped layer runs the plain ``nn.Conv2d`` forward.
"""

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn


class _Bf16DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight.float(), None, stride, padding, dilation, False, [0, 0], groups, wanted)
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None, None, None, None)


def _bf16_backward_wanted(conv: nn.Conv2d, x: Tensor) -> bool:
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or conv.weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == conv.weight.dtype == torch.bfloat16


def _conv(conv: nn.Conv2d, x: Tensor, padding) -> Tensor:
    with torch.autocast("cpu", enabled=False):  # the casts autocast would make, done here so autograd sees them
        return _Bf16DepthwiseConv.apply(x.to(torch.bfloat16), conv.weight.to(torch.bfloat16), conv.stride,
                                        padding, conv.dilation, conv.groups)


# UPDATED: torch.nn.Conv2d.forward - depthwise layers backpropagate bf16 through the fp32 kernel (module doc).
class DepthwiseConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if not _bf16_backward_wanted(self, x):
            return super().forward(x)
        return _conv(self, x, self.padding)


# UPDATED: timm.layers.Conv2dSame.forward - the same, after timm's TensorFlow "same" padding.
class DepthwiseConv2dSame(Conv2dSame):
    def forward(self, x: Tensor) -> Tensor:
        if not _bf16_backward_wanted(self, x):
            return super().forward(x)
        return _conv(self, pad_same(x, self.weight.shape[-2:], self.stride, self.dilation), (0, 0))


def use_fast_depthwise_backward(model: nn.Module) -> int:
    """Make ``model``'s depthwise convolutions (groups == in_channels > 1, no bias, numeric zero padding) the classes
    above, holding the same parameters: names, state dicts and forward values do not change. Returns how many were
    swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = {nn.Conv2d: DepthwiseConv2d, Conv2dSame: DepthwiseConv2dSame}.get(type(child))
            if kind is None or child.bias is not None or not 1 < child.groups == child.in_channels:
                continue
            if child.padding_mode != "zeros" or isinstance(child.padding, str):  # F.conv2d pads these otherwise
                continue
            with torch.device("meta"):  # (timm's Conv2dSame pads in forward: its padding is 0)
                new = kind(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                           child.dilation, child.groups, bias=False)
            new.weight = child.weight  # the same Parameter: loaded values, memory order and requires_grad kept
            new.train(child.training)
            setattr(parent, name, new)
            swapped += 1
    return swapped
