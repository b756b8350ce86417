import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from medcap.models.depthwise import DepthwiseConv2d, DepthwiseConv2dSame, use_fast_depthwise_backward
from medcap.models.encoders import efficientnet_lite0

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def fwd_bwd(model: nn.Module, images: torch.Tensor, autocast: bool):
    images = images.clone().requires_grad_()
    with torch.autocast(**BF16, enabled=autocast):
        out = model.forward_features(images)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, images.grad, grads


@pytest.fixture(scope="module")
def lite0_pair():
    """medcap's EfficientNet-Lite0 (packaged weights, depthwise layers swapped) and timm's own model holding the
    same weights, both channels-last and in train mode (BatchNorm on batch statistics, as the demo trains)."""
    ours = efficientnet_lite0().model.train()
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    plain.load_state_dict(ours.state_dict())
    plain = plain.to(memory_format=torch.channels_last).train()
    return ours, plain


def test_lite0_swaps_its_16_depthwise_layers_and_keeps_names(lite0_pair):
    ours, plain = lite0_pair
    kinds = [type(m) for m in ours.modules()]
    assert kinds.count(DepthwiseConv2d) == 12 and kinds.count(DepthwiseConv2dSame) == 4  # the stride-2 ones pad
    assert list(ours.state_dict()) == list(plain.state_dict())
    # only depthwise layers: the stem (Conv2dSame, groups 1) and the 1x1 convolutions stay as they were
    assert type(ours.conv_stem) is Conv2dSame and type(ours.blocks[1][0].conv_pw) is nn.Conv2d
    assert ours.blocks[1][0].conv_dw.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_training_gives_the_bf16_kernels_gradients(lite0_pair):
    """Against timm's model on the native bf16 kernels: the features and the image gradient bit for bit, every
    gradient but the depthwise weights' bit for bit, those within summation order (a last-bit difference in a
    few elements, where the fp32 kernel adds a large map's positions in another order)."""
    ours, plain = lite0_pair
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out, image_grad, grads = fwd_bwd(ours, images, autocast=True)
    ref_out, ref_image_grad, ref_grads = fwd_bwd(plain, images, autocast=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    assert torch.equal(image_grad, ref_image_grad)
    depthwise = {f"{n}.weight" for n, m in ours.named_modules() if isinstance(m, (DepthwiseConv2d, DepthwiseConv2dSame))}
    assert len(depthwise) == 16
    for name, grad in grads.items():
        assert grad.dtype == torch.float32  # the parameters stay fp32 under autocast
        if name in depthwise:
            assert (grad != ref_grads[name]).float().mean() < 0.02, name
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-3 * ref_grads[name].abs().max())
        else:
            assert torch.equal(grad, ref_grads[name]), name
    assert sum(not torch.equal(grads[n], ref_grads[n]) for n in depthwise) < len(depthwise)


def test_the_bf16_backward_runs_only_where_it_should():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                          Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),  # a bias: left alone
                          nn.Conv2d(8, 8, 1, bias=False),  # not depthwise: left alone
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False, padding_mode="reflect"),  # alone too
                          nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False))  # string padding: alone too
    assert use_fast_depthwise_backward(model) == 2
    assert [type(m) for m in model] == [DepthwiseConv2d, DepthwiseConv2dSame] + [nn.Conv2d] * 4
    x = torch.randn(2, 8, 9, 9, requires_grad=True)

    def uses_fast_backward(out):
        return type(out.grad_fn).__name__ == "_Bf16DepthwiseConvBackward"

    with torch.autocast(**BF16):
        assert uses_fast_backward(model[0](x)) and uses_fast_backward(model[1](x))
        with torch.no_grad():
            assert model[0](x).dtype == torch.bfloat16
    assert not uses_fast_backward(model[0](x))  # fp32: the plain convolution
    assert uses_fast_backward(model[0].to(torch.bfloat16)(x.detach().bfloat16().requires_grad_()))  # a bf16 model
    # the same values as the layers they replace, padding included (timm's "same" padding at stride 2 on 9 x 9)
    reference = Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False)
    reference.weight = model[1].weight
    with torch.autocast(**BF16):
        assert torch.equal(model[1](x), reference(x))
    assert model[1](x).shape == (2, 8, 5, 5)
