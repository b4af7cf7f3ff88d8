"""bnlib.lab.experiments.conv_statistics: per-position BN, effective sample size, shifts, conv bias."""

import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab.data import Split
from bnlib.lab.experiments import conv_statistics as cs


def roll(z: torch.Tensor) -> torch.Tensor:
    return torch.roll(z, shifts=(1, 2), dims=(2, 3))


def batch(n=16, c=3, h=5, w=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # every position its own scale and offset, so per-position and per-channel statistics differ
    spread, offset = torch.rand(1, c, h, w, generator=g) * 3, torch.randn(1, c, h, w, generator=g)
    return torch.randn(n, c, h, w, generator=g) * spread + offset


def test_per_position_bn_normalizes_every_channel_and_position_over_the_batch_only():
    # in float64, so the comparison does not depend on how a CPU orders a float32 sum
    x = batch().double()
    layer = cs.PerPositionBatchNorm2d(3, 5, 6).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = layer(x)
    mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True, correction=0)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)
    # not per-channel statistics: BatchNorm2d differs on this input
    assert (y - bnlib.BatchNorm2d(3).double()(x)).abs().max() > 0.1
    # running statistics: (1 - 0.1) * start + 0.1 * batch, with the unbiased variance over N
    torch.testing.assert_close(layer.running_mean, 0.1 * mean[0])
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var(0, correction=1))
    layer.eval()
    fixed = (x - layer.running_mean) / torch.sqrt(layer.running_var + 1e-5)
    torch.testing.assert_close(layer(x), fixed * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1))


def test_per_position_bn_cumulative_average_and_gradients():
    layer = cs.PerPositionBatchNorm2d(2, 3, 3, momentum=None)
    xs = [batch(8, 2, 3, 3, seed=s) for s in range(3)]
    for x in xs:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    x = xs[0].clone().requires_grad_()
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and layer.weight.grad.shape == (2,)
    with pytest.raises(ValueError, match="expected"):
        layer(torch.zeros(8, 2, 4, 3))


def test_per_position_bn_breaks_equivariance_in_eval_mode_per_channel_bn_keeps_it():
    x = batch(32, 3, 6, 6)
    per_position, per_channel = cs.PerPositionBatchNorm2d(3, 6, 6, momentum=None), bnlib.BatchNorm2d(3, momentum=None)
    per_position(x), per_channel(x)
    per_position.eval(), per_channel.eval()
    assert cs.equivariance_error(per_channel, x, roll) < 1e-6
    assert cs.equivariance_error(per_position, x, roll) > 0.1


def test_a_common_circular_shift_commutes_with_both_in_training_mode():
    """The ex-conv-batchshift solution: the shifted batch's statistics sit at the shifted positions."""
    x = batch(8, 3, 6, 6)
    for layer in (bnlib.BatchNorm2d(3), cs.PerPositionBatchNorm2d(3, 6, 6)):
        torch.testing.assert_close(layer(roll(x)), roll(layer(x)))


def test_which_per_example_norms_keep_translation_equivariance():
    """The ex-conv-groupnorm solution: the statistics are shift-invariant; a per-element affine is not."""
    x = batch(4, 4, 6, 6)
    g = torch.Generator().manual_seed(1)
    layer_norm = nn.LayerNorm([4, 6, 6])
    group_norm, instance_norm = nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)
    with torch.no_grad():
        for m in (layer_norm, group_norm, instance_norm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    assert cs.equivariance_error(layer_norm, x, roll) > 0.1, "per-element gamma, beta break it"
    for keeps in (nn.LayerNorm([4, 6, 6], elementwise_affine=False), group_norm, instance_norm):
        assert cs.equivariance_error(keeps, x, roll) < 1e-5


def test_effective_fraction_is_one_for_independent_values_and_one_over_hw_for_constant_maps():
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(20_000, 2, 4, 4, generator=g)
    constant = torch.randn(20_000, 2, 1, 1, generator=g).expand(20_000, 2, 4, 4)
    for n in (2, 16):
        fraction, noise = cs.effective_fraction(independent, n)
        assert ((fraction - 1).abs() < 0.05).all()
        torch.testing.assert_close(noise, (1 / (n * 16)) ** 0.5 * torch.ones(2), rtol=0.05, atol=0)
        fraction, noise = cs.effective_fraction(constant, n)
        torch.testing.assert_close(fraction, torch.full((2,), 1 / 16))
        torch.testing.assert_close(noise, torch.full((2,), n**-0.5))


def test_effective_fraction_ignores_a_fixed_pattern_across_positions():
    # a fixed map plus small independent noise: the pooled variance is the pattern's, but the batch
    # mean varies only with the noise, so m'_eff must stay N*H*W (fraction 1), not far above it
    g = torch.Generator().manual_seed(1)
    pattern = 10 * torch.randn(1, 1, 4, 4, generator=g)
    fraction, noise = cs.effective_fraction(pattern + 0.1 * torch.randn(20_000, 1, 4, 4, generator=g), 2)
    assert abs(fraction.item() - 1) < 0.05
    assert noise.item() < 0.01  # tiny in units of the pooled sigma


def test_effective_sizes_and_norm_inputs_cover_every_layer():
    net = cs.small_cnn("per channel", seed=0, channels=(2, 3), image_size=8)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = cs.norm_inputs(net, x, chunk=10)
    assert [tuple(f.shape) for f in inputs] == [(64, 2, 8, 8), (64, 3, 4, 4)]
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(inputs[0], net[0](x))
    sizes = cs.effective_sizes(net, x, (2, 8))
    assert [layer["side"] for layer in sizes] == [8, 4]
    assert sizes[1]["values", 8] == 8 * 16
    assert all(0 < layer["smallest", n] <= layer["effective", n] for layer in sizes for n in (2, 8))
    for layer in sizes:  # m'_eff grows like N; the noise shrinks like 1/sqrt(N)
        assert layer["effective", 8] == pytest.approx(4 * layer["effective", 2], rel=1e-5)
        assert layer["noise", 2] == pytest.approx(2 * layer["noise", 8], rel=1e-5)


def test_small_cnn_kinds_share_weights_and_the_per_position_layers_fit_each_stage():
    a, b = cs.small_cnn("per channel", seed=3), cs.small_cnn("per position", seed=3)
    convs_a = [m for m in a if isinstance(m, nn.Conv2d)]
    convs_b = [m for m in b if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(p.weight, q.weight) and p.bias is None for p, q in zip(convs_a, convs_b))
    shapes = [tuple(m.running_mean.shape) for m in b if isinstance(m, cs.PerPositionBatchNorm2d)]
    assert shapes == [(8, 28, 28), (16, 14, 14), (32, 7, 7)]
    assert b(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError):
        cs.small_cnn("per example", seed=0)


def test_half_size_digits_and_shifts():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 10:12, 6:8] = 1.0
    small = cs.half_size_digits(Split(x, torch.zeros(1), x, torch.zeros(1)))
    assert small.x_train.shape == (1, 1, 16, 16)
    assert small.x_train[0, 0, 6, 4] == 1.0 and small.x_train.sum() == 1.0  # pooled (5, 3), padded by one
    moved = cs.shift_images(small.x_train, 2, -3)
    assert moved[0, 0, 8, 1] == 1.0 and moved.sum() == 1.0
    assert cs.shift_images(small.x_train, 0, -5).sum() == 0  # moved out of the picture
    torch.testing.assert_close(cs.shift_images(moved, -2, 3), small.x_train)


def test_shifted_accuracy_averages_four_directions():
    x = torch.zeros(4, 1, 6, 6)
    x[:, :, 2, 2] = 1.0

    class SeesPixel(nn.Module):  # class 1 when pixel (2, 2) is set, class 0 otherwise
        def forward(self, z):
            return torch.stack([1 - z[:, 0, 2, 2], z[:, 0, 2, 2]], dim=1)

    y = torch.ones(4, dtype=torch.long)
    assert cs.shifted_accuracy(SeesPixel(), x, y, 0) == 1.0
    assert cs.shifted_accuracy(SeesPixel(), x, y, 1) == 0.0


def test_train_cnn_learns_and_returns_an_eval_mode_net():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.rand(64, 1, 8, 8, generator=g) * 0.1
    x[y == 1, :, :, :4] += 1.0  # class 1: a bright left half
    digits = Split(x, y, x, y)
    net = cs.train_cnn("per position", digits, seed=0, steps=30)
    assert not net.training and cs.shifted_accuracy(net, x, y, 0) == 1.0


def test_conv_bias_is_dead_weight_before_batch_norm():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (128,), generator=g)
    net = bnlib.lab.models.small_cnn(channels=(4, 6), image_size=8, norm=bnlib.BatchNorm2d).double()
    biased = cs.with_conv_bias(net, torch.Generator().manual_seed(1))
    convs = [m for m in biased if isinstance(m, nn.Conv2d)]
    assert all(m.bias is not None and m.bias.abs().max() > 0.1 for m in convs)
    result = cs.conv_bias_runs(net, x, y, steps=5, seed=0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert result["bias moved"] < 1e-12 and result["loss gap"] < 1e-12 and result["running-mean gap"] < 1e-12


def test_conv_bias_runs_notice_a_bias_that_matters():
    """Without BN after it the bias changes the loss and is trained: the comparison can fail."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (128,), generator=g)
    net = bnlib.lab.models.small_cnn(channels=(4, 6), image_size=8, norm=bnlib.BatchNorm2d).double()
    net[1] = nn.Identity()  # no normalization after the first convolution
    result = cs.conv_bias_runs(net, x, y, steps=5, seed=0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert result["loss gap"] > 1e-6 and result["bias moved"] > 1e-6


def test_recompute_statistics_gives_the_average_of_batch_statistics_for_both_kinds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 1, 8, 8, generator=g) * 2 + 1
    for kind, layer_type in (("per channel", bnlib.BatchNorm2d), ("per position", cs.PerPositionBatchNorm2d)):
        net = cs.small_cnn(kind, seed=0, channels=(2, 3), image_size=8)
        net.train()
        net(x[:16])  # running averages of one training batch, to be replaced
        cs.recompute_statistics(net, x, batch_size=32)  # two batches of 32; the last 6 examples left out
        assert not net.training
        first = net[1]
        assert isinstance(first, layer_type) and first.momentum == 0.1
        with torch.no_grad():
            z = net[0](x[:64]).view(2, 32, *net[0](x[:1]).shape[1:])  # (batches, 32, C, H, W)
        dims = (1, 3, 4) if kind == "per channel" else (1,)
        mean = z.mean(dim=dims).mean(0)
        var = z.var(dim=dims, correction=1).mean(0)
        torch.testing.assert_close(first.running_mean, mean)
        torch.testing.assert_close(first.running_var, var)


def test_with_variance_floor_raises_only_small_per_position_variances():
    net = cs.small_cnn("per position", seed=0, channels=(2,), image_size=4)
    layer = net[1]
    layer.running_var.copy_(torch.tensor([1e-8, 0.5]).repeat(2, 4, 2))
    floored = cs.with_variance_floor(net, 0.1)
    var = floored[1].running_var
    assert var.min().item() == pytest.approx(0.1)
    assert torch.equal(var[layer.running_var >= 0.1], layer.running_var[layer.running_var >= 0.1])
    assert layer.running_var.min().item() < 1e-7  # the original is untouched


def test_drawn_batch_statistics_are_those_batch_norm_computes_on_the_drawn_batch():
    x = batch(40, 3, 4, 5, seed=1)
    shift, ratio = cs.drawn_batch_statistics(x, 6, 5, torch.Generator().manual_seed(7))
    assert shift.shape == ratio.shape == (5, 3)
    gen = torch.Generator().manual_seed(7)  # the same draws
    values = x.double().transpose(0, 1).reshape(3, -1)
    mean, sigma = values.mean(1), values.var(1, correction=0).sqrt()
    for k in range(5):
        drawn = x.double()[torch.randperm(40, generator=gen)[:6]]
        batch_mean = drawn.mean(dim=(0, 2, 3))
        batch_std = drawn.var(dim=(0, 2, 3), correction=0).sqrt()
        torch.testing.assert_close(shift[k], ((batch_mean - mean) / sigma).float())
        torch.testing.assert_close(ratio[k], (batch_std / sigma).float())
    with pytest.raises(ValueError, match="batch_size"):
        cs.drawn_batch_statistics(x, 41, 1, gen)


def test_drawn_batch_means_scatter_as_the_closed_form_predicts():
    # per-example offsets make the channel means differ between examples
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 2, 4, 4, generator=g) + 2 * torch.randn(2000, 2, 1, 1, generator=g)
    for n in (2, 8):
        shift, ratio = cs.drawn_batch_statistics(x, n, 4000, torch.Generator().manual_seed(n))
        _, noise = cs.effective_fraction(x, n)
        torch.testing.assert_close(shift.std(dim=0), noise, rtol=0.06, atol=0)
        assert (shift.mean(dim=0).abs() < 3 * noise / 4000**0.5 + 1e-6).all()
    # the whole population as one batch: its own statistics
    everything, ratio = cs.drawn_batch_statistics(x[:50], 50, 2, g)
    torch.testing.assert_close(everything, torch.zeros(2, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(ratio, torch.ones(2, 2))
