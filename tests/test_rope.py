import pytest
import torch
from torchtune.models.llama3_1 import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings

from medcap.models.rope import _TABLES, rotate


def ropes(head_dim: int):
    return [RotaryPositionalEmbeddings(head_dim, max_seq_len=64, base=10_000),
            Llama3ScaledRoPE(head_dim, max_seq_len=64, base=500_000)]


@pytest.mark.parametrize("head_dim", [2, 6, 10, 64, 128])  # 1, 3, 5 pairs: vector kernels' scalar tails
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [False, True])
def test_rotate_is_torchtunes_rope_bit_for_bit_forward_and_backward(head_dim, dtype, positions):
    torch.manual_seed(head_dim)
    for rope in ropes(head_dim):
        # a slice of a wider projection, as the fused q / k / v product gives it, with values over many scales
        wide = (torch.randn(3, 7, 5, head_dim) * 10.0 ** torch.randint(-3, 4, (3, 7, 5, 1))).to(dtype)
        x = wide[:, :, :4]
        input_pos = torch.randint(0, 64, (3, 7)) if positions else None
        expected, got = rope(x, input_pos=input_pos), rotate(rope, x, input_pos)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected), type(rope).__name__
        leaf_a, leaf_b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        grad = torch.randn(x.shape).to(dtype)
        (g_expected,) = torch.autograd.grad(rope(leaf_a, input_pos=input_pos), leaf_a, grad)
        (g_got,) = torch.autograd.grad(rotate(rope, leaf_b, input_pos), leaf_b, grad)
        assert torch.equal(g_got, g_expected)


def test_the_tables_are_shared_by_one_positions_tensor_and_rebuilt_for_another():
    rope = RotaryPositionalEmbeddings(8, max_seq_len=32)
    x = torch.randn(2, 3, 4, 8)
    first = torch.tensor([[0, 1, 2], [5, 6, 7]])
    rotate(rope, x, first)
    tables = _TABLES[rope]
    assert torch.equal(rotate(rope, x[:, :, :2], first), rope(x[:, :, :2], input_pos=first))
    assert _TABLES[rope] is tables  # the next layer of the same pass: reused
    second = first + 3  # other positions, maybe at the freed address of the first
    del first
    assert torch.equal(rotate(rope, x, second), rope(x, input_pos=second))
    assert _TABLES[rope] is not tables
    second[0, 0] = 9  # changed in place: its version moved
    assert torch.equal(rotate(rope, x, second), rope(x, input_pos=second))
    with torch.inference_mode():  # inference tensors keep no version: positions told apart by identity
        a, b = torch.tensor([[1, 2, 3]] * 2), torch.tensor([[4, 5, 6]] * 2)
        assert torch.equal(rotate(rope, x, a), rope(x, input_pos=a))
        assert torch.equal(rotate(rope, x, b), rope(x, input_pos=b))
    assert torch.equal(rotate(rope, x, None), rope(x))
    assert torch.equal(rotate(rope, x[:, :2], None), rope(x[:, :2]))  # another length
    rope.base = 500.0
    rope.rope_init()  # a new cache: the tables follow it
    assert torch.equal(rotate(rope, x, None), rope(x))


def test_other_position_embeddings_and_compiled_code_call_the_module():
    class Shifted(RotaryPositionalEmbeddings):  # a subclass may change the formula: not assumed
        def forward(self, x, *, input_pos=None):
            return x + 1

    x = torch.randn(1, 2, 2, 8)
    assert torch.equal(rotate(Shifted(8), x), x + 1)
    rope = RotaryPositionalEmbeddings(8, max_seq_len=16)
    compiled = torch.compile(lambda t: rotate(rope, t), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), rope(x))


def test_tables_made_under_inference_mode_are_not_reused_for_training():
    rope = RotaryPositionalEmbeddings(8, max_seq_len=16)
    x = torch.randn(2, 4, 3, 8)
    with torch.inference_mode():
        rotate(rope, x)
    leaf = x.clone().requires_grad_()
    rotate(rope, leaf).sum().backward()  # would fail saving an inference tensor for backward
    assert leaf.grad is not None


def test_an_input_with_odd_strides_is_rotated_too():
    rope = RotaryPositionalEmbeddings(8, max_seq_len=16)
    base = torch.randn(2 * 4 * 3 * 8 + 1)
    x = base[1:].view(2, 4, 3, 8)  # an odd storage offset
    assert torch.equal(rotate(rope, x), rope(x))
    y = torch.randn(8, 3, 4, 2).permute(3, 2, 1, 0)  # nothing contiguous
    assert torch.equal(rotate(rope, y), rope(y))
