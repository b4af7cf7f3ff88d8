"""bnlib.norm.normalizer_free: weight standardization, NF blocks, adaptive gradient clipping, Fixup."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlib.norm.normalizer_free import (
    RELU_GAIN,
    NFResidual,
    ScalarBias,
    ScalarScale,
    WSConv2d,
    WSLinear,
    adaptive_clip_grad_,
    fixup_init_,
    nf_betas,
    standardize_weight,
    unitwise_norm,
    unitwise_ratio,
)


def manual_standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output unit, written out with a loop over the units."""
    rows = []
    for unit in w.double():
        flat = unit.flatten()
        mean = flat.sum() / flat.numel()
        var = ((flat - mean) ** 2).sum() / flat.numel()
        rows.append((unit - mean) / torch.sqrt(var + eps))
    return torch.stack(rows)


def test_standardized_rows_have_zero_mean_and_unit_variance():
    w = torch.randn(7, 3, 3, 3, dtype=torch.float64) * 0.3 + 0.5
    s = standardize_weight(w, eps=0.0).reshape(7, -1)
    assert s.mean(1).abs().max() < 1e-12
    assert (s.var(1, correction=0) - 1).abs().max() < 1e-12


def test_scaled_standardization_gives_rows_of_norm_gain():
    w = torch.randn(5, 40, dtype=torch.float64)
    s = standardize_weight(w, eps=0.0, gain=RELU_GAIN)
    assert torch.allclose(s.norm(dim=1), torch.full((5,), RELU_GAIN, dtype=torch.float64), rtol=1e-12)


def test_relu_gain_keeps_unit_variance():
    # relu(z), z ~ N(0, 1), through zero-mean rows of squared norm gain^2: variance 1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50_000, 64, generator=g, dtype=torch.float64)
    w = standardize_weight(torch.randn(32, 64, generator=g, dtype=torch.float64), eps=0.0, gain=RELU_GAIN)
    out = F.linear(F.relu(z), w)
    assert abs(float(out.var(0).mean()) - 1.0) < 0.01
    assert RELU_GAIN == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)))


def test_wsconv2d_equals_conv_with_manually_standardized_weights():
    torch.manual_seed(0)
    layer = WSConv2d(4, 6, 3, padding=1, stride=2, bias=True).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    ref = F.conv2d(x, manual_standardize(layer.weight, layer.eps), layer.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_wslinear_equals_linear_with_manually_standardized_weights_and_gradients_flow():
    torch.manual_seed(1)
    layer = WSLinear(10, 4, gain=2.0).double()
    x = torch.randn(3, 10, dtype=torch.float64)
    ref = F.linear(x, manual_standardize(layer.weight, layer.eps) * 2.0 / math.sqrt(10), layer.bias)
    assert torch.allclose(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda w: standardize_weight(w, gain=2.0), layer.weight.detach().clone().requires_grad_()
    )


def test_standardized_weight_is_invariant_to_row_shift_and_scale():
    w = torch.randn(4, 12, dtype=torch.float64)
    moved = w * torch.tensor([[3.0], [0.5], [2.0], [7.0]], dtype=torch.float64) + 1.5
    assert torch.allclose(standardize_weight(w, eps=0.0), standardize_weight(moved, eps=0.0), atol=1e-12)


def test_weight_standardization_rejects_bad_input():
    with pytest.raises(ValueError, match="output axis"):
        standardize_weight(torch.randn(5))
    with pytest.raises(ValueError, match="eps"):
        standardize_weight(torch.randn(3, 3), eps=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        WSLinear(1, 3)
    with pytest.raises(ValueError, match="at least 2"):
        WSConv2d(1, 3, 1)


def test_nf_betas_and_stream_variance_grows_as_one_plus_k_alpha_squared():
    assert nf_betas(3, 0.5) == pytest.approx([1.0, math.sqrt(1.25), math.sqrt(1.5)])
    torch.manual_seed(0)
    width, depth, alpha = 256, 6, 0.5
    blocks = [
        NFResidual(nn.Sequential(nn.ReLU(), WSLinear(width, width, gain=RELU_GAIN)), alpha, beta)
        for beta in nf_betas(depth, alpha)
    ]
    h = torch.randn(4096, width)
    for k, block in enumerate(blocks, start=1):
        with torch.no_grad():
            h = block(h)
        assert float(h.var(0).mean()) == pytest.approx(1 + k * alpha**2, rel=0.05)


def test_nf_residual_formula_and_errors():
    branch = nn.Linear(3, 3)
    block = NFResidual(branch, alpha=0.3, beta=2.0)
    x = torch.randn(4, 3)
    assert torch.allclose(block(x), x + 0.3 * branch(x / 2.0))
    for bad in ({"alpha": 0.0, "beta": 1.0}, {"alpha": 0.2, "beta": -1.0}):
        with pytest.raises(ValueError, match="positive"):
            NFResidual(branch, **bad)
    with pytest.raises(ValueError):
        nf_betas(0, 0.2)
    with pytest.raises(ValueError):
        nf_betas(2, 0.0)


def test_unitwise_norm_shapes():
    assert unitwise_norm(torch.ones(3, 2, 2)).tolist() == [2.0, 2.0, 2.0]
    assert unitwise_norm(torch.full((4,), 0.5)).tolist() == [1.0]
    with pytest.raises(ValueError, match="shape"):
        unitwise_ratio(torch.ones(3, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="eps"):
        unitwise_ratio(torch.ones(3, 2), torch.ones(3, 2), eps=0.0)


def test_agc_clips_exactly_the_units_over_the_threshold():
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(50, 8, dtype=torch.float64, generator=g))
    w.grad = torch.randn(50, 8, dtype=torch.float64, generator=g) * torch.rand(50, 1, dtype=torch.float64, generator=g)
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # zero weights: the eps floor
    b.grad = torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)
    lam = 0.3
    ratio = unitwise_ratio(w, w.grad)
    before = w.grad.clone()
    over = ratio > lam
    assert 0 < int(over.sum()) < 50  # the test exercises both kinds of unit
    clipped = adaptive_clip_grad_([w, b], clipping=lam)
    assert clipped == int(over.sum()) + 1  # b's ratio is 1e-3 / 1e-3 = 1 > lam
    assert torch.equal(w.grad[~over], before[~over])  # untouched, bit for bit
    after = unitwise_ratio(w, w.grad)
    assert torch.allclose(after[over], torch.full_like(after[over], lam), rtol=1e-12)
    directions = F.cosine_similarity(w.grad[over], before[over], dim=1)
    assert torch.allclose(directions, torch.ones_like(directions), rtol=1e-12)
    assert float(b.grad.norm()) == pytest.approx(lam * 1e-3)


def test_agc_skips_missing_gradients_and_rejects_bad_threshold():
    p = nn.Parameter(torch.ones(2, 2))
    assert adaptive_clip_grad_([p], clipping=0.1) == 0
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_grad_([p], clipping=0.0)


def test_fixup_zeroes_branch_outputs_and_scales_the_rest():
    torch.manual_seed(0)
    branches = [[nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)] for _ in range(16)]
    head = nn.Linear(64, 10)
    fixup_init_(branches, head, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 64)
    for branch in branches:
        out = branch[2](F.relu(branch[1](F.relu(branch[0](x)))))
        assert torch.equal(out, torch.zeros_like(out))
        # He std sqrt(2/64), times L^(-1/(2m-2)) = 16^(-1/4) = 1/2
        std = float(torch.cat([branch[0].weight.detach().flatten(), branch[1].weight.detach().flatten()]).std())
        assert std == pytest.approx(math.sqrt(2 / 64) / 2, rel=0.05)
    assert torch.equal(head(x), torch.zeros(5, 10))


def test_fixup_rejects_bad_branches_and_scalars_start_neutral():
    with pytest.raises(ValueError, match="at least one"):
        fixup_init_([])
    with pytest.raises(ValueError, match="same number"):
        fixup_init_([[nn.Linear(2, 2), nn.Linear(2, 2)], [nn.Linear(2, 2)]])
    with pytest.raises(ValueError, match="Linear or Conv"):
        fixup_init_([[nn.Linear(2, 2), nn.ReLU()]])
    x = torch.randn(3, 4)
    assert torch.equal(ScalarScale()(ScalarBias()(x)), x)


def test_learnable_gain_scales_each_unit_and_starts_at_one():
    torch.manual_seed(2)
    layer = WSLinear(12, 5, gain=RELU_GAIN, learnable_gain=True).double()
    assert torch.equal(layer.channel_gain.detach(), torch.ones(5, dtype=torch.float64))
    plain = standardize_weight(layer.weight, layer.eps, RELU_GAIN)
    assert torch.equal(layer.standardized_weight(), plain)  # gain 1: the plain scaled form
    with torch.no_grad():
        layer.channel_gain.copy_(torch.arange(1.0, 6.0))
    expected = plain * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    assert torch.allclose(layer.standardized_weight(), expected, rtol=1e-12)
    layer(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    assert layer.channel_gain.grad is not None and layer.channel_gain.grad.abs().sum() > 0
    conv = WSConv2d(3, 4, 3, learnable_gain=True).double()
    with torch.no_grad():
        conv.channel_gain.fill_(2.0)
    ref = 2.0 * standardize_weight(conv.weight, conv.eps)
    assert torch.allclose(conv.standardized_weight(), ref, rtol=1e-12)
    assert WSLinear(4, 2).channel_gain is None
