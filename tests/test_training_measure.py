"""bnlib.lab.training and bnlib.lab.measure."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import data, measure, models, training


def _toy(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y % classes


def _net(norm=None, seed=0):
    return models.mlp([6, 8, 8, 3], "sigmoid", norm, init_std=0.5, generator=torch.Generator().manual_seed(seed))


def test_train_records_at_chosen_steps_and_is_seeded():
    x, y = _toy()
    runs = []
    for _ in range(2):
        net = _net(bnlib.BatchNorm1d)
        hist = training.train(
            net, x, y, steps=25, batch_size=10, lr=0.5, record_at=[0, 5, 25],
            recorders=[training.test_metrics(x, y)], seed=3,
        )  # fmt: skip
        runs.append(hist)
    h = runs[0]
    assert h.steps == [0, 5, 25]
    assert h["accuracy"].shape == (3,) and h["loss"].shape == (3,)
    assert h.train_loss.shape == (25,)
    np.testing.assert_array_equal(h["loss"], runs[1]["loss"])
    np.testing.assert_array_equal(h.train_loss, runs[1].train_loss)
    assert h["loss"][-1] < h["loss"][0]  # it learns
    assert h.at("loss", 5) == h["loss"][1]
    with pytest.raises(KeyError, match="not recorded"):
        h.at("loss", 6)
    with pytest.raises(KeyError, match="nothing recorded"):
        h["nope"]


def test_recorders_see_the_model_after_s_updates_and_leave_it_alone():
    x, y = _toy()
    seen = []

    def rec(state):
        seen.append((state.step, state.loss, state.model.training, len(state.x)))
        return {"w": state.model[0].weight.sum()}

    net = _net()
    hist = training.train(net, x, y, steps=4, batch_size=12, record_at=[0, 2, 4], recorders=[rec])
    assert [s for s, *_ in seen] == [0, 2, 4]
    assert seen[0][1] is None and all(loss is not None for _, loss, *_ in seen[1:])
    assert all(training_mode for *_, training_mode, _ in seen) and all(n == 12 for *_, n in seen)
    assert hist["w"].shape == (3,)
    # the recorded weight at step 4 is the final weight
    assert math.isclose(float(hist["w"][-1]), float(net[0].weight.detach().sum()), rel_tol=1e-6)


def test_recording_does_not_change_training():
    x, y = _toy()
    probe = training.test_metrics(x, y)
    grads = lambda s: {"g": measure.grad_norms(s.model, s.x, s.y)}  # noqa: E731
    a = training.train(_net(bnlib.BatchNorm1d), x, y, steps=20, batch_size=10, seed=1)
    b = training.train(
        _net(bnlib.BatchNorm1d), x, y, steps=20, batch_size=10, seed=1,
        record_at=training.every(3, 20), recorders=[probe, grads],
    )  # fmt: skip
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    assert b["g"].shape == (len(b.steps), 3)


def test_optimizer_factory_scheduler_and_callbacks():
    x, y = _toy()
    net = _net()
    steps_seen = []
    hist = training.train(
        net, x, y, steps=6, batch_size=20,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        callbacks=[lambda s: steps_seen.append(s.step)],
    )  # fmt: skip
    assert steps_seen == [1, 2, 3, 4, 5, 6] and hist.steps == []
    with pytest.raises(ValueError, match="record_at"):
        training.train(net, x, y, steps=3, batch_size=5, record_at=[4])
    with pytest.raises(ValueError, match="batch_size"):
        training.train(net, x, y, steps=3, batch_size=500)


def test_train_on_given_batches_is_the_seeded_loop_on_those_batches():
    """With batches= the loop trains on exactly those index batches; by default on index_batches(seed)."""
    x, y = _toy()
    order = list(itertools.islice(data.index_batches(120, 10, torch.Generator().manual_seed(3)), 25))
    seen = []
    a, b = _net(bnlib.BatchNorm1d), _net(bnlib.BatchNorm1d)
    ha = training.train(a, x, y, steps=25, batch_size=10, lr=0.5, seed=3)
    hb = training.train(
        b, x, y, batches=order, lr=0.5, record_at=[0, 25], recorders=[lambda s: seen.append((s.step, s.y.clone()))]
    )
    np.testing.assert_array_equal(ha.train_loss, hb.train_loss)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert hb.steps == [0, 25] and hb.train_loss.shape == (25,)
    assert torch.equal(seen[0][1], y[order[0]]) and torch.equal(seen[1][1], y[order[-1]])  # after the end: the last
    with pytest.raises(ValueError, match="not both"):
        training.train(a, x, y, batch_size=10, batches=order)
    with pytest.raises(ValueError, match="number of batches"):
        training.train(a, x, y, steps=3, batches=order)
    with pytest.raises(ValueError, match="empty"):
        training.train(a, x, y, batches=[])
    with pytest.raises(ValueError, match="steps and batch_size"):
        training.train(a, x, y, steps=3)


def test_before_step_runs_between_backward_and_the_update():
    x, y = _toy()
    net, calls = _net(), []
    start = [p.detach().clone() for p in net.parameters()]

    def hook(model):
        calls.append(all(p.grad is not None for p in model.parameters()))
        for p in model.parameters():
            p.grad.zero_()  # nothing left to apply

    hist = training.train(net, x, y, steps=5, batch_size=10, lr=1.0, before_step=hook)
    assert calls == [True] * 5 and hist.train_loss.shape == (5,)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), start))


def test_snapshot_restore_and_preserved():
    x, y = _toy()
    net = _net(bnlib.BatchNorm1d)
    saved = measure.snapshot(net)
    assert set(saved) == set(net.state_dict())
    assert set(measure.snapshot(net, parameters=False)) == {n for n, _ in net.named_buffers()}
    training.train(net, x, y, steps=3, batch_size=10)
    assert not torch.equal(saved["0.weight"], net[0].weight) and int(net[1].num_batches_tracked) == 3
    measure.restore(net, saved)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())
    net.eval()
    with measure.preserved(net, train=True):
        assert net.training
        net(x)  # moves the running statistics
        assert not torch.equal(net[1].running_mean, saved["1.running_mean"])
    assert not net.training and torch.equal(net[1].running_mean, saved["1.running_mean"])
    assert int(net[1].num_batches_tracked) == 0


def test_step_helpers():
    assert training.every(5, 12) == [0, 5, 10, 12]
    steps = training.log_steps(1000, 10)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    with pytest.raises(ValueError):
        training.every(0, 5)


def test_layer_inputs_are_sigmoid_inputs_and_state_is_preserved():
    x, _ = _toy()
    net = _net(bnlib.BatchNorm1d)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    zs = measure.layer_inputs(net, x)
    assert [tuple(z.shape) for z in zs] == [(120, 8), (120, 8)]
    with torch.no_grad():
        net.eval()
        expected = net[1](net[0](x))  # BN output = first sigmoid's input (eval mode)
        net.train()
    torch.testing.assert_close(zs[0], expected)
    zs_train = measure.layer_inputs(net, x, train=True)
    assert abs(float(zs_train[0].mean())) < 1e-5  # batch statistics: beta = 0 at init
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no submodule"):
        measure.layer_inputs(net, x, kind=nn.Conv2d)


def test_percentiles_match_numpy_and_validate():
    z = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = measure.percentiles(z)
    assert p.shape == (3, 4)
    np.testing.assert_allclose(p.numpy(), np.percentile(z.numpy(), [15, 50, 85], axis=0))
    with pytest.raises(ValueError, match="examples, units"):
        measure.percentiles(z[:, 0])
    with pytest.raises(ValueError, match="0..100"):
        measure.percentiles(z, q=(150,))


def test_sigmoid_saturation_threshold():
    z = torch.tensor([[0.0, 2.9], [3.0, -3.0]])
    assert float(measure.sigmoid_saturation(z)) == 0.5  # |z| > log(19) = 2.944
    torch.testing.assert_close(measure.sigmoid_saturation(z, dim=0), torch.tensor([0.5, 0.5]))
    assert float(measure.sigmoid_saturation(z, margin=0.1)) == 0.75  # log(9) = 2.197
    with pytest.raises(ValueError, match="margin"):
        measure.sigmoid_saturation(z, margin=0.5)


def test_grad_norms_and_flat_grad_agree_with_backward():
    x, y = _toy()
    net = _net(bnlib.BatchNorm1d)
    net.eval()  # measurement must still use training mode, and restore eval
    norms = measure.grad_norms(net, x, y)
    flat = measure.flat_grad(net, x, y)
    assert not net.training and all(p.grad is None for p in net.parameters())
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    torch.testing.assert_close(norms, torch.stack([m.weight.grad.norm() for m in linears]))
    torch.testing.assert_close(flat, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))


def test_evaluate_accuracy_and_mode():
    x, y = _toy()
    net = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    loss, acc = measure.evaluate(net, x, y)
    assert acc == pytest.approx(float((y == 2).float().mean()))
    assert loss > 0 and net.training


def test_batch_companion_outputs_vary_with_bn_only():
    x, _ = _toy(n=40)
    companions, _ = _toy(n=100, seed=1)
    plain, bn = _net(), _net(bnlib.BatchNorm1d)
    g = torch.Generator().manual_seed(0)
    out_plain = measure.batch_companion_outputs(plain, x, companions, draws=3, batch_size=16, generator=g)
    before = bn[1].running_mean.clone()
    out_bn = measure.batch_companion_outputs(bn, x, companions, draws=3, batch_size=16, generator=g)
    assert out_plain.shape == out_bn.shape == (3, 40, 3)
    torch.testing.assert_close(out_plain[0], plain(x).detach())  # no BN: companions do not matter
    assert float((out_plain - out_plain[0]).abs().max()) < 1e-6
    assert float(out_bn.std(dim=0).mean()) > 1e-3  # with BN they do
    assert torch.equal(bn[1].running_mean, before) and bn.training
    with pytest.raises(ValueError, match="draws"):
        measure.batch_companion_outputs(bn, x, companions, draws=0, batch_size=16, generator=g)


def test_dead_and_linear_counts_units_by_the_sign_of_their_inputs():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    with torch.no_grad():
        # layer 1: unit 0 always positive, unit 1 never, units 2 and 3 follow the sign of x[:, 0]
        net[0].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([1.0, -1.0, 0.0, 0.0]))
        net[2].weight.zero_()
        net[2].bias.copy_(torch.tensor([-2.0, 3.0]))  # layer 2: one dead unit, one linear unit
    x = torch.tensor([[1.0, 5.0], [-1.0, 5.0], [2.0, -3.0]])
    dead, linear = measure.dead_and_linear(net, x)
    torch.testing.assert_close(dead, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(linear, torch.tensor([0.25, 0.5]))
    # with one example every unit is either dead or linear
    dead1, linear1 = measure.dead_and_linear(net, x[:1])
    torch.testing.assert_close(dead1 + linear1, torch.ones(2))


def test_dead_and_linear_with_bn_uses_batch_statistics_and_leaves_the_model_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 6, generator=g) + 1.0  # all inputs positive and large: plain ReLU units die or go linear
    plain = models.mlp([6, 16, 16, 3], "relu", None, init_std=1.0, generator=torch.Generator().manual_seed(1))
    bn = models.mlp([6, 16, 16, 3], "relu", bnlib.BatchNorm1d, init_std=1.0, generator=torch.Generator().manual_seed(1))
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    dead, linear = measure.dead_and_linear(plain, x)
    assert dead.shape == linear.shape == (2,) and float((dead + linear).min()) > 0
    dead_bn, linear_bn = measure.dead_and_linear(bn, x)  # centred on the batch: every unit sees both signs
    assert float(dead_bn.max()) == 0 and float(linear_bn.max()) == 0
    assert not bn.training and all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no submodule"):
        measure.dead_and_linear(nn.Sequential(nn.Linear(6, 3)), x)
