"""bnlib.lab.experiments.noisy: noisy BN and l_p-normalized BN."""

import math

import pytest
import torch

import bnlib
from bnlib.lab import models
from bnlib.lab.experiments import noisy


def test_noisy_bn_is_plain_bn_in_eval_mode_and_reproducible():
    bn = bnlib.BatchNorm1d(4)
    layer = noisy.NoisyBN(bn, shift=1.0, scale=(0.5, 2.0), jitter=0.1, seed=3)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    layer.eval()
    torch.testing.assert_close(layer(x), bn(x))
    layer.train()
    a = layer(x)
    again = noisy.NoisyBN(bnlib.BatchNorm1d(4), seed=3)
    torch.testing.assert_close(again(x), a)
    assert not torch.allclose(layer(x), a)  # a new step, a new noise distribution


def test_noisy_bn_noise_has_the_promised_distribution():
    torch.manual_seed(0)
    layer = noisy.NoisyBN(bnlib.BatchNorm1d(200, affine=False), shift=1.0, scale=(0.5, 2.0), jitter=0.0, seed=1)
    x = torch.randn(64, 200)
    means, stds = [], []
    for _ in range(20):
        out = layer(x)
        means.append(out.mean(0))
        stds.append(out.std(0, unbiased=False))
    means, stds = torch.stack(means), torch.stack(stds)
    # with no jitter a unit's batch mean is the step's shift and its std the step's scale
    assert float(means.abs().max()) <= 1.0 + 1e-4
    assert float(stds.min()) >= 0.5 - 1e-4 and float(stds.max()) <= 2.0 + 1e-4
    # non-zero mean, non-unit variance, changing from step to step
    assert float(means.std(0).mean()) > 0.4
    assert float(stds.std(0).mean()) > 0.2


def test_noisy_bn_passes_gradients_and_handles_images():
    layer = noisy.NoisyBN(bnlib.BatchNorm2d(3), seed=0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bn.weight.grad is not None


def test_add_noise_wraps_every_bn_layer():
    net = models.mlp([5, 8, 8, 3], "relu", bnlib.BatchNorm1d)
    noisy.add_noise(net, seed=10)
    wrapped = [m for m in net.modules() if isinstance(m, noisy.NoisyBN)]
    assert len(wrapped) == 2
    assert "jitter" in repr(net)
    net(torch.randn(8, 5)).sum().backward()
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        noisy.add_noise(models.mlp([5, 8, 3], "relu"))


def test_noisy_bn_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale"):
        noisy.NoisyBN(bnlib.BatchNorm1d(2), scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        noisy.NoisyBN(bnlib.BatchNorm1d(2), shift=-1.0)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_batch_norm_normalizes_by_the_lp_deviation(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) * 3 + 2
    layer = noisy.LpBatchNorm(3, p=p, eps=0.0).double()
    out = layer(x)
    dev = (x - x.mean(0)).abs()
    scale = {1: dev.mean(0), 2: dev.pow(2).mean(0).sqrt(), math.inf: dev.amax(0)}[p]
    torch.testing.assert_close(out, (x - x.mean(0)) / scale)
    if p == 2:  # the standard deviation: BN at eps = 0
        torch.testing.assert_close(out, bnlib.norm.functional.batch_norm(x, None, None, training=True, eps=0.0))
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(0))
    layer.eval()
    assert layer(x).shape == x.shape


def test_lp_batch_norm_trains_in_a_network_and_rejects_bad_input():
    net = models.mlp([5, 8, 3], "relu", lambda c: noisy.LpBatchNorm(c, p=1))
    net(torch.randn(8, 5)).sum().backward()
    assert net[1].weight.grad is not None
    with pytest.raises(ValueError, match="p must be"):
        noisy.LpBatchNorm(3, p=3)
    with pytest.raises(ValueError, match="expected input"):
        noisy.LpBatchNorm(3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="more than 1 value"):
        noisy.LpBatchNorm(3)(torch.randn(1, 3))


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_batch_norm_on_feature_maps_uses_every_position_of_a_channel(p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    layer = noisy.LpBatchNorm(3, p=p, eps=0.0).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    flat = x.transpose(0, 1).reshape(3, -1)  # one row per channel: N * H * W values
    dev = (flat - flat.mean(1, keepdim=True)).abs()
    scale = {1: dev.mean(1), 2: dev.pow(2).mean(1).sqrt(), math.inf: dev.amax(1)}[p]
    c = lambda v: v.view(1, 3, 1, 1)  # noqa: E731  (per channel)
    expected = (x - c(flat.mean(1))) / c(scale) * c(layer.weight) + c(layer.bias)
    torch.testing.assert_close(layer(x), expected.detach())
    torch.testing.assert_close(layer.running_scale, 0.9 + 0.1 * scale)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (xr,))
