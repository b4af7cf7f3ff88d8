"""bnlib.norm.functional and bnlib's modules against torch.nn: values, gradients, running statistics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlib
from bnlib.norm import functional as F

torch.set_num_threads(1)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (4, 3, 5, 6)])
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


@pytest.mark.parametrize(
    "ours_cls, theirs_cls, shape",
    [
        (bnlib.BatchNorm1d, torch.nn.BatchNorm1d, (12, 5)),
        (bnlib.BatchNorm1d, torch.nn.BatchNorm1d, (12, 5, 3)),
        (bnlib.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 3)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_training_steps_match_torch(ours_cls, theirs_cls, shape, momentum):
    torch.manual_seed(0)
    ours, theirs = ours_cls(5, momentum=momentum), theirs_cls(5, momentum=momentum)
    opt1 = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(shape) * (step + 1) + step
        for m, opt in ((ours, opt1), (theirs, opt2)):
            opt.zero_grad()
            (m(x) ** 3).mean().backward()
            opt.step()
    for name in ["weight", "bias", "running_mean", "running_var"]:
        _close(getattr(ours, name), getattr(theirs, name))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 5
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    _close(ours(x), theirs(x))


def test_state_dicts_load_both_ways():
    torch.manual_seed(0)
    ours, theirs = bnlib.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2) + 1)
    theirs.load_state_dict(ours.state_dict())
    back = bnlib.BatchNorm2d(3)
    back.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


@pytest.mark.parametrize("affine, track", [(False, True), (True, False), (False, False)])
def test_options_match_torch(affine, track):
    torch.manual_seed(0)
    ours = bnlib.BatchNorm1d(4, affine=affine, track_running_stats=track)
    theirs = torch.nn.BatchNorm1d(4, affine=affine, track_running_stats=track)
    x = torch.randn(10, 4) * 2 + 1
    _close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    _close(ours(x), theirs(x))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert repr(ours) == repr(theirs)


def test_channels_last_and_non_contiguous_give_same_result():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6)
    base = F.batch_norm(x, None, None, training=True)
    cl = F.batch_norm(x.to(memory_format=torch.channels_last), None, None, training=True)
    nc = F.batch_norm(x.transpose(2, 3).contiguous().transpose(2, 3), None, None, training=True)
    _close(cl, base, 1e-6)
    _close(nc, base, 1e-6)
    assert cl.is_contiguous(memory_format=torch.channels_last)


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


def test_double_backward_is_a_clear_error():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        g.sum().backward()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 4),
    hw=st.integers(1, 4),
    scale=st.floats(1e-2, 1e2),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_float64_reference(n, c, hw, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64) * scale + offset
    x = x64.float()
    ours = F.batch_norm(x, None, None, training=True)
    exact, _ = bnlib.norm.reference.spatial_batchnorm_forward(x.double().numpy(), [1.0] * c, [0.0] * c)
    # float32 rounding of the input itself limits what any implementation can get (|offset|/scale)
    tol = 1e-4 * (1 + abs(offset) / scale)
    torch.testing.assert_close(ours.double(), torch.from_numpy(exact), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bnlib.BatchNorm2d(3)(torch.randn(4, 3)), "expected 4D input \\(got 2D input\\)"),
        (lambda: bnlib.BatchNorm1d(3)(torch.randn(4, 3, 2, 2)), "expected 2D or 3D input"),
        (lambda: bnlib.BatchNorm1d(3)(torch.randn(4, 5)), "expected 3 channels"),
        (lambda: bnlib.BatchNorm1d(3)(torch.randn(1, 3)), "more than 1 value per channel"),
        (lambda: bnlib.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)), "more than 1 value per channel"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False), "running_mean and running_var"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), training=True), "weight must have shape"),
        (lambda: F.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, eps=-1.0, training=True), "eps"),
        (lambda: F.batch_norm(torch.randn(4), None, None, training=True), "at least 2 dimensions"),
        (lambda: bnlib.BatchNorm1d(0), "num_features"),
        (lambda: bnlib.BatchNorm1d(3, momentum=2.0), "momentum"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_single_example_with_spatial_extent_is_legal():
    x = torch.randn(1, 3, 4, 4)
    _close(bnlib.BatchNorm2d(3)(x), torch.nn.BatchNorm2d(3)(x))


def test_affine_without_bias_matches_torch():
    ours, theirs = bnlib.BatchNorm1d(4, bias=False), torch.nn.BatchNorm1d(4, bias=False)
    assert ours.bias is None and theirs.bias is None and repr(ours) == repr(theirs)
    x = torch.randn(6, 4)
    _close(ours(x), theirs(x))
