"""bnlib.norm.population: momentum conventions, PreciseBN (Algorithm 2), freezing, batch-statistics evaluation."""

import copy
import math

import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import models
from bnlib.norm import population as P

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "value, source, target, expected",
    [
        (0.99, "keras", "pytorch", 0.01),
        (0.9, "cs231n", "pytorch", 0.1),
        (0.1, "pytorch", "cs231n", 0.9),
        (0.9, "cs231n", "keras", 0.9),
        (0.3, "pytorch", "pytorch", 0.3),
    ],
)
def test_convert_momentum(value, source, target, expected):
    assert P.convert_momentum(value, source, target) == pytest.approx(expected)


def test_convert_momentum_errors():
    with pytest.raises(ValueError, match="unknown convention"):
        P.convert_momentum(0.1, "tensorflow1", "pytorch")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.convert_momentum(1.5, "pytorch", "keras")


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, bnlib.BatchNorm1d])
def test_ema_reproduces_running_mean_in_every_convention(cls):
    g = torch.Generator().manual_seed(0)
    bn = cls(3, momentum=0.2)
    xs = [torch.randn(8, 3, generator=g) * 2 + 1 for _ in range(6)]
    for x in xs:
        bn(x)
    means = [x.mean(0) for x in xs]
    torch.testing.assert_close(P.ema(means, 0.2, "pytorch"), bn.running_mean)
    torch.testing.assert_close(P.ema(means, 0.8, "keras"), bn.running_mean)
    torch.testing.assert_close(P.ema([x.var(0) for x in xs], 0.8, "cs231n", start=1.0), bn.running_var)


def test_half_life():
    assert P.half_life(0.5) == pytest.approx(1.0)
    assert P.half_life(0.99, "keras") == pytest.approx(math.log(2) / -math.log(0.99))
    assert P.half_life(0.0) == math.inf
    assert P.half_life(1.0) == 0.0


def _cnn(seed=0, norm=bnlib.BatchNorm2d):
    g = torch.Generator().manual_seed(seed)
    return models.small_cnn(channels=(4, 6), image_size=8, norm=norm, generator=g)


@pytest.mark.parametrize("norm", [bnlib.BatchNorm2d, nn.BatchNorm2d])
def test_recompute_statistics_is_algorithm_2(norm):
    net = _cnn(norm=norm)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(10, 1, 8, 8, generator=g) + 0.5 for _ in range(4)]
    first_conv = net[0]
    net.train()  # modes are restored afterwards
    used = P.recompute_statistics(net, batches)
    assert used == 4 and net.training and all(m.training for m in net.modules())
    bn = net[1]
    assert bn.momentum == 0.1  # restored
    with torch.no_grad():
        z = [first_conv(x) for x in batches]
    m = z[0].numel() // z[0].shape[1]
    mean = torch.stack([zi.mean((0, 2, 3)) for zi in z]).mean(0)
    var = torch.stack([zi.var((0, 2, 3), correction=0) for zi in z]).mean(0) * m / (m - 1)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)


def test_recompute_statistics_leaves_parameters_and_accepts_pairs():
    net = _cnn()
    before = {k: v.clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(6, 1, 8, 8, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(5)]
    net.eval()
    assert P.recompute_statistics(net, pairs, num_batches=3) == 3
    assert not net.training
    for k, v in net.named_parameters():
        assert torch.equal(v, before[k]), k
    assert int(net[1].num_batches_tracked) == 3


def test_recompute_statistics_errors_restore_state():
    net = _cnn()
    saved = net[1].running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        P.recompute_statistics(net, [])
    assert torch.equal(net[1].running_mean, saved)
    with pytest.raises(ValueError, match="no BatchNorm"):
        P.recompute_statistics(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="track_running_stats"):
        P.recompute_statistics(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)])


def test_freeze_batch_norm():
    net = _cnn()
    P.freeze_batch_norm(net.train())
    bns = P.batch_norm_layers(net)
    assert len(bns) == 2 and not any(bn.training for bn in bns)
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    saved = bns[0].running_mean.clone()
    net(torch.randn(8, 1, 8, 8) + 3)
    assert torch.equal(bns[0].running_mean, saved)
    net.train()  # the documented trap: train() switches them back
    assert all(bn.training for bn in bns)


@pytest.mark.parametrize("norm", [bnlib.BatchNorm2d, nn.BatchNorm2d])
def test_evaluate_with_batch_statistics(norm):
    net = _cnn(norm=norm).eval()
    x = torch.randn(12, 1, 8, 8)
    saved = [b.clone() for b in net.buffers()]
    out = P.evaluate_with_batch_statistics(net, x, 4)
    for b, s in zip(net.buffers(), saved):
        assert torch.equal(b, s)  # running statistics untouched
    assert not net.training
    probe = _cnn(norm=norm).train()  # the same weights: groups fed one at a time in training mode
    with torch.no_grad():
        expected = torch.cat([probe(c) for c in x.split(4)])
        one_by_one = torch.cat([probe(c) for c in x.split(1)])  # a conv layer has H*W values per channel
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(P.evaluate_with_batch_statistics(net, x, 1), one_by_one)
    torch.testing.assert_close(P.evaluate_with_batch_statistics(net, x, 12), probe(x).detach())
    with pytest.raises(ValueError, match="positive"):
        P.evaluate_with_batch_statistics(net, x, 0)
    with pytest.raises(ValueError, match="multiple"):
        P.evaluate_with_batch_statistics(net, x, 5)


@pytest.mark.parametrize("norm", [bnlib.BatchNorm1d, nn.BatchNorm1d, lambda c: bnlib.BatchNorm1d(c, affine=False)])
def test_evaluate_with_batch_statistics_fully_connected(norm):
    g = torch.Generator().manual_seed(3)
    net = models.mlp([5, 7, 6, 3], norm=norm, generator=g)
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 5, generator=g) * 2 + 1)  # non-trivial running statistics
    net.eval()
    x = torch.randn(9, 5, generator=g)
    probe = copy.deepcopy(net)
    for bn in P.batch_norm_layers(probe):
        bn.train()
    with torch.no_grad():
        expected = torch.cat([probe(c) for c in x.split(3)])
    torch.testing.assert_close(P.evaluate_with_batch_statistics(net, x, 3), expected)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        P.evaluate_with_batch_statistics(net, x, 1)  # one example of a fully connected layer, as in training
