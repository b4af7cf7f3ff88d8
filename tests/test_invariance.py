"""bnlib.lab.invariance: the scale-invariance identities, norm growth, weight decay as an exponential learning rate."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.lab import invariance as inv
from bnlib.lab import models

BN0 = inv.ExactBatchNorm1d


def _net(seed=0, norm=BN0, sizes=(12, 8, 8, 3)):
    return models.mlp(list(sizes), "relu", norm, generator=torch.Generator().manual_seed(seed)).double()


def _data(seed=0, n=32, d=12, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def _loss_and_grads(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), [w.grad.clone() for _, w in inv.invariant_weights(model)]


def test_invariant_weights_finds_linear_before_bn_only():
    m = _net()
    assert [n for n, _ in inv.invariant_weights(m)] == ["0.weight", "3.weight"]
    assert [n for n, _ in inv.non_invariant_parameters(m)] == [
        "1.weight",
        "1.bias",
        "4.weight",
        "4.bias",
        "6.weight",
        "6.bias",
    ]
    assert inv.invariant_weights(models.mlp([4, 3, 2])) == []
    cnn = models.small_cnn(norm=nn.BatchNorm2d, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in inv.invariant_weights(cnn)] == ["0.weight", "4.weight"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2)), nn.Linear(2, 1))
    assert [n for n, _ in inv.invariant_weights(nested)] == ["0.0.weight"]


@pytest.mark.parametrize("a", [1e-3, 0.5, 7.0, 1e3])
def test_loss_is_invariant_and_gradient_scales_by_one_over_a(a):
    x, y = _data()
    loss, grads = _loss_and_grads(_net(), x, y)
    scaled = inv.scale_invariant_(_net(), a)
    loss_a, grads_a = _loss_and_grads(scaled, x, y)
    assert abs(loss_a - loss) < 1e-12
    for g, g_a in zip(grads, grads_a):
        torch.testing.assert_close(g_a * a, g, rtol=1e-10, atol=1e-14)


def test_gradient_is_orthogonal_to_each_row():
    x, y = _data()
    m = _net()
    _, grads = _loss_and_grads(m, x, y)
    for g, (_, w) in zip(grads, inv.invariant_weights(m)):
        assert inv.radial_cosine(g, w.detach()).abs().max() < 1e-12
    # gamma and the last layer are not scale-invariant: their gradients have a radial part
    last = m[-1].weight
    assert inv.radial_cosine(last.grad, last.detach()).abs().max() > 1e-3


def test_eps_breaks_invariance_for_small_weights():
    x, y = _data()
    norm = functools.partial(bnlib.BatchNorm1d, eps=1e-5)
    loss = _loss_and_grads(_net(norm=norm), x, y)[0]
    big = _loss_and_grads(inv.scale_invariant_(_net(norm=norm), 10.0), x, y)[0]
    tiny = _loss_and_grads(inv.scale_invariant_(_net(norm=norm), 1e-4), x, y)[0]
    assert abs(big - loss) < 1e-4 < abs(tiny - loss)


def test_norm_growth_of_one_gradient_step_is_exact():
    x, y = _data()
    m = _net()
    _, grads = _loss_and_grads(m, x, y)
    lr = 0.7
    for g, (_, w) in zip(grads, inv.invariant_weights(m)):
        predicted = inv.predicted_sq_norm(w.detach(), g, lr)
        after = inv.row_norms(w.detach() - lr * g) ** 2
        torch.testing.assert_close(after, predicted, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(inv.effective_lr(lr, w.detach()), lr / inv.row_norms(w.detach()) ** 2)


def _sgd_run(model, x, y, steps, lr_inv, lr_other, wd=0.0, factor=None):
    groups = [
        {"params": [p for _, p in inv.invariant_weights(model)], "lr": lr_inv, "weight_decay": wd},
        {"params": [p for _, p in inv.non_invariant_parameters(model)], "lr": lr_other},
    ]
    opt = torch.optim.SGD(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor, lambda t: 1.0]) if factor else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        losses.append(float(loss.detach()))
    return np.array(losses)


def test_scaled_start_with_scaled_lr_gives_the_same_trajectory():
    x, y = _data()
    base, scaled, c = _net(), inv.scale_invariant_(_net(), 5.0), 5.0
    l0 = _sgd_run(base, x, y, 30, 0.2, 0.2)
    l1 = _sgd_run(scaled, x, y, 30, c * c * 0.2, 0.2)
    np.testing.assert_allclose(l1, l0, rtol=1e-11)
    for (_, w0), (_, w1) in zip(inv.invariant_weights(base), inv.invariant_weights(scaled)):
        torch.testing.assert_close(w1 / c, w0, rtol=1e-10, atol=1e-13)


def test_weight_decay_equals_exponential_learning_rate():
    x, y = _data()
    lr, wd, steps = 0.3, 0.05, 40
    decayed, grown = _net(), _net()
    l0 = _sgd_run(decayed, x, y, steps, lr, lr, wd)
    l1 = _sgd_run(grown, x, y, steps, lr, lr, factor=inv.exponential_lr_factor(lr, wd))
    np.testing.assert_allclose(l1, l0, rtol=1e-10)
    shrink = (1 - lr * wd) ** steps
    for (_, w0), (_, w1) in zip(inv.invariant_weights(decayed), inv.invariant_weights(grown)):
        torch.testing.assert_close(w1 * shrink, w0, rtol=1e-9, atol=1e-12)


def test_exponential_lr_values_and_factor_agree():
    rates = inv.exponential_lr(0.1, 0.01, 4)
    f = inv.exponential_lr_factor(0.1, 0.01)
    np.testing.assert_allclose(rates, [0.1 * f(t) for t in range(4)])
    np.testing.assert_allclose(rates[0], 0.1 / 0.999)
    assert inv.exponential_lr(0.1, 0.0, 3).tolist() == [0.1] * 3
    with pytest.raises(ValueError, match="lr \\* wd < 1"):
        inv.exponential_lr(1.0, 2.0, 3)
    with pytest.raises(ValueError, match="steps"):
        inv.exponential_lr(0.1, 0.1, -1)


def test_angular_update_is_accurate_for_tiny_angles():
    theta = 1e-9
    u = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64) * 3.0
    assert abs(float(inv.angular_update(u, v)[0]) - theta) < 1e-20
    assert abs(float(inv.angular_update(u, -u)[0]) - math.pi) < 1e-12
    with pytest.raises(ValueError, match="shapes"):
        inv.angular_update(u, torch.zeros(3))


def test_equilibrium_angle_solves_the_norm_balance():
    lr, wd = 0.5, 0.01
    exact = inv.equilibrium_angular_update(lr, wd, exact=True)
    # a step (1 - lr wd) w - lr g with g orthogonal to w that keeps |w| = 1 turns by exactly this angle
    g = math.sqrt(2 * lr * wd - (lr * wd) ** 2) / lr
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w_next = torch.tensor([[1 - lr * wd, -lr * g]], dtype=torch.float64)
    assert abs(float(inv.row_norms(w_next)[0]) - 1.0) < 1e-15
    assert abs(float(inv.angular_update(w, w_next)[0]) - exact) < 1e-15
    assert abs(inv.equilibrium_angular_update(lr, wd) - 0.1) < 1e-15
    assert abs(exact - 0.1) < 1e-3
    assert inv.equilibrium_angular_update(0.1, 0.0) == 0.0


def test_bad_input():
    w = torch.ones(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        inv.radial_cosine(torch.ones(3, 2), w)
    with pytest.raises(ValueError, match="same shape"):
        inv.predicted_sq_norm(w, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        inv.effective_lr(0.0, w)
    with pytest.raises(ValueError, match="factor must be positive"):
        inv.scale_invariant_(_net(), 0.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        inv.row_norms(torch.tensor(1.0))
    with pytest.raises(ValueError, match="lr > 0"):
        inv.exponential_lr_factor(-0.1, 0.1)
