"""bnlib.lab.data and bnlib.lab.models."""

import pytest
import torch

import bnlib
from bnlib.lab import data, models


@pytest.mark.slow
def test_mnist_5k_is_shuffled_split_and_scaled():
    d = data.mnist_5k(test_size=1000, seed=0)
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784)
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    assert len(torch.unique(d.y_test)) == 10 and d.num_classes == 10
    assert len(torch.unique(d.y_train[:50])) > 5  # not sorted by class
    again = data.mnist_5k(test_size=1000, seed=0)
    assert torch.equal(d.x_train, again.x_train)


def test_digits_images_and_options():
    d = data.digits_8x8(images=True, standardize=True)
    assert d.x_train.shape[1:] == (1, 8, 8)
    assert abs(float(d.x_train.mean())) < 1e-5
    b = data.digits_8x8(binarize=True)
    assert set(torch.unique(b.x_train).tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="binarize or standardize"):
        data.digits_8x8(binarize=True, standardize=True)
    with pytest.raises(ValueError, match="test_size"):
        data.digits_8x8(test_size=0)


def test_batches_cover_an_epoch():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    seen = torch.cat([yb for _, yb in data.batches(x, y, 3, torch.Generator().manual_seed(0), drop_last=False)])
    assert sorted(seen.tolist()) == list(range(10))
    assert all(len(yb) == 3 for _, yb in data.batches(x, y, 3, torch.Generator().manual_seed(0)))


def test_index_batches_are_one_randperm_per_epoch():
    """Each epoch is torch.randperm(n) from the generator, cut in order; the last partial batch dropped or kept."""
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    got = list(data.index_batches(10, 3, g, epochs=2))
    perms = [torch.randperm(10, generator=ref) for _ in range(2)]
    expected = [p[i : i + 3] for p in perms for i in (0, 3, 6)]
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(g.get_state(), ref.get_state())
    kept = list(data.index_batches(10, 3, torch.Generator().manual_seed(1), epochs=1, drop_last=False))
    assert [len(b) for b in kept] == [3, 3, 3, 1] and sorted(torch.cat(kept).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="larger than the training set"):
        data.index_batches(10, 11, torch.Generator())
    with pytest.raises(ValueError, match="positive"):
        data.index_batches(10, 0, torch.Generator(), drop_last=False)


def test_index_batches_without_end_and_drawn_lazily():
    g = torch.Generator().manual_seed(3)
    stream = data.index_batches(7, 2, g)  # nothing drawn yet
    state = g.get_state()
    first = [next(stream) for _ in range(3)]  # one epoch: 3 batches of 2
    assert sorted(torch.cat(first).tolist()) != list(range(7)) and len(torch.cat(first).unique()) == 6
    assert not torch.equal(state, g.get_state())
    more = [next(stream) for _ in range(30)]  # ten more epochs
    assert all(len(b) == 2 for b in more)
    g2 = torch.Generator().manual_seed(3)
    stream = data.index_batches(7, 2, g2)
    torch.rand(1, generator=g2)  # a draw before the first batch changes the order
    assert not all(torch.equal(a, b) for a, b in zip(first, [next(stream) for _ in range(3)]))


def test_class_sorted_index_batches_hold_one_class_and_cover_the_data():
    y = torch.arange(100) % 4
    order = list(data.index_batches(100, 5, torch.Generator().manual_seed(0), epochs=2, labels=y))
    assert len(order) == 2 * 4 * 5
    assert all(len(torch.unique(y[b])) == 1 and len(b) == 5 for b in order)
    assert sorted(torch.cat(order[:20]).tolist()) == list(range(100))  # one epoch, every example once
    assert len({int(y[b[0]]) for b in order[:4]}) > 1  # the classes' batches are shuffled together
    # a class with fewer examples than a batch contributes no batch (not an empty one)
    uneven = torch.tensor([0] * 7 + [1] * 3 + [2] * 11)
    order = list(data.index_batches(21, 5, torch.Generator().manual_seed(0), epochs=1, labels=uneven))
    assert sorted(len(b) for b in order) == [5, 5, 5] and 1 not in uneven[torch.cat(order)].tolist()
    with pytest.raises(ValueError, match="no batch"):
        next(data.index_batches(21, 12, torch.Generator(), labels=uneven))
    with pytest.raises(ValueError, match="one class per example"):
        data.index_batches(20, 5, torch.Generator(), labels=uneven)
    xb, yb = next(data.batches(torch.randn(100, 2), y, 5, torch.Generator(), labels=y))
    assert len(yb.unique()) == 1


def test_default_init_is_torchs_from_the_generator():
    """mlp and small_cnn without init_std draw torch's default initialization (reset_parameters) from the generator."""
    net = models.mlp([784, 100, 10], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.nn.Linear(784, 100)
    assert torch.equal(net[0].weight, ref.weight) and torch.equal(net[0].bias, ref.bias)
    cnn = models.small_cnn(channels=(8,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    assert torch.equal(cnn[0].weight, conv.weight) and torch.equal(cnn[0].bias, conv.bias)


def test_mlp_layout_and_gaussian_init():
    g = torch.Generator().manual_seed(0)
    net = models.mlp([784, 100, 100, 10], "sigmoid", bnlib.BatchNorm1d, init_std=0.1, generator=g)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid", "Linear", "BatchNorm1d", "Sigmoid", "Linear"]
    assert net[0].bias is None and net[-1].bias is not None
    assert abs(float(net[0].weight.detach().std()) - 0.1) < 0.005
    assert net(torch.randn(5, 784)).shape == (5, 10)
    with pytest.raises(ValueError, match="unknown activation"):
        models.mlp([4, 2], "swish")
    with pytest.raises(ValueError, match="sizes"):
        models.mlp([4])


def test_small_cnn_shapes():
    net = models.small_cnn(norm=bnlib.BatchNorm2d, generator=torch.Generator().manual_seed(0))
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert isinstance(net[1], bnlib.BatchNorm2d) and net[0].bias is None
    with pytest.raises(ValueError, match="too small"):
        models.small_cnn(image_size=2, channels=(4, 4))
