"""bnlib.lab.experiments.benefits: gradient flow, effective rate, model selection, overtraining probes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.lab import measure, models, training
from bnlib.lab.experiments import benefits
from bnlib.lab.seeds import Spread
from bnlib.lab.sweeps import Sweep


def relu_net(depth, norm=None, seed=0, width=32, inputs=20):
    g = torch.Generator().manual_seed(seed)
    return models.he_init_(models.mlp([inputs] + [width] * depth + [5], "relu", norm, generator=g), g)


def batch(n=256, inputs=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_hidden_grad_norms_are_the_gradients_of_the_hidden_outputs():
    net = relu_net(3, bnlib.BatchNorm1d)
    x, y = batch()
    norms = benefits.hidden_grad_norms(net, x, y)
    # by hand: the outputs of the three hidden blocks (Linear, BN, ReLU), then the logits
    hs, h = [], x
    for i in range(3):
        h = net[3 * i + 2](net[3 * i + 1](net[3 * i](h)))
        hs.append(h)
    loss = F.cross_entropy(net[-1](h), y)
    expected = torch.stack([g.norm() for g in torch.autograd.grad(loss, hs)])
    torch.testing.assert_close(norms, expected)


def test_hidden_grad_norms_leave_the_model_untouched():
    net = relu_net(2, bnlib.BatchNorm1d).eval()
    before = measure.snapshot(net)
    benefits.hidden_grad_norms(net, *batch())
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    for name, value in measure.snapshot(net).items():
        torch.testing.assert_close(value, before[name])


def test_growth_per_layer_is_the_geometric_mean_factor_towards_the_input():
    assert benefits.growth_per_layer([8.0, 4.0, 2.0, 1.0]) == pytest.approx(2.0)
    assert benefits.growth_per_layer(torch.tensor([1.0, 3.0, 9.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        benefits.growth_per_layer([1.0])
    with pytest.raises(ValueError):
        benefits.growth_per_layer([1.0, 0.0])


def test_batch_norm_makes_relu_gradients_grow_towards_the_input_plain_he_does_not():
    # Yang et al. (2019): at initialization BN's backward pass multiplies the gradient by more than
    # one per ReLU layer; He initialization alone keeps it level. A wrong BN backward changes this.
    x, y = batch(n=512)
    build = {
        "plain": lambda depth, seed: relu_net(depth, None, seed, width=64),
        "bn": lambda depth, seed: relu_net(depth, bnlib.BatchNorm1d, seed, width=64),
    }
    growth = {k: benefits.gradient_growth(b, [6], x, y, seeds=[0, 1])[6] for k, b in build.items()}
    assert all(v > 1.1 for v in growth["bn"]), growth
    assert all(abs(v - 1) < 0.1 for v in growth["plain"]), growth
    with pytest.raises(ValueError):
        benefits.gradient_growth(build["bn"], [1], x, y, seeds=[0])


def test_sigmoid_slopes_small_weights_sit_in_the_middle_large_ones_saturate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 20, generator=g)
    small = models.mlp([20, 30, 30, 5], "sigmoid", init_std=0.05, generator=g)
    slope, saturated = benefits.sigmoid_slopes(small, x)
    assert slope.shape == saturated.shape == (2,)
    assert float(slope.max()) <= 0.25 and float(slope.min()) > 0.24
    assert float(saturated.max()) == 0.0
    large = models.mlp([20, 30, 30, 5], "sigmoid", init_std=3.0, generator=g)
    slope, saturated = benefits.sigmoid_slopes(large, x)
    assert float(slope.max()) < 0.15 and float(saturated.min()) > 0.5


def test_effective_lr_recorder_records_eta_over_squared_row_norm_at_the_given_steps():
    net = relu_net(2, bnlib.BatchNorm1d)
    x, y = batch()
    w0 = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)][:2]  # the invariant ones
    hist = training.train(net, x, y, steps=3, batch_size=32, lr=0.5, record_at=[0, 1, 3],
                          recorders=[benefits.effective_lr_recorder(at=[0, 3])])  # fmt: skip
    assert hist.steps == [0, 1, 3] and len(hist.records["effective_lr"]) == 2
    expected = [float((0.5 / w.norm(dim=1) ** 2).median()) for w in w0]
    np.testing.assert_allclose(hist.records["effective_lr"][0], expected, rtol=1e-6)
    assert (hist.records["effective_lr"][1] < hist.records["effective_lr"][0]).all()  # the weights grew
    with pytest.raises(ValueError):
        benefits.effective_lr_recorder(at=[0])(training.TrainState(0, relu_net(2), None, x, y, None))


def test_relative_first_step_is_the_size_of_one_sgd_update():
    net = relu_net(2)
    x, y = batch()
    ratio = benefits.relative_first_step(net, x, y, lr=0.3)
    before = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    after = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    expected = torch.stack([(a - b).norm() / b.norm() for a, b in zip(after, before)])
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=0)


def test_first_nonfinite_counts_updates_from_one():
    assert benefits.first_nonfinite([1.0, 2.0, float("inf"), float("nan")]) == 3
    assert benefits.first_nonfinite(np.array([float("nan")])) == 1
    with pytest.raises(ValueError):
        benefits.first_nonfinite([1.0, 2.0])


def fake_sweep(val, test):
    """A Sweep over two learning rates, two seeds and three records with the given accuracies."""
    val, test = np.asarray(val, float), np.asarray(test, float)
    histories = [[training.History(steps=[0, 10, 20], records={"val_accuracy": list(val[s, v])}) for v in range(2)]
                 for s in range(2)]  # fmt: skip
    return Sweep(values=np.array([0.1, 1.0]), seeds=[0, 1], steps=[0, 10, 20], accuracy=test, loss=test * 0,
                 train_loss=np.zeros((2, 2, 20)), histories=histories)  # fmt: skip


def test_select_by_validation_picks_the_best_validation_checkpoint_not_the_best_test():
    val = [[[0.1, 0.5, 0.6], [0.1, 0.7, 0.2]], [[0.1, 0.9, 0.9], [0.1, 0.3, 0.4]]]
    test = [[[0.1, 0.9, 0.5], [0.1, 0.6, 0.95]], [[0.1, 0.8, 0.7], [0.1, 0.99, 0.4]]]
    choice = benefits.select_by_validation(fake_sweep(val, test))
    assert choice.value.values == (1.0, 0.1)
    assert choice.step.values == (10.0, 10.0)  # a tie goes to the earlier step
    assert choice.test.values == (0.6, 0.8) and choice.validation.values == (0.7, 0.9)
    only_small = benefits.select_by_validation(fake_sweep(val, test), values=[0.1])
    assert only_small.value.values == (0.1, 0.1) and only_small.test.values == (0.5, 0.8)
    assert isinstance(choice.test, Spread)


def test_with_dropout_adds_dropout_after_every_activation_and_nothing_in_eval_mode():
    net = relu_net(3)
    dropped = benefits.with_dropout(net, 0.3)
    assert sum(isinstance(m, nn.Dropout) for m in dropped) == 3
    assert isinstance(dropped[2], nn.Dropout) and dropped[0] is net[0]
    x, _ = batch()
    torch.testing.assert_close(dropped.eval()(x), net.eval()(x))
    with pytest.raises(ValueError):
        benefits.with_dropout(net, 1.0)


def test_logit_metrics_agree_with_evaluate_and_measure_the_logits():
    net = relu_net(2, bnlib.BatchNorm1d)
    x, y = batch()
    training.train(net, x, y, steps=2, batch_size=32)
    out = benefits.logit_metrics(x, y, prefix="t_")(training.TrainState(2, net, None, x, y, None))
    loss, acc = measure.evaluate(net, x, y)
    assert out["t_loss"] == pytest.approx(loss) and out["t_accuracy"] == pytest.approx(acc)
    with torch.no_grad():
        rms = float(net.eval()(x).pow(2).mean().sqrt())
    assert out["t_logit_rms"] == pytest.approx(rms, rel=1e-6)


def test_overfit_run_records_and_is_reproducible_without_touching_the_global_rng():
    x, y = batch(n=64)
    xt, yt = batch(n=32, seed=1)
    torch.manual_seed(123)
    expected_next = torch.rand(())
    runs = []
    for _ in range(2):
        net = benefits.with_dropout(relu_net(2, seed=4), 0.5)  # dropout masks come from the run's seed
        torch.manual_seed(123)
        runs.append(benefits.overfit_run(net, x, y, xt, yt, steps=6, seed=7, batch_size=16, record_every=3))
        assert torch.rand(()) == expected_next  # the caller's global stream is where it was
    assert runs[0].steps == [0, 3, 6]
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])
    assert len(runs[0].records["train_accuracy"]) == 1 and len(runs[0]["logit_rms"]) == 3


def test_batch_statistics_noise_follows_one_over_root_b_for_independent_examples():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 40, generator=g) * 3 + 5
    mean_noise, var_noise = benefits.batch_statistics_noise(z, [4, 16, 64], draws=400, generator=g)
    np.testing.assert_allclose(mean_noise, [1 / math.sqrt(b) for b in (4, 16, 64)], rtol=0.1)
    # Gaussian: the biased batch variance has std sigma^2 sqrt(2 (b - 1)) / b
    np.testing.assert_allclose(var_noise, [math.sqrt(2 * (b - 1)) / b for b in (4, 16, 64)], rtol=0.1)
    with pytest.raises(ValueError):
        benefits.batch_statistics_noise(z, [1], draws=10, generator=g)


def test_first_update_matches_one_sgd_step_and_the_recorded_effective_rate():
    net = relu_net(2, bnlib.BatchNorm1d)
    x, y = batch()
    relative, kept = benefits.first_update(net, x, y, lr=2.0)
    torch.testing.assert_close(relative, benefits.relative_first_step(net, x, y, lr=2.0))
    # the same step taken by SGD, the effective rate recorded before and after it
    hist = training.train(net, x, y, batches=[torch.arange(len(x))], lr=2.0, record_at=[0, 1],
                          recorders=[benefits.effective_lr_recorder(at=[0, 1])])  # fmt: skip
    before, after = hist.records["effective_lr"]
    np.testing.assert_allclose(kept.numpy(), after / before, rtol=1e-5)
    assert (kept < 1).all()  # the step lengthens the invariant rows: the rate falls
    with pytest.raises(ValueError):
        benefits.first_update(relu_net(2), x, y, lr=1.0)  # no scale-invariant weight


def test_steps_to_and_trains_read_the_validation_accuracy_not_the_test_accuracy():
    val = [[[0.1, 0.5, 0.6], [0.1, 0.7, 0.2]], [[0.1, 0.4, 0.9], [0.1, 0.3, 0.4]]]
    test = [[[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]], [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]]]
    sweep = fake_sweep(val, test)
    np.testing.assert_array_equal(benefits.steps_to(sweep, 0.55), [[20.0, 10.0], [20.0, np.nan]])
    np.testing.assert_array_equal(benefits.trains(sweep, 0.5), [[True, True], [True, False]])
    np.testing.assert_array_equal(benefits.largest_trained(sweep, 0.5), [1.0, 0.1])
    sweep.train_loss[0, 1, -1] = np.nan  # a diverged run does not train, whatever its accuracy
    assert not benefits.trains(sweep, 0.5)[0, 1]
    assert np.isnan(benefits.largest_trained(sweep, 0.95)).all()
    with pytest.raises(KeyError):
        benefits.steps_to(sweep, 0.5, key="missing_accuracy")


def test_scale_weights_makes_a_plain_relu_gradient_explode_and_leaves_bn_growth_unchanged():
    # ReLU is positively homogeneous: weights c times He make the plain gradient grow about c per
    # layer; BN's hidden weights are scale-invariant, so its factor hardly moves. A scale_weights_
    # that missed layers, or touched the biases, would break the first or the last check.
    x, y = batch(n=512)

    def scaled(norm, factor):
        return lambda depth, seed: benefits.scale_weights_(relu_net(depth, norm, seed, width=64), factor)

    growth = benefits.gradient_growth(scaled(None, 2.0), [6], x, y, seeds=[0, 1])[6]
    assert all(1.7 < v < 2.3 for v in growth), growth
    bn_growth = {
        c: benefits.gradient_growth(scaled(bnlib.BatchNorm1d, c), [6], x, y, seeds=[0, 1])[6] for c in (1.0, 2.0)
    }
    # only the (not scale-invariant) output layer's larger logits move it, by under 2%
    np.testing.assert_allclose(list(bn_growth[2.0]), list(bn_growth[1.0]), rtol=0.02)
    net = relu_net(2, None)
    biases = [m.bias.clone() for m in net if isinstance(m, nn.Linear)]
    benefits.scale_weights_(net, 3.0)
    for b, m in zip(biases, [m for m in net if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(m.bias, b)
    with pytest.raises(ValueError):
        benefits.scale_weights_(net, 0.0)


def test_finite_population_factor_matches_sampling_without_replacement():
    # the std of a batch mean drawn without replacement from N values, against the factor
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 400, generator=g)
    mean_noise, _ = benefits.batch_statistics_noise(z, [100], draws=400, generator=g)
    expected = benefits.finite_population_factor(200, 100) / math.sqrt(100)
    assert benefits.finite_population_factor(200, 100) < 0.72  # far from 1: the test can fail
    assert abs(mean_noise[0] / expected - 1) < 0.05, (mean_noise, expected)
    assert benefits.finite_population_factor(500, 1) == 1.0
    with pytest.raises(ValueError):
        benefits.finite_population_factor(10, 11)


def test_test_at_validation_best_gives_the_same_choice_with_fewer_test_evaluations():
    from bnlib.lab import data, sweeps

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 10, generator=g), torch.randint(0, 3, (400,), generator=g)
    y = torch.where(x[:, 0] > 0.5, 0, torch.where(x[:, 1] > 0, 1, 2))  # learnable
    split = data.Split(x[:200], y[:200], x[300:], y[300:])
    x_val, y_val = x[200:300], y[200:300]

    def build(seed):
        return models.mlp([10, 16, 3], "relu", bnlib.BatchNorm1d, generator=torch.Generator().manual_seed(seed))

    kw = dict(steps=30, batch_size=20, record_every=3)
    full = sweeps.lr_sweep(build, [0.05, 0.5, 5.0], [0, 1], split, **kw,
                           recorders=[training.test_metrics(x_val, y_val, prefix="val_")])
    rec = benefits.test_at_validation_best(x_val, y_val, split.x_test, split.y_test)
    lazy = sweeps.lr_sweep(build, [0.05, 0.5, 5.0], [0, 1], split, **kw, record_test=False, recorders=[rec])
    assert np.array_equal(benefits.steps_to(lazy, 0.6), benefits.steps_to(full, 0.6), equal_nan=True)
    for values in (None, [0.05], [0.5], [5.0]):
        a, b = (benefits.select_by_validation(sw, values=values) for sw in (full, lazy))
        assert a.test.values == b.test.values and a.step.values == b.step.values
        assert a.value.values == b.value.values
    skipped = np.isnan(lazy.accuracy)
    assert skipped.any() and not np.isnan(lazy.accuracy[:, :, 0]).any()  # step 0: always
    assert np.array_equal(lazy.accuracy[~skipped], full.accuracy[~skipped])
