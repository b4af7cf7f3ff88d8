"""bnlib.lab.experiments.train_vs_inference: the chapter's running averages, the is_grad_enabled
mistake, the statistics error, EMA vs PreciseBN, normalization-batch runs and forward profiles."""

import math

import pytest
import torch
from torch import nn

import bnlib
from bnlib.lab import data, models
from bnlib.lab.data import Split
from bnlib.lab.experiments import train_vs_inference as tvi
from bnlib.norm import fusion
from bnlib.norm import population as pop

torch.set_num_threads(1)


def _values(k=25, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * 2 + 3 for _ in range(k)]


def test_running_averages_match_ema_torch_and_the_cumulative_mean():
    values = _values()
    paths = tvi.running_averages(values, {"fast": 0.1, "slow": 0.01, "cumulative": None})
    for name, momentum in (("fast", 0.1), ("slow", 0.01)):
        assert paths[name].shape == (25, 3)
        for k in (1, 7, 25):  # every row is the running value after k batches
            torch.testing.assert_close(paths[name][k - 1], pop.ema(values[:k], momentum))
    torch.testing.assert_close(paths["cumulative"][-1], torch.stack(values).mean(0))
    torch.testing.assert_close(paths["cumulative"][0], values[0])
    layer = nn.BatchNorm1d(3, momentum=0.1, affine=False)  # the same running mean in torch
    for v in values:
        layer(v + torch.tensor([[-1.0], [1.0]]))  # batch mean v, two examples
    torch.testing.assert_close(paths["fast"][-1], layer.running_mean)


@pytest.mark.parametrize("momentum", [0.5, 0.1, 0.02, None])
def test_running_mean_rms_predicts_simulated_running_means(momentum):
    """Simulated batch means of N(3, 2^2), 4,000 features: the RMS error after each batch is
    the prediction within 5% (a wrong bias or noise term is off by far more)."""
    g = torch.Generator().manual_seed(0)
    m, steps = 16, 60
    means = [(torch.randn(m, 4000, generator=g, dtype=torch.float64) * 2 + 3).mean(0)
             for _ in range(steps)]
    path = tvi.running_averages(means, {"r": momentum})["r"]
    measured = (path - 3.0).pow(2).mean(1).sqrt()
    predicted = tvi.running_mean_rms(momentum, steps, mean=3.0, std=2.0, batch_size=m)
    assert predicted.shape == (steps,)
    assert ((measured / predicted - 1).abs() < 0.05).all()


def test_running_mean_rms_limits():
    """Momentum 1 is the last batch's noise, momentum 0 keeps the start's bias forever."""
    last = tvi.running_mean_rms(1.0, 5, mean=3.0, std=2.0, batch_size=4)
    assert torch.allclose(last, torch.full((5,), 1.0, dtype=torch.float64))
    frozen = tvi.running_mean_rms(0.0, 5, mean=3.0, std=2.0, batch_size=4, start=1.0)
    assert torch.allclose(frozen, torch.full((5,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        tvi.running_mean_rms(-0.1, 5, mean=0.0, std=1.0, batch_size=4)


def test_running_averages_refuse_a_bad_momentum():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tvi.running_averages(_values(), {"bad": 1.5})


def _cnn(seed=0):
    return models.small_cnn(channels=(4, 8), image_size=8, norm=bnlib.BatchNorm2d,
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _warm(model, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, 1, 8, 8, generator=g) * 1.5 + 0.5)
    return model.eval()


def test_grad_mode_layer_switches_on_autograd_not_on_the_module_mode():
    g = torch.Generator().manual_seed(1)
    layer = tvi.GradModeBatchNorm(3)
    layer.running_mean.fill_(0.5)
    layer.running_var.fill_(4.0)
    x = torch.randn(8, 3, generator=g)
    layer.train()
    with torch.no_grad():  # training mode, no gradients: population statistics, no update
        out = layer(x)
    torch.testing.assert_close(out, (x - 0.5) / math.sqrt(4.0 + 1e-5))
    assert torch.equal(layer.running_mean, torch.full((3,), 0.5))
    layer.eval()  # eval mode with gradients: batch statistics, and the buffers move
    out = layer(x)
    reference = nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(layer.running_mean, 0.9 * 0.5 + 0.1 * x.mean(0))
    torch.testing.assert_close(layer.running_var, 0.9 * 4.0 + 0.1 * x.var(0, correction=1))
    with pytest.raises(ValueError, match="2-D or 4-D"):
        layer(torch.randn(4, 3, 5))


def test_with_grad_mode_switch_keeps_parameters_and_buffers():
    net = _warm(_cnn())
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    switched = tvi.with_grad_mode_switch(net)
    assert not pop.batch_norm_layers(switched) and pop.batch_norm_layers(net)
    assert sum(isinstance(m, tvi.GradModeBatchNorm) for m in switched.modules()) == 2
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(switched(x), net(x), rtol=1e-5, atol=1e-5)


def test_grad_mode_effects_on_a_network():
    net = _warm(_cnn())
    effects = tvi.grad_mode_effects(net, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert effects["no_grad gap"] < 1e-5 and effects["reference gap"] < 1e-5
    assert effects["vs eval"] > 0.01 and effects["batch dependence"] > 0.01 and effects["moved"] > 0
    with pytest.raises(ValueError, match="even"):
        tvi.grad_mode_effects(net, torch.randn(3, 1, 8, 8))


def test_normalization_error_formula():
    a, b = _warm(_cnn(), seed=0), _warm(_cnn(), seed=0)
    assert tvi.normalization_error(a, b) == 0.0
    bn_a, bn_b = pop.batch_norm_layers(a), pop.batch_norm_layers(b)
    for layer in bn_b:  # the reference: mean 1, sd 2 (eps included)
        layer.running_mean.fill_(1.0)
        layer.running_var.fill_(4.0 - layer.eps)
    for layer in bn_a:  # judged: mean 0, sd 1
        layer.running_mean.fill_(0.0)
        layer.running_var.fill_(1.0 - layer.eps)
    # per channel: ((1 - 0) / 1)^2 + (2 / 1 - 1)^2 = 2
    assert tvi.normalization_error(a, b) == pytest.approx(math.sqrt(2.0), rel=1e-6)
    with pytest.raises(ValueError, match="same BN layers"):
        tvi.normalization_error(a, nn.Sequential(nn.Linear(2, 2)))


def test_ema_vs_precise_records_and_separates_lag_from_sampling():
    d = data.digits_8x8(images=True, standardize=True)
    d = Split(d.x_train[:320], d.y_train[:320], d.x_test[:64], d.y_test[:64])
    hist = tvi.ema_vs_precise(_cnn(), d, lr=0.3, steps=30, interval=10, seed=0, windows=(16, 4))
    assert hist.steps == [10, 20, 30]
    for key in ("ema", "precise-16", "precise-4", "lag", "sampling-4", "frozen-ema"):
        assert hist[key].shape == (3,) and all(0 <= v for v in hist[key])
    assert all(0 <= v <= 1 for v in hist["ema"])
    # a 4-batch estimate of the frozen statistics is closer than the lagging EMA
    assert all(hist["sampling-4"] < hist["lag"])
    # on frozen weights the running averages forget the lag (0.9^40 of it is left)
    assert all(hist["frozen-ema"] < hist["lag"] / 3)
    without = tvi.ema_vs_precise(_cnn(), d, lr=0.3, steps=10, interval=10, seed=0, windows=(16, 4),
                                 frozen_ema=0)  # fmt: skip
    assert "frozen-ema" not in without and "lag" in without


def _flat_split(n_train=256, n_test=64):
    d = data.digits_8x8(standardize=True)
    return Split(d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_test], d.y_test[:n_test])


def test_normalization_batch_runs_keys_and_pairing():
    split = _flat_split()
    runs = tvi.normalization_batch_runs(split, (2, 8), epochs=1, seed=0, hidden=(16,), test_size=64,
                                        probe_size=64, precise_batches=4)  # fmt: skip
    assert set(runs) == {2, 8}
    keys = {
        "running averages",
        "PreciseBN",
        "batch statistics",
        "running averages loss",
        "PreciseBN loss",
        "batch statistics loss",
        "train loss, PreciseBN",
        "train accuracy, PreciseBN",
        "train loss, batch statistics",
        "train accuracy, batch statistics",
        "PreciseBN, groups of n",
        "inconsistency",
        "inconsistency, trained at max",
    }
    for r in runs.values():
        assert set(r) == keys
        assert all(0 <= r[k] <= 1 for k in ("running averages", "PreciseBN", "batch statistics",
                                            "PreciseBN, groups of n", "train accuracy, batch statistics"))
    # groups of 2 fit the training set worse under their own batch statistics than PreciseBN says
    assert runs[2]["train loss, batch statistics"] > runs[2]["train loss, PreciseBN"]
    # the largest size is its own reference; smaller groups scatter more
    assert runs[8]["inconsistency"] == runs[8]["inconsistency, trained at max"]
    assert runs[2]["inconsistency, trained at max"] > runs[8]["inconsistency, trained at max"]
    again = tvi.normalization_batch_runs(split, (2, 8), epochs=1, seed=0, hidden=(16,), test_size=64,
                                         probe_size=64, precise_batches=4)  # fmt: skip
    assert again == runs  # seeded


def test_recomputation_with_groups_of_the_sgd_batch_size_is_precise_bn():
    """With n equal to the SGD batch size, recomputing with groups of n is PreciseBN itself."""
    runs = tvi.normalization_batch_runs(_flat_split(), (2, 8), epochs=1, seed=0, hidden=(16,), batch_size=8,
                                        test_size=64, probe_size=64, precise_batches=4)  # fmt: skip
    assert runs[8]["PreciseBN, groups of n"] == runs[8]["PreciseBN"]


def test_normalization_batch_runs_refuses_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="divide"):
        tvi.normalization_batch_runs(_flat_split(), (3,), epochs=1, seed=0)


def test_forward_profile_counts_what_folding_removes():
    net = _warm(_cnn())
    before = tvi.forward_profile(net, torch.randn(2, 1, 8, 8))
    folded = fusion.fuse_model(net)
    after = tvi.forward_profile(folded, torch.randn(2, 1, 8, 8))
    # conv 1->4 on 8x8 (9 weights each), conv 4->8 on 4x4 (36 each), linear 8->10
    macs = 4 * 64 * 9 + 8 * 16 * 36 + 10 * 8
    assert before == {"passes": 11, "bn passes": 2, "bn values": 4 * 64 + 8 * 16, "multiply-adds": macs}
    assert after == {"passes": 9, "bn passes": 0, "bn values": 0, "multiply-adds": macs}
