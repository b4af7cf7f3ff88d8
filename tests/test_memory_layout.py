"""bnlib.BatchNorm2d does not depend on the memory layout of its input (moved from the chapter on
per-channel statistics): channels-last, strided and transposed inputs give the outputs, input
gradients and running statistics of the contiguous input, match torch.nn.BatchNorm2d, and a
channels-last input gives a channels-last output, as torch's layer does."""

import pytest
import torch
from torch import nn

import bnlib

N, C, H, W = 16, 3, 6, 5

LAYOUTS = {
    "channels last": lambda x: x.contiguous(memory_format=torch.channels_last),
    # every other column of a wider tensor: a non-contiguous view with the same values
    "strided view": lambda x: torch.zeros(N, C, H, 2 * W).index_copy(3, torch.arange(0, 2 * W, 2), x)[..., ::2],
    "transposed twice": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
}


def inputs():
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([1.0, 3.0, 0.5]), torch.tensor([0.0, 2.0, -1.0])
    x = torch.randn(N, C, H, W, generator=g) * scale.view(1, C, 1, 1) + shift.view(1, C, 1, 1)
    return x, torch.randn(N, C, H, W, generator=g)


def forward_backward(layer, x, dy):
    x = x.detach().requires_grad_()
    out = layer(x)
    return out, torch.autograd.grad(out, x, dy)[0], layer


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_norm_2d_gives_the_same_numbers_whatever_the_layout(layout):
    x, dy = inputs()
    inp = LAYOUTS[layout](x)
    assert torch.equal(inp, x) and not inp.is_contiguous()
    ref_out, ref_grad, ref = forward_backward(bnlib.BatchNorm2d(C), x, dy)
    out, grad, layer = forward_backward(bnlib.BatchNorm2d(C), inp, dy)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=1e-6)
    torch_out, torch_grad, _ = forward_backward(nn.BatchNorm2d(C), inp, dy)
    torch.testing.assert_close(out, torch_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, torch_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_input_gives_channels_last_output_as_torch(training):
    x, _ = inputs()
    inp = LAYOUTS["channels last"](x)
    ours, theirs = bnlib.BatchNorm2d(C).train(training), nn.BatchNorm2d(C).train(training)
    with torch.no_grad():
        out = ours(inp)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last) == theirs(inp).is_contiguous(
            memory_format=torch.channels_last
        )
