"""bnlib.lab.experiments.covariate_shift: the internal-covariate-shift chapter's experiments."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import models
from bnlib.lab.data import Split
from bnlib.lab.experiments import covariate_shift as cs


def _split(n_train=240, n_test=120, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, d, generator=g)
    y = (x[:, :4].sum(1) > 2).long() + (x[:, 4] > 0.7).long()
    return Split(x[:n_train], y[:n_train] % classes, x[n_train:], y[n_train:] % classes)


def test_gd_path_converges_at_once_on_a_round_problem_and_slowly_on_a_stretched_one():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    X = (X - X.mean(0)) / X.std(0)
    X = X @ np.linalg.inv(np.linalg.cholesky(X.T @ X / len(X))).T  # exactly whitened: H = I
    y = X @ np.array([2.0, -1.0])
    round_ = cs.gd_path(X, y, steps=5)
    assert round_.kappa == pytest.approx(1.0)
    assert round_.excess[0] == 1.0 and round_.steps_to_tol == 1  # step 1/L with H = I lands on w*
    np.testing.assert_allclose(round_.w_star, [2.0, -1.0])
    stretched = cs.gd_path(X * np.array([1.0, 0.01]), y, steps=200)
    assert stretched.kappa == pytest.approx(1e4, rel=1e-6)
    assert stretched.steps_to_tol is None and stretched.remaining > 0.1
    assert np.all(np.diff(stretched.excess) <= 0)  # step 1/L never increases the loss
    assert stretched.path.shape == (201, 2)


def test_hessian_condition():
    X = np.array([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -3.0]])
    assert cs.hessian_condition(X) == pytest.approx(9.0)


def test_sigmoid_mlp_before_matches_models_mlp_and_after_reverses_the_block():
    for norm in (None, bnlib.BatchNorm1d):
        ours = cs.sigmoid_mlp(norm, seed=3, sizes=(12, 8, 8, 3))
        g = torch.Generator().manual_seed(3)
        ref = models.mlp([12, 8, 8, 3], "sigmoid", norm, init_std=cs.PAPER_STD, generator=g)
        assert [type(m) for m in ours] == [type(m) for m in ref]
        for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = cs.sigmoid_mlp(bnlib.BatchNorm1d, seed=3, placement="after", sizes=(12, 8, 8, 3))
    assert [type(m) for m in after] == [nn.Linear, nn.Sigmoid, bnlib.BatchNorm1d] * 2 + [nn.Linear]
    assert all(m.bias is not None for m in after if isinstance(m, nn.Linear))
    with pytest.raises(ValueError):
        cs.sigmoid_mlp(placement="between")


def test_sigmoid_glorot_initialization_has_the_promised_scale():
    net = cs.sigmoid_mlp(None, seed=0, init="sigmoid-glorot", sizes=(784, 100, 10))
    hidden, out = [m for m in net if isinstance(m, nn.Linear)]
    assert float(hidden.weight.detach().std()) == pytest.approx(4 * math.sqrt(2 / 884), rel=0.02)
    assert float(out.weight.detach().std()) == pytest.approx(math.sqrt(2 / 110), rel=0.1)
    assert float(hidden.bias.detach().abs().max()) == 0


def test_summaries_of_recordings():
    p = np.zeros((3, 3, 2))
    p[0] = [[-1, -2], [0, 0], [1, 2]]  # (q, unit) at the first step
    p[-1] = [[-3, -2], [1, -1], [3, 2]]
    np.testing.assert_allclose(cs.band_growth(p), [3.0, 1.0])
    np.testing.assert_allclose(cs.band_widening(p), [4.0, 0.0])  # 6 - 2, 4 - 4
    assert cs.median_move(p) == 1.0
    stds = np.ones((2, 2, 3))
    stds[1, 0] = [2, 4, 8]
    np.testing.assert_allclose(cs.std_growth(stds), [4.0, 1.0])
    means = np.zeros((2, 2, 3))
    means[1, 1] = [0.5, -1, 3]
    np.testing.assert_allclose(cs.mean_drift(means, stds), [0.0, 1.0])


def test_mnist_run_records_per_layer_and_bn_sigmoid_input_spread_is_gamma():
    split = _split()
    net = cs.sigmoid_mlp(bnlib.BatchNorm1d, seed=0, sizes=(12, 16, 16, 3))
    r = cs.mnist_run(net, split, steps=30, seed=0, record_at=[0, 10, 30], frame_steps=[0, 30], frame_examples=50,
                     probe=60, lr=0.5, batch_size=20)
    h = r["hist"]
    assert h.steps == [0, 10, 30]
    assert h["sig_std"].shape == (3, 2, 16) and h["gamma"].shape == (3, 2, 16)
    assert h["percentiles"].shape == (3, 3, 16) and r["frames"][30].shape == (2, 50, 16)
    assert not np.allclose(h["gamma"][-1], 1.0)  # gamma trains
    # with BN the sigmoid input is gamma * xhat + beta, so its spread over the batch is |gamma| (up to eps)
    eps = net[1].eps
    expected = np.abs(h["gamma"]) * h["bn_std"] / np.sqrt(h["bn_std"] ** 2 + eps)
    np.testing.assert_allclose(h["sig_std"], expected, rtol=1e-4)
    assert r["train_stats"]["std"].shape == (2, 16) and r["grad_end"].shape == (3,)
    plain = cs.mnist_run(cs.sigmoid_mlp(None, seed=0, sizes=(12, 16, 16, 3)), split, steps=5, seed=0,
                         record_at=[0, 5], batch_size=20)
    assert "gamma" not in plain["hist"] and "sigma_b0" not in plain
    quiet = cs.mnist_run(cs.sigmoid_mlp(None, seed=0, sizes=(12, 16, 16, 3)), split, steps=5, seed=0,
                         record_at=[5], detail=False, batch_size=20)
    assert "sig_std" not in quiet["hist"] and quiet["hist"]["accuracy"].shape == (1,)


def test_dead_rows_gradient_is_zero_for_dead_units():
    split = _split()
    net = models.mlp([12, 6, 3], "relu", init_std=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net[0].weight[:2] = -net[0].weight[:2].abs()  # inputs are positive: units 0 and 1 are dead
        net[0].bias.zero_()
    dead, grad = cs.dead_rows_gradient(net, split.x_test, split.y_test)
    assert dead >= 2 and grad == 0.0


def test_relu_units_run_counts_fractions_per_layer():
    split = _split()
    r = cs.relu_units_run(split, None, seed=0, steps=3, shift=1.0)
    dead, linear = r[1.0]["before"]
    assert dead.shape == linear.shape == (3,) and np.all((dead >= 0) & (dead <= 1))
    assert set(r) == {0.0, 1.0} and 0 <= r[1.0]["acc"] <= 1


def _trained_bn_net(split, eps=1e-5, placement="before"):
    norm = lambda c: bnlib.BatchNorm1d(c, eps=eps)  # noqa: E731
    net = cs.sigmoid_mlp(norm, seed=1, placement=placement, sizes=(12, 16, 16, 3))
    cs.mnist_run(net, split, steps=40, seed=0, record_at=[40], detail=False, lr=0.5, batch_size=20)
    return net


def test_adabn_undoes_a_positive_affine_change_up_to_eps_and_a_negative_one_not():
    split = _split()
    net = _trained_bn_net(split)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = cs.affine_shift_study(net, split, scale=0.5, offset=0.25, batch_size=20)
    for k, v in net.state_dict().items():  # the study works on copies
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert s["same_predictions"] and s["AdaBN"] == s["recomputed"]
    assert s["eps"] == 1e-5 and s["first_var_min"] > 0
    # the only difference is eps / scale^2 in place of eps: first-layer xhat changes by a relative
    # eps (1 / scale^2 - 1) / (2 var) at most, which bounds the logit gap up to a small factor
    assert s["logit_gap"] < 10 * s["eps"] * 3 / (2 * s["first_var_min"])
    flipped = cs.affine_shift_study(net, split, scale=-0.5, offset=0.75, batch_size=20)
    assert flipped["logit_gap"] > 1e-2  # x -> -x flips the sign of every first-layer xhat


def test_adabn_is_exact_in_float64_as_eps_vanishes():
    split = _split()
    split64 = Split(split.x_train.double(), split.y_train, split.x_test.double(), split.y_test)
    net = _trained_bn_net(split, eps=1e-14).double()
    s = cs.affine_shift_study(net, split64, scale=0.5, offset=0.25, batch_size=20)
    assert s["logit_gap"] < 1e-10


def test_adabn_is_not_exact_when_the_first_layer_has_no_bn():
    split = _split()
    net = _trained_bn_net(split, placement="after")
    s = cs.affine_shift_study(net, split, scale=0.5, offset=0.25, batch_size=20)
    assert s["logit_gap"] > 1e-3  # the sigmoid between Linear and BN is not affine
