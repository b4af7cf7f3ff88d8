"""bnlib.lab.jacobians: layer-to-layer Jacobians over the batch and per example."""

import copy

import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import jacobians, measure, models

NORMS = [bnlib.BatchNorm1d, nn.BatchNorm1d]


def _net(norm=None, activation="relu", sizes=(6, 5, 4, 3), seed=0):
    net = models.mlp(list(sizes), activation, norm, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial gamma and beta, so that they are in the formulas
        for mod in net.modules():
            if bnlib.norm.modules.is_batch_norm(mod):
                mod.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
                mod.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return net


def _batch(m=7, d=6, seed=0):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _finite_difference_jacobian(f, h, step=1e-6):
    h = h.detach().double()
    cols = []
    for k in range(h.numel()):
        e = torch.zeros(h.numel(), dtype=h.dtype)
        e[k] = step
        e = e.view_as(h)
        cols.append(((f(h + e) - f(h - e)) / (2 * step)).reshape(-1))
    return torch.stack(cols, dim=1)


def test_split_at_cuts_before_each_boundary_and_rebuilds_the_model():
    net = _net(bnlib.BatchNorm1d)
    at_relu = jacobians.split_at(net, nn.ReLU)
    assert [[type(m).__name__ for m in p] for p in at_relu] == [
        ["Linear", "BatchNorm1d"],
        ["ReLU", "Linear", "BatchNorm1d"],
        ["ReLU", "Linear"],
    ]
    at_linear = jacobians.split_at(net, nn.Linear)
    assert [len(p) for p in at_linear] == [3, 3, 1]
    x = _batch()
    with torch.no_grad(), measure.preserved(net, train=False):
        h = x
        for piece in at_relu:
            h = piece(h)
        torch.testing.assert_close(h, net(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no module of type"):
        jacobians.split_at(net, nn.Sigmoid)


@pytest.mark.parametrize("norm", NORMS)
def test_batch_jacobian_is_the_training_mode_derivative_over_the_whole_batch(norm):
    net = _net(norm)
    piece = jacobians.split_at(net, nn.ReLU)[1]  # ReLU -> Linear -> BN
    h = jacobians.piece_inputs(jacobians.split_at(net, nn.ReLU), _batch())[1]
    jac = jacobians.batch_jacobian(piece, h)
    assert jac.shape == (7 * 4, 7 * 5) and jac.dtype == torch.float64
    work = copy.deepcopy(piece).double().train()
    numeric = _finite_difference_jacobian(work, h)
    torch.testing.assert_close(jac, numeric, rtol=0, atol=1e-7)
    # BN couples the examples: the batch sum of every output unit is m * beta, whatever the input
    sums = jac.view(7, 4, -1).sum(0)
    assert sums.abs().max() < 1e-12 * jac.abs().max()


@pytest.mark.parametrize("norm", NORMS)
def test_example_jacobians_hold_the_statistics_at_the_batch_values(norm):
    net = _net(norm)
    piece = jacobians.split_at(net, nn.ReLU)[0]  # Linear -> BN: J_i = diag(gamma / sigma_B) W
    x = _batch()
    jac = jacobians.example_jacobians(piece, x)
    bn = piece[1]
    z = x.double() @ piece[0].weight.double().T
    sigma = torch.sqrt(z.var(0, unbiased=False) + bn.eps)  # the biased batch variance, as in training
    expected = (bn.weight.double() / sigma)[:, None] * piece[0].weight.double()
    assert jac.shape == (7, 5, 6)
    for i in range(7):
        torch.testing.assert_close(jac[i], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_whole_batch_and_per_example_spectra_differ_by_a_low_rank_term_and_interlace(norm):
    net = _net(norm, sizes=(6, 8, 8, 3))
    pieces = jacobians.split_at(net, nn.ReLU)
    h = jacobians.piece_inputs(pieces, _batch(m=9))[1]
    whole = jacobians.batch_jacobian(pieces[1], h)
    per_example = torch.block_diag(*jacobians.example_jacobians(pieces[1], h))
    r = jacobians.coupling_rank(pieces[1])
    assert r == 16
    gap = torch.linalg.svdvals(whole - per_example)
    assert gap[0] > 1e-3  # the path through the statistics is there ...
    assert int((gap > 1e-10 * gap[0]).sum()) <= r  # ... and has rank at most 2 per unit
    s = jacobians.batch_singular_values(pieces[1], h)
    s_f = jacobians.example_singular_values(pieces[1], h)
    torch.testing.assert_close(s_f, torch.linalg.svdvals(per_example), rtol=1e-12, atol=1e-12)
    n, tol = len(s), 1e-10 * float(s[0])
    for k in range(n):
        if k + r < n:
            assert s_f[k + r] <= s[k] + tol
        if k - r >= 0:
            assert s[k] <= s_f[k - r] + tol


def test_without_batch_statistics_the_whole_batch_jacobian_is_block_diagonal():
    net = _net(None, activation="tanh")
    piece = jacobians.split_at(net, nn.Linear)[1]  # Linear -> tanh
    h = jacobians.piece_inputs(jacobians.split_at(net, nn.Linear), _batch())[1]
    whole = jacobians.batch_jacobian(piece, h)
    torch.testing.assert_close(whole, torch.block_diag(*jacobians.example_jacobians(piece, h)), rtol=1e-12, atol=0)
    assert jacobians.coupling_rank(piece) == 0
    torch.testing.assert_close(
        jacobians.batch_singular_values(piece, h), jacobians.example_singular_values(piece, h), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("norm", NORMS)
def test_measurements_leave_the_model_alone(norm):
    net = _net(norm)
    net.eval()
    before = measure.snapshot(net)
    pieces = jacobians.split_at(net, nn.ReLU)
    x = _batch()
    h = jacobians.piece_inputs(pieces, x)
    jacobians.batch_jacobian(pieces[1], h[1])
    jacobians.example_jacobians(pieces[1], h[1])
    jacobians.gradient_norms(net, x, torch.tensor([0, 1, 2, 0, 1, 2, 0]), boundary=nn.ReLU)
    after = measure.snapshot(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and all(not mod.training for mod in net.modules())


@pytest.mark.parametrize("norm", [None, *NORMS])
def test_gradient_norms_are_those_of_a_training_step(norm):
    net = _net(norm)
    x, y = _batch(), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    norms = jacobians.gradient_norms(net, x, y, boundary=nn.ReLU)
    kept = []
    net.train()
    h = x.clone().requires_grad_(True)
    kept.append(h)
    for mod in net:
        if isinstance(mod, nn.ReLU):
            h.retain_grad()
            kept.append(h)
        h = mod(h)
    torch.nn.functional.cross_entropy(h, y).backward()
    torch.testing.assert_close(norms, torch.stack([t.grad.norm() for t in kept]), rtol=1e-6, atol=0)


def test_example_jacobians_need_running_statistics():
    net = models.mlp([6, 5, 3], "relu", lambda c: nn.BatchNorm1d(c, track_running_stats=False))
    piece = jacobians.split_at(net, nn.ReLU)[0]
    with pytest.raises(ValueError, match="running statistics"):
        jacobians.example_jacobians(piece, _batch())


def _bn_with_eps(eps):
    return lambda c: bnlib.BatchNorm1d(c, eps=eps)


@pytest.mark.parametrize("norm", [*NORMS, _bn_with_eps(0.5)])
def test_the_whole_batch_jacobian_is_the_projector_times_the_per_example_one(norm):
    net = _net(norm, sizes=(6, 8, 8, 3))
    pieces = jacobians.split_at(net, nn.ReLU)  # pieces[1] = ReLU -> Linear -> BN
    h = jacobians.piece_inputs(pieces, _batch(m=9))[1]
    whole = jacobians.batch_jacobian(pieces[1], h)
    per_example = torch.block_diag(*jacobians.example_jacobians(pieces[1], h))
    proj = jacobians.statistics_projector(pieces[1], h)
    torch.testing.assert_close(proj @ per_example, whole, rtol=0, atol=1e-12 * float(whole.abs().max()))
    torch.testing.assert_close(proj, proj.T, rtol=0, atol=0)
    eig = torch.linalg.eigvalsh(proj)  # 1 (m - 2 per unit), 0, eps / (var + eps): all in [0, 1]
    assert eig.min() > -1e-12 and eig.max() < 1 + 1e-12
    assert int((eig > 1 - 1e-9).sum()) == 8 * (9 - 2)
    s, s_f = torch.linalg.svdvals(whole), torch.linalg.svdvals(per_example)
    assert bool((s <= s_f + 1e-12 * s_f[0]).all())  # sigma_k(J) <= sigma_k(J_f) for every k
    assert float(s.norm()) < 0.95 * float(s_f.norm())  # and the coupling is there


@pytest.mark.parametrize("norm", [*NORMS, _bn_with_eps(0.5)])
def test_batch_jacobian_norm_is_the_frobenius_norm_of_the_whole_batch_jacobian(norm):
    net = _net(norm, sizes=(6, 8, 8, 3))
    pieces = jacobians.split_at(net, nn.ReLU)
    h = jacobians.piece_inputs(pieces, _batch(m=9))
    for piece, h_in in zip(pieces, h):  # [Linear, BN], [ReLU, Linear, BN], [ReLU, Linear] (no BN)
        direct = torch.linalg.norm(jacobians.batch_jacobian(piece, h_in))
        torch.testing.assert_close(jacobians.batch_jacobian_norm(piece, h_in), direct, rtol=1e-12, atol=0)
    # the per-example norm is not it: the statistics' path takes out about 2 of every m directions
    held = jacobians.example_jacobians(pieces[1], h[1]).norm()
    assert jacobians.batch_jacobian_norm(pieces[1], h[1]) < 0.95 * held


def test_the_structure_needs_the_bn_layer_last():
    net = _net(bnlib.BatchNorm1d)
    piece = jacobians.split_at(net, nn.Linear)[0]  # Linear -> BN -> ReLU
    h = _batch()
    with pytest.raises(ValueError, match="last module"):
        jacobians.batch_jacobian_norm(piece, h)
    with pytest.raises(ValueError, match="last module"):
        jacobians.statistics_projector(piece, h)
    plain = jacobians.split_at(_net(None), nn.ReLU)[1]
    h_plain = jacobians.piece_inputs(jacobians.split_at(_net(None), nn.ReLU), h)[1]
    eye = jacobians.statistics_projector(plain, h_plain)
    torch.testing.assert_close(eye, torch.eye(7 * 4, dtype=torch.float64), rtol=0, atol=0)
