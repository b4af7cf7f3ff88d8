"""bnlib.norm.functional.batch_norm against torch.nn.functional.batch_norm: values, gradients, running statistics,
what backward keeps. The layers are compared with torch.nn's in tests/test_dropin.py (one table); bad input and hard
numerics are in tests/test_robustness.py."""

import pytest
import torch

from bnlib.norm import functional as F

torch.set_num_threads(1)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (4, 3, 2, 3)])
def test_gradcheck_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (x, w, b))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(16, 4), (16, 4, 7), (6, 4, 5, 5)])
def test_functional_matches_torch(shape, training):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    ours = F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
    dy = torch.randn(shape)
    grads = torch.autograd.grad(ours, (x, w, b), dy)
    theirs = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
    grads_t = torch.autograd.grad(theirs, (x, w, b), dy)
    _close(ours, theirs)
    for g1, g2 in zip(grads, grads_t):
        _close(g1, g2, 1e-4)
    _close(rm, rm2)
    _close(rv, rv2)


def test_saves_one_input_sized_tensor_for_backward():
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.batch_norm(x, None, None, w, b, training=True)
    assert sum(s == x.numel() for s in sizes) == 1
    assert sum(sizes) <= x.numel() + 3 * 4


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False), "running_mean and running_var"),
        (lambda: F.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, eps=-1.0, training=True), "eps"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0, training=False), "eps"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    """(Bad input, the same for torch and for the layers, is in tests/test_robustness.py.)"""
    with pytest.raises(ValueError, match=message):
        call()
