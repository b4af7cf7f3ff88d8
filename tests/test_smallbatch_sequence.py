"""bnlib.lab.experiments: small_batches (training recipe, BN conversion) and recurrent (normalized RNNs)."""

import pytest
import torch

import bnlib
from bnlib import norm
from bnlib.lab import models, training
from bnlib.lab.data import Split, index_batches
from bnlib.lab.experiments import recurrent, small_batches
from bnlib.norm import population

torch.set_num_threads(1)


def _toy(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + torch.nn.functional.one_hot(y, d).float() * 3
    return Split(x[:90], y[:90], x[90:], y[90:])


def test_fit_is_train_with_the_chapter_recipe():
    """fit = the lab's one loop with SGD (momentum, weight decay) and a cosine schedule over the given batches."""
    data = _toy()
    order = list(index_batches(len(data.x_train), 10, torch.Generator().manual_seed(2), epochs=3))
    build = lambda: models.mlp([6, 8, 3], "relu", bnlib.BatchNorm1d, generator=torch.Generator().manual_seed(1))  # noqa: E731
    net = build()
    losses = small_batches.fit(net, data.x_train, data.y_train, order, lr=0.05)
    ref = build()
    hist = training.train(
        ref, data.x_train, data.y_train, batches=order,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(order)),
    )  # fmt: skip
    assert losses.shape == (len(order),) and torch.equal(losses, torch.from_numpy(hist.train_loss))
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_run_takes_its_batches_from_the_one_sampler():
    """run's sorted order is index_batches with labels, seeded by seed + 1: the same as fit on those batches."""
    data = _toy()
    _, net = small_batches.run(data, "batch", sizes=(6, 8, 3), batch_size=10, epochs=2, lr=0.05, order="sorted", seed=4)
    order = list(index_batches(90, 10, torch.Generator().manual_seed(5), epochs=2, labels=data.y_train))
    assert all(len(torch.unique(data.y_train[b])) == 1 for b in order)
    ref = models.mlp([6, 8, 3], "relu", norm.factory("batch"), generator=torch.Generator().manual_seed(4))
    small_batches.fit(ref, data.x_train, data.y_train, order, lr=0.05)
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="order"):
        small_batches.run(data, "batch", order="shuffled")


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
    assert losses.shape == (20 * 4,)
    assert losses[-4:].mean() < 0.5 * losses[:4].mean()


def test_train_rnn_clips_the_gradient_before_each_step():
    """train_rnn = the lab's one loop with Adam and gradient-norm clipping between backward and step."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (70,), generator=g)
    x = torch.randn(70, 5, 3, generator=g) * 5
    build = lambda: recurrent.NormRNN(3, 8, 2, "batch", generator=torch.Generator().manual_seed(1))  # noqa: E731
    rnn, ref = build(), build()
    norms = []

    def clip(model):
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)))

    losses = recurrent.train_rnn(rnn, x, y, epochs=2, batch_size=16, clip=0.1, seed=3)
    order = index_batches(70, 16, torch.Generator().manual_seed(3), epochs=2)
    hist = training.train(ref, x, y, batches=order, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), before_step=clip)
    assert len(norms) == len(losses) == 8 and max(norms) > 0.1  # the clip was active
    assert torch.equal(losses, torch.from_numpy(hist.train_loss))
    for a, b in zip(rnn.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


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


def test_as_batch_norm_keeps_the_layers_precision_and_device():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), norm.GhostBatchNorm(4, ghost_size=2)).double()
    converted = small_batches.as_batch_norm(model)
    bn = converted[1]
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert bn.running_mean.device == model[1].running_mean.device
    x = torch.randn(8, 3, dtype=torch.float64)
    assert torch.equal(converted.eval()(x), model.eval()(x))
