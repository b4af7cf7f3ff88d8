"""bnlib.lab.data and bnlib.lab.models."""

import pytest
import torch

import bnlib
from bnlib.lab import data, models


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
