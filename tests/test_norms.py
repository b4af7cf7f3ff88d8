"""bnlib.norm beyond parity with torch.nn (that is tests/test_dropin.py's table): the axes each method
normalizes over, gradcheck, argument errors, ghost batches and Batch Renorm's algebra."""

import pytest
import torch
from torch import nn

import bnlib
import bnlib.lab.models
from bnlib import norm

torch.set_num_threads(1)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_float64_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for layer in [norm.GroupNorm(2, 4), norm.LayerNorm((4, 3, 3)), norm.InstanceNorm2d(4), norm.RMSNorm(3)]:
        layer.double()
        assert torch.autograd.gradcheck(layer, (x,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        norm.GroupNorm(3, 8)
    with pytest.raises(ValueError, match="expected input"):
        norm.GroupNorm(2, 8)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="3D or 4D"):
        norm.InstanceNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="ending in"):
        norm.LayerNorm(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown method"):
        norm.plan("weight", 4)
    with pytest.raises(ValueError, match="multiple"):
        norm.GhostBatchNorm(3, ghost_size=4).train()(torch.randn(6, 3))
    with pytest.raises(ValueError, match="rmax"):
        norm.BatchRenorm(3, rmax=0.5)
    with pytest.raises(ValueError, match="no 'instance'"):
        norm.factory("instance")


# --- the shared idea: which axes -------------------------------------------------------------


def _layer(method: str, c: int):
    return {
        "batch": lambda: bnlib.BatchNorm2d(c),
        "layer": lambda: norm.LayerNorm((c, 3, 4)),
        "instance": lambda: norm.InstanceNorm2d(c),
        "group": lambda: norm.GroupNorm(2, c),
    }[method]()


@pytest.mark.parametrize("method", norm.METHODS)
@pytest.mark.parametrize("index", [(0, 0, 0, 0), (2, 3, 1, 2)])
def test_shares_statistics_is_what_the_layers_do(method, index):
    """Perturbing one input moves exactly the outputs that share its statistics (and itself)."""
    shape = (3, 4, 3, 4)
    layer = _layer(method, 4).train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer.double()
    x2 = x.clone()
    x2[index] += 1.0
    moved = (layer(x2) - layer(x)).abs() > 1e-9
    assert torch.equal(moved, norm.shares_statistics(method, shape, index, num_groups=2))


def test_normalize_matches_torch_functionals():
    x = torch.randn(4, 6, 3, 5)
    _close(norm.normalize(x, "batch"), nn.functional.batch_norm(x, None, None, training=True))
    _close(norm.normalize(x, "layer"), nn.functional.layer_norm(x, x.shape[1:]))
    _close(norm.normalize(x, "instance"), nn.functional.instance_norm(x))
    _close(norm.normalize(x, "group", 3), nn.functional.group_norm(x, 3))
    counts = {m: int(norm.shares_statistics(m, x.shape, num_groups=3).sum()) for m in norm.METHODS}
    assert counts == {"batch": 4 * 15, "layer": 6 * 15, "instance": 15, "group": 2 * 15}


def test_group_norm_limits_are_layer_and_instance_norm():
    x = torch.randn(4, 6, 3, 3)
    _close(norm.GroupNorm(1, 6)(x), norm.LayerNorm((6, 3, 3))(x))
    _close(norm.GroupNorm(6, 6)(x), norm.InstanceNorm2d(6)(x))


# --- Batch Renorm and ghost batches -------------------------------------------------------------


def test_ghost_groups_are_independent_batch_norms():
    x = torch.randn(12, 5, 2)
    out = norm.GhostBatchNorm(5, ghost_size=4).train()(x)
    for chunk, o in zip(x.split(4), out.split(4)):
        _close(o, nn.functional.batch_norm(chunk, None, None, training=True))


def test_renorm_schedule():
    brn = norm.BatchRenorm(3, rmax=3.0, dmax=5.0, warmup_steps=10, ramp_steps=20)
    assert brn.limits(0) == (1.0, 0.0) and brn.limits(9) == (1.0, 0.0)
    assert brn.limits(20) == pytest.approx((2.0, 2.5))
    assert brn.limits(30) == (3.0, 5.0) and brn.limits(1000) == (3.0, 5.0)
    assert norm.BatchRenorm(3, warmup_steps=2).limits(2) == (3.0, 5.0)


def test_renorm_unclipped_equals_running_statistics():
    """With wide limits, training output = (x - running mean) / running std, with BN's gradient to weight/bias."""
    brn = norm.BatchRenorm(4, rmax=1e6, dmax=1e6)
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        brn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    mean, var = brn.running_mean.clone(), brn.running_var.clone()
    x = torch.randn(10, 4) * 2
    out = brn.train()(x)
    _close(out, (x - mean) / torch.sqrt(var + brn.eps))


def test_renorm_clips_and_blocks_gradient_through_r_d():
    brn = norm.BatchRenorm(2, rmax=2.0, dmax=0.5, momentum=0.0)
    g = torch.Generator().manual_seed(0)
    # far from the running (0, 1): batch means near 30 and stds near 10 put d and r at their limits
    x = (torch.randn(64, 2, generator=g) * 10 + 30).requires_grad_()
    out = brn.train()(x)
    x_hat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + brn.eps)
    _close(out, x_hat * 2.0 + 0.5, 1e-4)  # r and d at their limits
    dy = torch.randn(64, 2)
    (gx,) = torch.autograd.grad(out, x, dy)
    (gref,) = torch.autograd.grad(x_hat * 2.0 + 0.5, x, dy)
    _close(gx, gref, 1e-4)


def test_renorm_running_stats_and_eval():
    brn = norm.BatchRenorm(3, momentum=0.2, ghost_size=4)
    x = torch.randn(8, 3, 5) * 2 + 1
    brn.train()(x)
    groups = x.reshape(2, 4, 3, 5)
    mean = groups.mean((1, 3)).mean(0)
    var = groups.permute(0, 2, 1, 3).reshape(2, 3, -1).var(2).mean(0)  # unbiased, per group, averaged
    _close(brn.running_mean, 0.2 * mean)
    _close(brn.running_var, 0.8 + 0.2 * var)
    assert int(brn.num_batches_tracked) == 1
    y = brn.eval()(x)
    _close(y, (x - brn.running_mean.view(1, 3, 1)) / torch.sqrt(brn.running_var.view(1, 3, 1) + brn.eps))


@pytest.mark.parametrize("method", ["batch", "ghost", "renorm", "group", "layer", "rms"])
def test_factory_builds_models(method):
    kw = {"ghost_size": 4} if method == "ghost" else {}
    net = bnlib.lab.models.mlp([6, 8, 3], norm=norm.factory(method, **kw))
    assert net(torch.randn(8, 6)).shape == (8, 3)
    if method != "rms":
        kw = {"num_groups": 4} if method == "group" else kw
        cnn = bnlib.lab.models.small_cnn(1, 3, (8,), 8, norm=norm.factory(method, spatial=True, **kw))
        assert cnn(torch.randn(8, 1, 8, 8)).shape == (8, 3)
