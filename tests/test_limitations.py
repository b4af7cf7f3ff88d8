"""bnlib.lab.experiments.limitations: ghost-batch evaluation, the renorm ablation layer, the
hand-unrolled shared-BN RNN, and the normalized values of the explorer."""

import pytest
import torch

from bnlib import norm
from bnlib.lab.data import Split
from bnlib.lab.experiments import limitations, recurrent, small_batches
from bnlib.lab.measure import snapshot
from bnlib.lab.models import mlp

torch.set_num_threads(1)


def _toy(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + torch.nn.functional.one_hot(y, d).float() * 3
    return Split(x[:90], y[:90], x[90:], y[90:])


def _renorm_pair(**kw):
    kw = {"rmax": 3.0, "dmax": 5.0, "momentum": 0.1, **kw}
    ref, det = norm.BatchRenorm(5, **kw).double(), limitations.DetachedRenorm(5, **kw).double()
    with torch.no_grad():
        for layer in (ref, det):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 5))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 5))
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    return ref, det


@pytest.mark.parametrize("ghost_size", [None, 4])
def test_detached_renorm_computes_what_batch_renorm_computes(ghost_size):
    """Same outputs and running averages, in training and evaluation, with clipped and unclipped r, d."""
    for shift in (0.0, 40.0):  # d unclipped, then clipped at dmax
        ref, det = _renorm_pair(ghost_size=ghost_size)
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + shift
        assert torch.allclose(ref(x), det(x), atol=1e-12)
        assert torch.allclose(ref.running_mean, det.running_mean, atol=1e-12)
        assert torch.allclose(ref.running_var, det.running_var, atol=1e-12)
        assert int(ref.num_batches_tracked) == int(det.num_batches_tracked) == 1
        ref.eval(), det.eval()
        assert torch.allclose(ref(x), det(x), atol=1e-12)


def test_detached_renorm_gradient_is_the_scaled_upstream_gradient():
    """Input gradient gamma r / sigma_B times the upstream one: nothing projected out (BatchRenorm's is)."""
    ref, det = _renorm_pair()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    upstream = torch.randn(16, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for name, layer in (("ref", ref), ("det", det)):
        xx = x.clone().requires_grad_(True)
        (grads[name],) = torch.autograd.grad(layer(xx), xx, upstream)
    std_b = torch.sqrt(x.var(0, unbiased=False) + ref.eps)
    r = (std_b / torch.sqrt(torch.tensor(2.0, dtype=torch.float64) + ref.eps)).clamp(1 / 3, 3)
    assert torch.allclose(grads["det"], upstream * ref.weight.detach() * r / std_b, atol=1e-12)
    assert grads["ref"].sum(0).abs().max() < 1e-10  # BatchRenorm: the batch mean of the gradient is removed
    assert grads["det"].sum(0).abs().max() > 0.1


def _one_class_net(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = mlp([6, 5, 3], "relu", layer, generator=g).double()
    x = torch.randn(32, 6, generator=g, dtype=torch.float64) + 1.0
    return net, x, torch.full((32,), 1)


def test_batch_mean_gradient_on_a_one_class_batch():
    """BN's backward removes the batch mean (0); constant statistics pass a large share on,
    far above the ~1/sqrt(32) of unrelated per-example gradients."""
    kw = {"rmax": 3.0, "dmax": 5.0, "momentum": 0.1}
    ref, x, y = _one_class_net(lambda c: norm.BatchRenorm(c, **kw))
    det, _, _ = _one_class_net(lambda c: limitations.DetachedRenorm(c, **kw))
    before = snapshot(ref, parameters=False)
    assert limitations.batch_mean_gradient(ref, x, y) < 1e-12
    assert limitations.batch_mean_gradient(det, x, y) > 0.5
    assert all(torch.equal(a, b) for a, b in zip(before.values(), snapshot(ref, parameters=False).values()))
    mixed = torch.arange(32) % 3  # three classes: the per-example gradients disagree more
    assert limitations.batch_mean_gradient(det, x, mixed) < limitations.batch_mean_gradient(det, x, y)


def test_batch_statistics_error_shrinks_as_one_over_sqrt_n():
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0)) * 3 + 5
    for n in (2, 8, 32):
        mean_err, var_err = limitations.batch_statistics_error(x, n)
        assert mean_err == pytest.approx((2 / (torch.pi * n)) ** 0.5, rel=0.05)
        assert var_err > limitations.batch_statistics_error(x, 2 * n)[1]
    assert limitations.batch_statistics_error(x[:4], 4) == pytest.approx((0.0, 0.0), abs=1e-12)  # the population
    with pytest.raises(ValueError):
        limitations.batch_statistics_error(x, 1)
    with pytest.raises(ValueError):
        limitations.batch_statistics_error(x[:, 0], 2)


def test_ghost_batch_error_normalizes_each_group_by_itself():
    """Equal to a by-hand loop over groups of the random order; running statistics untouched."""
    data = _toy()
    _, net = small_batches.run(data, "ghost", sizes=(6, 8, 3), batch_size=10, epochs=3, lr=0.05, ghost_size=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    err = limitations.ghost_batch_error(net, data.x_test, data.y_test, 2, seed=5)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(5))
    bn = small_batches.as_batch_norm(net).train()  # plain BN layers, one pair at a time
    wrong = 0
    with torch.no_grad():
        for pair in order.split(2):
            wrong += int((bn(data.x_test[pair]).argmax(1) != data.y_test[pair]).sum())
    assert err == pytest.approx(wrong / 30)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    odd = limitations.ghost_batch_error(net, data.x_test[:29], data.y_test[:29], 2, seed=5)
    assert odd * 28 == pytest.approx(round(odd * 28))  # an odd count: one example left out


def test_run_mlp_is_small_batches_run_with_a_layer():
    data = _toy()
    kw = {"sizes": (6, 8, 3), "epochs": 2, "lr": 0.05, "order": "sorted", "seed": 3, "batch_size": 10}
    err_ref, ref = small_batches.run(data, "renorm", momentum=0.1, **kw)
    err, net = limitations.run_mlp(data, lambda c: norm.BatchRenorm(c, momentum=0.1), **kw)
    assert err == err_ref
    for a, b in zip(ref.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def _shared_rnn(seed=0):
    x = torch.rand(40, 5, 4, generator=torch.Generator().manual_seed(seed))
    rnn = recurrent.NormRNN(4, 6, 3, "batch", max_steps=5, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(40) % 3
    recurrent.train_rnn(rnn, x, y, epochs=2, batch_size=10)
    return rnn, x, y


def test_rnn_states_reproduce_eval_and_training_mode():
    rnn, x, y = _shared_rnn()
    assert limitations.readout_error(rnn, limitations.rnn_states(rnn, x, 0, 20), y) == pytest.approx(
        recurrent.error_rate(rnn, x, y, batch_size=20)
    )
    assert limitations.readout_error(rnn, limitations.rnn_states(rnn, x, 5, 20), y) == pytest.approx(
        recurrent.error_rate(rnn, x, y, batch_statistics=True, batch_size=20)
    )
    rnn.eval()
    with torch.no_grad():
        assert torch.allclose(rnn.readout(limitations.rnn_states(rnn, x, 0, 20)[:, -1]), rnn(x), atol=1e-6)
    mixed = limitations.rnn_states(rnn, x, 2, 20)
    assert not torch.allclose(mixed, limitations.rnn_states(rnn, x, 0, 20))
    assert torch.allclose(mixed[:, :2], limitations.rnn_states(rnn, x, 5, 20)[:, :2])
    with pytest.raises(ValueError, match="shared"):
        limitations.rnn_states(recurrent.NormRNN(4, 6, 3, "layer"), x)


def test_normalized_values_are_standardized_per_ghost_batch():
    data = _toy()
    _, net = small_batches.run(data, "ghost", sizes=(6, 8, 3), batch_size=10, epochs=1, lr=0.05, ghost_size=2)
    v = limitations.normalized_values(net, data.x_test[:10])
    assert v.shape == (10, 8)
    assert torch.allclose(v.view(5, 2, 8).mean(1), torch.zeros(5, 8), atol=1e-5)  # each pair centred
    assert (v.abs() <= 1 + 1e-6).all() and v.abs().median() > 0.999  # pairs: +-1 (less only if nearly equal)
    _, gn = small_batches.run(data, "layer", sizes=(6, 8, 3), batch_size=10, epochs=1, lr=0.05)
    w = limitations.normalized_values(gn, data.x_test[:10])
    assert torch.allclose(w.mean(1), torch.zeros(10), atol=1e-5)  # layer norm: each example centred
