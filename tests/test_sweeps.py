"""bnlib.lab.sweeps (learning-rate and initialization sweeps) and bnlib.lab.models.he_init_."""

import numpy as np
import pytest
import torch

import bnlib
from bnlib.lab import models, sweeps
from bnlib.lab.data import Split
from bnlib.lab.seeds import default_seeds


def _split(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Split(x[:200], y[:200], x[200:], y[200:])


def _build(seed, norm=None, std=None):
    return models.mlp([6, 16, 3], "relu", norm, init_std=std, generator=torch.Generator().manual_seed(seed))


def test_lr_sweep_shapes_and_determinism():
    split = _split()
    a = sweeps.lr_sweep(_build, [0.01, 0.5, 1e4], [0, 1], split, steps=40, batch_size=20, record_every=10)
    assert a.accuracy.shape == (2, 3, 5) and a.loss.shape == (2, 3, 5) and a.train_loss.shape == (2, 3, 40)
    assert a.steps == [0, 10, 20, 30, 40]
    b = sweeps.lr_sweep(_build, [0.01, 0.5, 1e4], [0, 1], split, steps=40, batch_size=20, record_every=10)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    # same seed, same start: the initial accuracy does not depend on the learning rate
    assert np.all(a.accuracy[:, :, 0] == a.accuracy[:, :1, 0])
    assert a.trained(0.5)[:, 1].all()  # lr 0.5 learns this easy task
    assert not a.trained(0.5)[:, 2].any()  # lr 1e4 blows up
    np.testing.assert_array_equal(a.largest_trained(0.5), [0.5, 0.5])


def test_steps_to_and_best_accuracy():
    s = sweeps.Sweep(
        values=np.array([1.0, 2.0]),
        seeds=[0],
        steps=[0, 10, 20],
        accuracy=np.array([[[0.1, 0.6, 0.9], [0.1, 0.2, 0.3]]]),
        loss=np.zeros((1, 2, 3)),
        train_loss=np.array([[[1.0, 0.5], [1.0, np.nan]]]),
        histories=[[None, None]],
    )
    np.testing.assert_array_equal(s.steps_to(0.5), [[10.0, np.nan]])
    np.testing.assert_array_equal(s.best_accuracy(), [[0.9, 0.3]])
    np.testing.assert_array_equal(s.trained(0.25), [[True, False]])  # NaN final loss: not trained
    np.testing.assert_array_equal(s.largest_trained(0.95), [np.nan])


def test_init_sweep_passes_the_scale_and_extra_recorders():
    seen = []

    def build(std, seed):
        seen.append((std, seed))
        return _build(seed, bnlib.BatchNorm1d, std)

    def first_weight_std(state):
        return {"w_std": float(state.model[0].weight.detach().std())}

    out = sweeps.init_sweep(build, [1e-3, 1.0], [3], _split(), lr=0.1, steps=5, batch_size=50, record_every=5,
                            recorders=[first_weight_std], record_at=[2])  # fmt: skip
    assert seen == [(1e-3, 3), (1.0, 3)]
    assert out.steps == [0, 2, 5]
    w0 = [h["w_std"][0] for h in out.histories[0]]
    assert w0[0] < 0.01 < 0.5 < w0[1]


def test_bad_input():
    split = _split()
    with pytest.raises(ValueError, match="positive"):
        sweeps.lr_sweep(_build, [0.1, -1.0], [0], split, steps=5)
    with pytest.raises(ValueError, match="at least one"):
        sweeps.lr_sweep(_build, [], [0], split, steps=5)
    with pytest.raises(ValueError, match="steps"):
        sweeps.lr_sweep(_build, [0.1], [0], split, steps=0)
    with pytest.raises(ValueError, match="scales"):
        sweeps.init_sweep(lambda s, seed: _build(seed), [0.0], [0], split, lr=0.1, steps=5)
    with pytest.raises(ValueError, match="lr"):
        sweeps.init_sweep(lambda s, seed: _build(seed), [0.1], [0], split, lr=0.0, steps=5)


def test_he_init_variance():
    net = models.mlp([400, 300, 10], "relu", bnlib.BatchNorm1d)
    models.he_init_(net, torch.Generator().manual_seed(0))
    assert abs(float(net[0].weight.detach().std()) - (2 / 400) ** 0.5) < 0.02 * (2 / 400) ** 0.5
    assert abs(float(net[-1].weight.detach().std()) - (2 / 300) ** 0.5) < 0.1 * (2 / 300) ** 0.5
    assert float(net[-1].bias.detach().abs().max()) == 0.0
    assert float(net[1].weight.detach().min()) == 1.0  # normalization layers are left alone
    cnn = models.he_init_(models.small_cnn(channels=(8,)), torch.Generator().manual_seed(0))
    assert abs(float(cnn[0].weight.detach().std()) - (2 / 9) ** 0.5) < 0.3 * (2 / 9) ** 0.5


def test_spread_of_one_setting_and_of_a_per_seed_summary():
    s = sweeps.Sweep(
        values=np.array([0.1, 0.3]),
        seeds=[4, 7],
        steps=[0, 10],
        accuracy=np.array([[[0.1, 0.8], [0.1, 0.6]], [[0.1, 0.9], [0.1, 0.2]]]),
        loss=np.zeros((2, 2, 2)),
        train_loss=np.ones((2, 2, 3)),
        histories=[[None, None], [None, None]],
    )
    acc = s.spread(s.best_accuracy(), 0.3)
    assert acc.values == (0.6, 0.2) and acc.seeds == (4, 7)
    assert s.index(0.1) == 0 and s.index(0.3) == 1
    largest = s.spread(s.largest_trained(0.5))
    assert largest.values == (0.3, 0.1) and largest.seeds == (4, 7)
    with pytest.raises(ValueError, match="not swept"):
        s.spread(s.best_accuracy(), 1.0)
    with pytest.raises(ValueError, match="needs the swept value"):
        s.spread(s.best_accuracy())
    with pytest.raises(ValueError, match="expected shape"):
        s.spread(s.largest_trained(0.5), 0.1)


def test_default_seeds_and_seeded_global_rng(monkeypatch):
    monkeypatch.delenv("BNBOOK_SCALE", raising=False)

    def build(seed):  # dropout draws its masks from the global RNG
        net = _build(seed)
        return torch.nn.Sequential(net[0], torch.nn.Dropout(0.5), *net[1:])

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sweeps.lr_sweep(build, [0.5], None, _split(), steps=20, batch_size=20, record_every=10)
    assert a.seeds == default_seeds() == [0, 1, 2]
    assert torch.equal(torch.get_rng_state(), state), "the caller's global RNG is left as it was"
    torch.manual_seed(999)  # another global state: the sweep does not depend on it
    b = sweeps.lr_sweep(build, [0.5], [0, 1, 2], _split(), steps=20, batch_size=20, record_every=10)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    assert not np.array_equal(a.train_loss[0], a.train_loss[1]), "seeds are different repetitions"
