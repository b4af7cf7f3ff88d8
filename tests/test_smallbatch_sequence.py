"""bnlib.lab.experiments: small_batches (batch orders, training, BN conversion) and recurrent (normalized RNNs)."""

import pytest
import torch

import bnlib
from bnlib import norm
from bnlib.lab.data import Split
from bnlib.lab.experiments import recurrent, small_batches
from bnlib.norm import population

torch.set_num_threads(1)


def _toy(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + torch.nn.functional.one_hot(y, d).float() * 3
    return Split(x[:90], y[:90], x[90:], y[90:])


def test_class_sorted_batches_hold_one_class_and_cover_the_data():
    y = torch.arange(100) % 4
    batches = small_batches.class_sorted_batches(y, 5, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 2 * 4 * 5
    assert all(len(torch.unique(y[b])) == 1 and len(b) == 5 for b in batches)
    assert sorted(torch.cat(batches[:20]).tolist()) == list(range(100))  # one epoch, every example once
    with pytest.raises(ValueError):
        small_batches.class_sorted_batches(y, 0, 1, torch.Generator())


def test_iid_batches():
    batches = small_batches.iid_batches(10, 3, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    with pytest.raises(ValueError):
        small_batches.iid_batches(10, 11, 1, torch.Generator())


@pytest.mark.parametrize("method", [None, "batch", "group", "layer"])
def test_run_learns_an_easy_problem_and_is_deterministic(method):
    data = _toy()
    kw = {"num_groups": 4} if method == "group" else {}
    err1, _ = small_batches.run(data, method, sizes=(6, 8, 3), batch_size=10, epochs=5, lr=0.05, **kw)
    err2, _ = small_batches.run(data, method, sizes=(6, 8, 3), batch_size=10, epochs=5, lr=0.05, **kw)
    assert err1 == err2 and err1 < 0.2


def test_as_batch_norm_keeps_evaluation_and_allows_recomputation():
    data = _toy()
    _, model = small_batches.run(data, "ghost", sizes=(6, 8, 3), batch_size=10, epochs=2, lr=0.05, ghost_size=2)
    model.eval()
    converted = small_batches.as_batch_norm(model).eval()
    assert not any(isinstance(m, norm.BatchRenorm) for m in converted.modules())
    torch.testing.assert_close(converted(data.x_test), model(data.x_test))
    population.recompute_statistics(converted, data.x_train.split(30))
    bn = population.batch_norm_layers(converted)[0]
    h = model[0](data.x_train)  # the first BN layer's input over the training set
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", recurrent.NORMS)
def test_norm_rnn_shapes_and_lengths(kind):
    rnn = recurrent.NormRNN(5, 7, 3, kind, max_steps=4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 4, 5)
    assert rnn(x).shape == (6, 3)
    assert rnn(recurrent.prepend_blank(x, 3)).shape == (6, 3)  # longer than max_steps
    expected = {"none": 0, "batch": 1, "batch_per_step": 4, "layer": 1}[kind]
    assert len(rnn.norms) == expected
    with pytest.raises(ValueError):
        rnn(torch.randn(6, 5))


def test_norm_rnn_layer_norm_ignores_the_batch():
    rnn = recurrent.NormRNN(5, 7, 3, "layer", generator=torch.Generator().manual_seed(0)).train()
    x = torch.randn(6, 4, 5)
    torch.testing.assert_close(rnn(x)[:2], rnn(x[:2]))


def test_error_rate_leaves_running_statistics_alone():
    rnn = recurrent.NormRNN(5, 7, 3, "batch", generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(20, 4, 5), torch.randint(0, 3, (20,))
    before = rnn.norms[0].running_mean.clone()
    recurrent.error_rate(rnn, x, y, batch_statistics=True, batch_size=10)
    torch.testing.assert_close(rnn.norms[0].running_mean, before)
    assert rnn.training


def test_train_rnn_reduces_the_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (128,), generator=g)
    x = torch.randn(128, 5, 3, generator=g) + y.view(-1, 1, 1).float() * 2
    rnn = recurrent.NormRNN(3, 8, 2, "layer", generator=g)
    losses = recurrent.train_rnn(rnn, x, y, epochs=20, batch_size=32)
    assert losses[-4:].mean() < 0.5 * losses[:4].mean()


def test_helpers():
    assert recurrent.real_per_step(torch.tensor([1, 3, 3]), 4).tolist() == [3, 2, 2, 0]
    images = torch.rand(2, 1, 8, 8)
    assert recurrent.rows_as_sequences(images, pool=2).shape == (2, 4, 4)
    assert recurrent.prepend_blank(torch.ones(2, 3, 4), 2)[:, :2].abs().sum() == 0
    with pytest.raises(ValueError):
        recurrent.rows_as_sequences(torch.rand(2, 8, 8))
    assert isinstance(bnlib.BatchNorm1d(3), torch.nn.Module)


@pytest.mark.parametrize("kind", ["batch", "batch_per_step"])
def test_norm_rnn_with_torch_batch_norm_computes_the_same(kind):
    ours = recurrent.NormRNN(5, 7, 3, kind, max_steps=4, generator=torch.Generator().manual_seed(0)).double()
    theirs = recurrent.NormRNN(5, 7, 3, kind, max_steps=4, generator=torch.Generator().manual_seed(0),
                              batch_norm=torch.nn.BatchNorm1d).double()
    assert all(isinstance(m, torch.nn.BatchNorm1d) for m in theirs.norms)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(theirs(x), ours(x))  # training mode: batch statistics
    for a, b in zip(theirs.norms, ours.norms):
        torch.testing.assert_close(a.running_var, b.running_var)
    torch.testing.assert_close(theirs.eval()(x), ours.eval()(x))  # evaluation: the running averages


def test_norm_rnn_with_torch_layer_norm_computes_the_same():
    ours = recurrent.NormRNN(5, 7, 3, "layer", generator=torch.Generator().manual_seed(0)).double()
    theirs = recurrent.NormRNN(5, 7, 3, "layer", generator=torch.Generator().manual_seed(0),
                              layer_norm=torch.nn.LayerNorm).double()
    assert isinstance(theirs.norms[0], torch.nn.LayerNorm)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(theirs(x), ours(x))
