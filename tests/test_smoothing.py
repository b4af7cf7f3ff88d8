"""bnlib.lab.experiments.smoothing: the smoothing chapter's MLP, learning-rate sweeps, scale-invariant weights."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnlib.lab import training
from bnlib.lab.experiments import noisy, smoothing


def batch(seed: int = 0, n: int = 64, d: int = 20, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


SIZES = (20, 16, 16, 3)


def test_mlp_kinds_and_determinism():
    a, b = smoothing.smoothing_mlp("bn", 3, SIZES), smoothing.smoothing_mlp("bn", 3, SIZES)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert sum(isinstance(m, nn.BatchNorm1d) for m in a) == 2
    plain = smoothing.smoothing_mlp("plain", 3, SIZES)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain)
    # He initialization: weight variance 2 / fan_in (tolerance: a 16 x 20 sample)
    assert abs(float(plain[0].weight.detach().var()) * 20 / 2 - 1) < 0.3
    lp = smoothing.smoothing_mlp("linf", 0, SIZES)
    assert sum(isinstance(m, noisy.LpBatchNorm) for m in lp.modules()) == 2
    loud = smoothing.smoothing_mlp("noisy", 0, SIZES, noise=dict(shift=1.0, scale=(0.5, 2.0)))
    assert sum(isinstance(m, noisy.NoisyBN) for m in loud.modules()) == 2
    with pytest.raises(ValueError):
        smoothing.smoothing_mlp("unknown", 0, SIZES)


def test_largest_stable_lr_stops_at_the_first_unstable_rate():
    ok, bad = np.array([2.0, 1.0, 0.5]), np.array([2.0, 3.0, np.nan])
    slow = np.array([2.0, 1.8, 1.5])  # finite, lower, but not halved
    assert smoothing.largest_stable_lr({0.1: ok, 1.0: ok, 10.0: bad}, last=1) == 1.0
    # a stable rate above an unstable one does not count
    assert smoothing.largest_stable_lr({0.1: ok, 1.0: bad, 10.0: ok}, last=1) == 0.1
    assert smoothing.largest_stable_lr({0.1: bad}, last=1) == 0.0
    assert smoothing.largest_stable_lr({0.1: ok, 1.0: slow}, last=1, below=0.5) == 0.1
    assert smoothing.largest_stable_lr({0.1: ok, 1.0: slow}, last=1) == 1.0


def test_loss_sweep_diverges_at_a_huge_rate_on_a_plain_net_only():
    x, y = batch(n=256)
    lrs = [0.05, 1e3]
    plain = smoothing.loss_sweep(lambda: smoothing.smoothing_mlp("plain", 0, SIZES), x, y, lrs, 20)
    bn = smoothing.loss_sweep(lambda: smoothing.smoothing_mlp("bn", 0, SIZES), x, y, lrs, 20)
    assert len(plain[0.05]) == 20
    assert smoothing.largest_stable_lr(plain) == 0.05
    assert all(np.isfinite(bn[1e3]))  # BN's hidden weights are scale-invariant: no blow-up there


def test_value_at_loss_picks_the_first_step_at_the_level():
    hist = training.History(train_loss=np.linspace(2.0, 0.0, 101))  # loss of update s: 2 - 0.02 (s - 1)
    for step in (0, 20, 40, 60):
        hist.add(step, {"beta": float(step)})
    # updates 21..40 average 2 - 0.02 * 29.5 = 1.41 <= 1.5; updates 1..20 average 1.81
    assert smoothing.value_at_loss(hist, "beta", 1.5) == 40.0
    assert math.isnan(smoothing.value_at_loss(hist, "beta", -1.0))


def test_gradient_of_scale_invariant_weights_is_orthogonal_and_rescaling_keeps_the_loss():
    net = smoothing.smoothing_mlp("bn", 1, SIZES)
    x, y = batch(1)
    names = smoothing.scale_invariant_linears(net)
    assert names == ["0.weight", "3.weight"]  # the output layer feeds no BN
    eta = 0.5
    angles = smoothing.turning_angles(net, x, y, eta)
    for v in angles.values():
        assert abs(v["cos"]) < 1e-4  # eps = 1e-5 breaks the invariance only slightly
        assert v["angle"] == pytest.approx(math.degrees(math.atan(v["relative_step"])))
    big = smoothing.rescaled_copy(net, {n: 10 * float(dict(net.named_parameters())[n].norm()) for n in names})
    net.train(), big.train()
    with torch.no_grad():
        assert torch.allclose(net(x), big(x), atol=1e-4)
    rescaled = smoothing.turning_angles(big, x, y, eta)
    for n in names:  # the gradient is divided by 10 and the weight multiplied by 10
        assert rescaled[n]["relative_step"] == pytest.approx(angles[n]["relative_step"] / 100, rel=1e-3)
    with pytest.raises(ValueError):
        smoothing.rescaled_copy(net, {"6.weight": 1.0})


def test_plain_weights_are_not_orthogonal_to_their_gradient():
    net = smoothing.smoothing_mlp("plain", 1, SIZES)
    x, y = batch(1)
    assert smoothing.scale_invariant_linears(net) == []
    steps = smoothing.turning_angles(net, x, y, 0.1, names=["0.weight", "2.weight"])
    assert max(abs(v["cos"]) for v in steps.values()) > 1e-2


def test_lp_to_std():
    g = torch.randn(64, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(smoothing.lp_to_std(g, 2.0), torch.ones(2000, dtype=torch.float64))
    l1 = smoothing.lp_to_std(g, 1.0)
    assert abs(float(l1.mean()) - math.sqrt(2 / math.pi)) < 0.01  # Gaussian: E|x| = sqrt(2/pi) sigma
    assert float(l1.max()) <= 1.0 + 1e-12  # l1 deviation <= l2 deviation (Jensen)
    assert float(smoothing.lp_to_std(g, math.inf).min()) >= 1.0 - 1e-12  # max >= rms
