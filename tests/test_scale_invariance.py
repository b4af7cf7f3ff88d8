"""bnlib.lab.experiments.scale_invariance: jointly scale-invariant (gamma, beta) pairs, joint
scaling of a parameter group, and the angle-from-start recorder."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.lab import invariance as inv
from bnlib.lab import models, training
from bnlib.lab.experiments import scale_invariance as si
from bnlib.lab.measure import evaluate

SCALES = [1e-3, 1e-1, 10.0, 1e3]


def _net(seed=0, activation="relu", eps=0.0, sizes=(12, 8, 8, 3)):
    g = torch.Generator().manual_seed(seed)
    net = models.mlp(list(sizes), activation, lambda c: inv.ExactBatchNorm1d(c, eps=eps),
                     generator=g).double()
    with torch.no_grad():  # gamma = 1, beta = 0 at init would hide a missing beta scaling
        for module in net:
            if isinstance(module, inv.ExactBatchNorm1d):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return net


def _data(seed=0, n=32, d=12, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def test_groups_found_for_every_normalization_but_the_last():
    assert [[n for n, _ in grp] for grp in si.invariant_affine_groups(_net())] == [["1.weight", "1.bias"]]
    deeper = _net(sizes=(12, 8, 8, 8, 3))
    assert [[n for n, _ in grp] for grp in si.invariant_affine_groups(deeper)] == [
        ["1.weight", "1.bias"], ["4.weight", "4.bias"]]


def test_no_group_without_homogeneous_activation_or_second_norm():
    assert si.invariant_affine_groups(_net(activation="tanh")) == []
    assert si.invariant_affine_groups(_net(sizes=(12, 8, 3))) == []  # one normalization only
    no_affine = nn.Sequential(nn.Linear(4, 4, bias=False), inv.ExactBatchNorm1d(4, affine=False),
                              nn.ReLU(), nn.Linear(4, 4), inv.ExactBatchNorm1d(4))
    assert si.invariant_affine_groups(no_affine) == []


def test_nested_sequential_names():
    outer = nn.Sequential(nn.Identity(), _net())
    names = [[n for n, _ in grp] for grp in si.invariant_affine_groups(outer)]
    assert names == [["1.1.weight", "1.1.bias"]]
    assert dict(outer.named_parameters())["1.1.weight"] is si.invariant_affine_groups(outer)[0][0][1]


def test_invariant_parameters_are_weights_and_pairs_in_model_order():
    assert [n for n, _ in si.invariant_parameters(_net())] == ["0.weight", "1.weight", "1.bias", "3.weight"]


def test_first_pair_is_jointly_invariant_at_eps_zero():
    net, (x, y) = _net(), _data()
    result = si.joint_scaling(net, ["1.weight", "1.bias"], x, y, SCALES)
    assert np.abs(result.loss_gaps).max() < 1e-12
    assert abs(result.radial_cosine) < 1e-12
    np.testing.assert_array_equal(result.scales, SCALES)


@pytest.mark.parametrize("names", [["1.weight"], ["1.bias"], ["4.weight", "4.bias"], ["6.weight", "6.bias"]])
def test_other_groups_are_not_invariant(names):
    net, (x, y) = _net(), _data()
    result = si.joint_scaling(net, names, x, y, SCALES)
    assert np.abs(result.loss_gaps).max() > 1e-3
    assert abs(result.radial_cosine) > 1e-4


def test_invariance_breaks_with_eps_or_a_non_homogeneous_activation():
    x, y = _data()
    with_eps = si.joint_scaling(_net(eps=1e-3), ["1.weight", "1.bias"], x, y, [1e-3])
    assert abs(with_eps.loss_gaps[0]) > 1e-6  # the second BN's input variance falls below eps
    tanh = si.joint_scaling(_net(activation="tanh"), ["1.weight", "1.bias"], x, y, SCALES)
    assert np.abs(tanh.loss_gaps).max() > 1e-3


def test_joint_scaling_leaves_the_model_unchanged():
    net, (x, y) = _net(), _data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    si.joint_scaling(net, ["1.weight", "1.bias"], x, y, SCALES)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_joint_scaling_rejects_bad_input():
    net, (x, y) = _net(), _data()
    with pytest.raises(ValueError):
        si.joint_scaling(net, [], x, y, SCALES)
    with pytest.raises(ValueError):
        si.joint_scaling(net, ["1.weight"], x, y, [0.0])
    with pytest.raises(KeyError):
        si.joint_scaling(net, ["9.weight"], x, y, SCALES)


def test_weight_decay_on_the_pair_is_a_growing_learning_rate_and_on_the_last_pair_is_not():
    """Li & Arora's equivalence with (gamma_1, beta_1) in the decayed group holds to rounding;
    with (gamma_2, beta_2) added it breaks."""
    x, y = _data(n=64)
    eta, lam, steps = 0.1, 0.05, 20

    def gap(extra):
        losses = []
        for grow in (False, True):
            net = _net()
            names = {*dict(si.invariant_parameters(net)), *extra}
            group = [p for n, p in net.named_parameters() if n in names]
            rest = [p for n, p in net.named_parameters() if n not in names]
            opt = torch.optim.SGD([{"params": group, "lr": eta, "weight_decay": 0.0 if grow else lam},
                                   {"params": rest, "lr": eta}])
            sched = None
            if grow:
                def sched(o):
                    return torch.optim.lr_scheduler.LambdaLR(o, [inv.exponential_lr_factor(eta, lam), lambda t: 1.0])
            losses.append(training.train(net, x, y, steps=steps, batch_size=16, optimizer=opt,
                                         scheduler=sched, seed=0).train_loss)
        return float(np.abs(losses[1] - losses[0]).max())

    assert gap(()) < 1e-10
    assert gap(("4.weight", "4.bias")) > 1e-6


def test_angle_from_start_records_zero_then_the_step_angle():
    net, (x, y) = _net(), _data()
    w0 = [w.detach().clone() for _, w in inv.invariant_weights(net)]
    hist = training.train(net, x, y, steps=1, batch_size=16, lr=5.0, record_at=[0, 1],
                          recorders=[si.angle_from_start(net)], seed=0)
    angles = hist["angle_from_start"]
    assert angles.shape == (2, 2)  # steps 0 and 1, two invariant weights
    np.testing.assert_allclose(angles[0], 0.0, atol=1e-7)
    expected = [float(inv.angular_update(a, w.detach()).mean()) for a, (_, w) in zip(w0, inv.invariant_weights(net))]
    np.testing.assert_allclose(angles[1], expected, rtol=1e-12)
    assert angles[1].min() > 0


def test_angle_from_start_of_a_right_angle():
    net, (x, y) = _net(), _data()
    recorder = si.angle_from_start(net)
    with torch.no_grad():  # turn every row of the first weight by 90 degrees
        r = net[0].weight.detach().clone()
        v = torch.roll(r, 1, dims=1)
        v -= (v * r).sum(1, keepdim=True) / (r * r).sum(1, keepdim=True) * r
        net[0].weight.copy_(v)
    state = training.TrainState(0, net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, None)
    angles = recorder(state)["angle_from_start"]
    assert float(angles[0]) == pytest.approx(math.pi / 2, abs=1e-12)
    assert float(angles[1]) == 0.0


def test_angle_from_start_needs_invariant_weights():
    with pytest.raises(ValueError):
        si.angle_from_start(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_joint_scaling_uses_the_given_loss():
    net, (x, y) = _net(), _data()
    a = si.joint_scaling(net, ["4.weight"], x, y, [2.0])
    b = si.joint_scaling(net, ["4.weight"], x, y, [2.0], loss_fn=lambda out, t: 2 * F.cross_entropy(out, t))
    assert b.loss_gaps[0] == pytest.approx(2 * a.loss_gaps[0], rel=1e-12)


def _trained_pair(c, steps=5):
    """The run from W_0 and the equivalent run from c W_0 at rate c^2 eta (eps = 0)."""
    x, y = _data(n=64)
    nets = []
    for scale in (1.0, c):
        net = inv.scale_invariant_(_net(), scale)
        ids = {id(p) for _, p in inv.invariant_weights(net)}
        opt = torch.optim.SGD([{"params": [p for p in net.parameters() if id(p) in ids], "lr": 0.1 * scale**2},
                               {"params": [p for p in net.parameters() if id(p) not in ids], "lr": 0.1}])
        training.train(net, x, y, steps=steps, batch_size=16, optimizer=opt, seed=0)
        nets.append(net)
    return nets, x


def test_equivalent_runs_differ_in_eval_mode_until_statistics_are_recomputed():
    (a, b), x = _trained_pair(10.0)
    with torch.no_grad():
        assert (a.train()(x) - b.train()(x)).abs().max() < 1e-12  # training mode: the same network
    running = si.eval_disagreement(a, b, x)
    assert running.max_logit_gap > 1e-3  # the running variance started at 1 in both, not at c^2
    recomputed = si.eval_disagreement(si.with_recomputed_statistics(a, x, 16),
                                      si.with_recomputed_statistics(b, x, 16), x)
    assert recomputed.max_logit_gap < 1e-12
    assert recomputed.disagreement == 0.0


def test_eval_disagreement_counts_predictions_and_keeps_modes():
    net = _net()
    other = _net()
    x, _ = _data()
    net.train()
    other.eval()
    same = si.eval_disagreement(net, other, x)
    assert same.max_logit_gap == 0.0 and same.disagreement == 0.0
    assert net.training and not other.training
    with torch.no_grad():  # swap two output rows: the predictions of those two classes swap
        other[-1].weight.copy_(other[-1].weight[[1, 0, 2]])
        other[-1].bias.copy_(other[-1].bias[[1, 0, 2]])
    net.eval()
    with torch.no_grad():
        pred = net(x).argmax(1)
    expected = float(((pred == 0) | (pred == 1)).double().mean())
    assert si.eval_disagreement(net, other, x).disagreement == pytest.approx(expected)
    with pytest.raises(ValueError):
        si.eval_disagreement(net, nn.Sequential(net, nn.Linear(3, 2).double()), x)


def test_recomputed_statistics_are_population_statistics_of_a_copy():
    (net, _), x = _trained_pair(10.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = si.with_recomputed_statistics(net, x, batch_size=16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        z = net[0](x)  # first-layer pre-activations
    batches = z.split(16)
    np.testing.assert_allclose(fresh[1].running_mean.numpy(), z.mean(0).numpy(), rtol=1e-12, atol=1e-14)
    mean_var = torch.stack([b.var(0, correction=1) for b in batches]).mean(0)
    np.testing.assert_allclose(fresh[1].running_var.numpy(), mean_var.numpy(), rtol=1e-12)
    with pytest.raises(ValueError):
        si.with_recomputed_statistics(net, x, batch_size=1)


def test_recomputed_test_metrics_recorder():
    (net, _), x = _trained_pair(10.0)
    _, y = _data(n=64)
    recorder = si.recomputed_test_metrics(x, x[:32], y[:32], batch_size=16, prefix="pop_")
    state = training.TrainState(5, net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, None)
    values = recorder(state)
    loss, acc = evaluate(si.with_recomputed_statistics(net, x, 16), x[:32], y[:32])
    assert values == {"pop_accuracy": acc, "pop_loss": loss}
    running_loss, _ = evaluate(net, x[:32], y[:32])
    assert running_loss != pytest.approx(loss, rel=1e-6)  # the running averages lag: a different model


def test_angular_tracker_records_every_update():
    net, (x, y) = _net(), _data()
    tracker = si.AngularTracker(net)
    w0 = [w.detach().clone() for _, w in inv.invariant_weights(net)]
    np.testing.assert_allclose(tracker.start_sq_norm, [float((inv.row_norms(w) ** 2).mean()) for w in w0])
    seen = []

    def snapshot(state):
        seen.append([w.detach().clone() for _, w in inv.invariant_weights(state.model)])

    training.train(net, x, y, steps=3, batch_size=16, lr=2.0, callbacks=[snapshot, tracker], seed=0)
    assert tracker.mean_angle.shape == tracker.mean_sq_angle.shape == tracker.sq_norm.shape == (3, 2)
    previous = w0
    for t, now in enumerate(seen):
        turns = [inv.angular_update(a, b) for a, b in zip(previous, now)]
        np.testing.assert_allclose(tracker.mean_angle[t], [float(u.mean()) for u in turns], rtol=1e-12)
        np.testing.assert_allclose(tracker.mean_sq_angle[t], [float((u**2).mean()) for u in turns], rtol=1e-12)
        np.testing.assert_allclose(tracker.sq_norm[t], [float((inv.row_norms(b) ** 2).mean()) for b in now],
                                   rtol=1e-12)
        previous = now
    assert (tracker.mean_sq_angle >= tracker.mean_angle**2 - 1e-15).all()  # Jensen
    assert tracker.mean_angle.min() > 0


def test_angular_tracker_needs_invariant_weights():
    with pytest.raises(ValueError):
        si.AngularTracker(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
