"""bnlib.lab.landscape (gradient probes, the ICS measure, Theorem 4.1, 2-D slices) and deep linear networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnlib
from bnlib.lab import landscape, models
from bnlib.lab.experiments import deep_linear


def quadratic(a: torch.Tensor, b: torch.Tensor):
    """L(theta) = theta^T A theta / 2 - b^T theta and its gradient."""

    def objective(theta):
        return 0.5 * theta @ a @ theta - b @ theta, a @ theta - b

    return objective


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)) @ q.T


def test_probe_matches_closed_form_on_a_quadratic():
    a = spd(6)
    b = torch.linspace(-1, 1, 6, dtype=torch.float64)
    theta = torch.arange(6, dtype=torch.float64) / 3
    etas = [0.01, 0.05, 0.1, 0.2]
    probe = landscape.probe_along_gradient(quadratic(a, b), theta, etas)
    g = a @ theta - b
    ag = a @ g
    e = np.array(etas)
    losses = float(0.5 * theta @ a @ theta - b @ theta) - e * float(g @ g) + 0.5 * e**2 * float(g @ ag)
    np.testing.assert_allclose(probe.losses, losses, rtol=1e-12)
    np.testing.assert_allclose(probe.grad_changes, e * float(ag.norm()), rtol=1e-12)
    assert probe.loss_range == pytest.approx(losses.max() - losses.min(), rel=1e-12)
    assert probe.grad_change == pytest.approx(etas[-1] * float(ag.norm()), rel=1e-12)
    # effective beta-smoothness ||A g|| / ||g||: between the extreme eigenvalues 0.1 and 10
    assert probe.beta == pytest.approx(float(ag.norm() / g.norm()), rel=1e-12)
    assert 0.1 <= probe.beta <= 10.0
    assert probe.grad_norm == pytest.approx(float(g.norm()))


def test_beta_of_a_scaled_identity_is_its_curvature():
    probe = landscape.probe_along_gradient(
        quadratic(3.0 * torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)),
        torch.ones(4, dtype=torch.float64),
        [0.1, 0.3],
    )
    assert probe.beta == pytest.approx(3.0)


def test_probe_rejects_bad_step_sizes():
    obj = quadratic(torch.eye(2), torch.zeros(2))
    for etas in ([], [0.1, 0.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="etas"):
            landscape.probe_along_gradient(obj, torch.ones(2), etas)


def small_bn_net(seed=0):
    g = torch.Generator().manual_seed(seed)
    return models.mlp([5, 8, 8, 3], "relu", bnlib.BatchNorm1d, generator=g)


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_model_objective_matches_autograd_and_leaves_the_model_alone():
    net = small_bn_net()
    x, y = batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    obj = landscape.ModelObjective(net, F.cross_entropy, x, y)
    theta = obj.theta()
    loss, grad = obj(theta)
    shifted = obj.loss(theta + 0.1)
    landscape.probe_along_gradient(obj, theta, [0.1, 0.5])
    for k, v in net.state_dict().items():  # parameters, running statistics and counters untouched
        assert torch.equal(v, before[k]), k
    net.zero_grad()
    ref = F.cross_entropy(net(x), y)
    ref.backward()
    assert float(loss) == pytest.approx(ref.item(), rel=1e-6)
    flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(grad, flat)
    assert float(shifted) != pytest.approx(float(loss))
    with pytest.raises(ValueError, match="flat vector"):
        obj.loss(theta[:-1])


def test_ics_is_zero_when_earlier_layers_do_not_move_and_matches_a_manual_update():
    net = small_bn_net()
    x, y = batch()
    ics = landscape.internal_covariate_shift(net, F.cross_entropy, x, y, lr=1e-12)
    assert ics.layers == ["3.weight", "6.weight"]
    np.testing.assert_allclose(ics.cosine, 1.0, atol=1e-6)
    assert np.all(ics.relative < 1e-5)

    lr = 0.5
    ics = landscape.internal_covariate_shift(net, F.cross_entropy, x, y, lr=lr, layers=["3.weight"])
    # manual: step every parameter before 3.weight (0.weight, BN 1.weight/1.bias), recompute
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    g = net[3].weight.grad.clone()
    moved = small_bn_net()
    moved.load_state_dict(net.state_dict())
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in ("0.weight", "1.weight", "1.bias"):
                p -= lr * dict(net.named_parameters())[name].grad
    F.cross_entropy(moved(x), y).backward()
    g2 = moved[3].weight.grad
    assert ics.l2[0] == pytest.approx(float((g - g2).norm()), rel=1e-5)
    assert ics.cosine[0] == pytest.approx(float(F.cosine_similarity(g.reshape(1, -1), g2.reshape(1, -1))), rel=1e-5)
    assert ics.cosine[0] < 1.0


def test_ics_rejects_bad_arguments():
    net = small_bn_net()
    x, y = batch()
    with pytest.raises(ValueError, match="lr"):
        landscape.internal_covariate_shift(net, F.cross_entropy, x, y, lr=0.0)
    with pytest.raises(ValueError, match="no parameters named"):
        landscape.internal_covariate_shift(net, F.cross_entropy, x, y, lr=0.1, layers=["9.weight"])


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_theorem_4_1_bound_holds_with_equality_at_eps_zero(eps):
    g = torch.Generator().manual_seed(1)
    m, c = 32, 6
    x = (torch.randn(m, c, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    gamma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(m, c, generator=g, dtype=torch.float64)
    out = bnlib.norm.functional.batch_norm(x, None, None, gamma, None, training=True, eps=eps)
    (dx,) = torch.autograd.grad(out, x, up)
    var = x.detach().var(0, unbiased=False)
    sigma = (var + eps).sqrt()
    x_hat = (x.detach() - x.detach().mean(0)) / sigma
    lhs = (dx**2).sum(0)
    rhs = landscape.gradient_norm_bound(up, x_hat, gamma, sigma)
    gap = gamma**2 / sigma**2 * (up * x_hat).sum(0) ** 2 / m * (1 - (x_hat**2).sum(0) / m)
    assert torch.all(lhs <= rhs * (1 + 1e-12))
    torch.testing.assert_close(rhs - lhs, gap, rtol=1e-6, atol=1e-12)
    if eps == 0.0:
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=0)


def test_gradient_norm_bound_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        landscape.gradient_norm_bound(torch.ones(4), torch.ones(5), 1.0, 1.0)


def test_filter_normalized_direction_scales_each_row_and_skips_vectors():
    net = small_bn_net()
    d = landscape.filter_normalized_direction(net, torch.Generator().manual_seed(0))
    parts = landscape.ModelObjective(net, F.cross_entropy, *batch()).unflatten(d)
    for name, p in net.named_parameters():
        if p.dim() == 1:
            assert torch.all(parts[name] == 0), name
        else:
            torch.testing.assert_close(parts[name].norm(dim=1), p.detach().norm(dim=1))


def test_loss_surface_on_a_quadratic_bowl():
    loss = lambda t: (t**2).sum()  # noqa: E731
    theta = torch.zeros(3)
    d1, d2 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0])
    surf = landscape.loss_surface(loss, theta, d1, d2, [-1.0, 0.0, 1.0])
    expected = np.array([[a**2 + 4 * b**2 for a in (-1, 0, 1)] for b in (-1, 0, 1)])
    np.testing.assert_allclose(surf, expected)
    with pytest.raises(ValueError, match="same shape"):
        landscape.loss_surface(loss, theta, d1[:2], d2, [0.0])


def test_deep_linear_network_layout_and_data():
    g = torch.Generator().manual_seed(0)
    net = deep_linear.deep_linear_network(width=4, depth=3, norm=bnlib.BatchNorm1d, generator=g)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "Linear"]
    assert all(m.bias is None for m in net if isinstance(m, torch.nn.Linear))
    x, y, a = deep_linear.linear_regression_data(n=50, width=4, generator=g)
    torch.testing.assert_close(y, x @ a.T)
    plain = deep_linear.deep_linear_network(width=4, depth=3)
    w = plain[2].weight @ plain[1].weight @ plain[0].weight
    torch.testing.assert_close(plain(x), x @ w.T)
    with pytest.raises(ValueError):
        deep_linear.deep_linear_network(depth=0)


def test_landscape_recorder_inside_the_training_loop():
    from bnlib.lab import training

    net = small_bn_net()
    x, y = batch(n=64)
    hist = training.train(
        net, x, y, steps=4, batch_size=16, lr=0.1, record_at=[0, 4], recorders=[landscape.landscape_recorder(0.1)]
    )
    assert hist.steps == [0, 4]
    assert hist["beta"].shape == (2,) and hist["ics_cosine"].shape == (2, 2)
    assert np.all(hist["loss_range"] >= 0) and np.all(np.abs(hist["ics_cosine"]) <= 1 + 1e-6)
    one = landscape.landscape_recorder(0.1, layers=["6.weight"])(
        training.TrainState(0, net, None, x[:16], y[:16], None)
    )
    assert one["ics_cosine"].shape == (1,)
    with pytest.raises(ValueError, match="lr"):
        landscape.landscape_recorder(0.0)
