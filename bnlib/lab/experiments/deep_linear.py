"""The deep linear network (DLN) setting of Santurkar et al. (2018): a product of square matrices.

``f(x) = W_depth ... W_2 W_1 x`` with no nonlinearity and no bias, fitted to a random linear map
``y = A x`` on Gaussian inputs by full-batch gradient descent on the mean squared error. The network
computes a linear function whatever its depth, yet its loss is a non-convex function of the
matrices, so it isolates the optimization effect of depth (and of BN between the matrices) from
everything a nonlinearity adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["deep_linear_network", "linear_regression_data"]


def deep_linear_network(
    width: int = 10,
    depth: int = 25,
    norm: Callable[[int], nn.Module] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``depth`` bias-free ``width x width`` linear maps, with ``norm(width)`` after every one but the last.

    Weights are drawn from N(0, 1/width), which preserves the norm of a vector on average; the norm
    of the product still varies from seed to seed (log-normally), so the initial loss does too.

    Args:
        width: inputs, outputs and every hidden layer have this size.
        depth: number of matrices (at least 1).
        norm: normalization factory, e.g. ``bnlib.BatchNorm1d`` (None: a plain DLN).
        generator: random generator for the weights.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0.0, 1.0 / math.sqrt(width), generator=generator)
        layers.append(linear)
        if norm is not None and i < depth - 1:
            layers.append(norm(width))
    return nn.Sequential(*layers)


def linear_regression_data(
    n: int = 1000, width: int = 10, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs ``x ~ N(0, I)`` of shape (n, width), a target map ``A`` with N(0, 1/width) entries, ``y = x A^T``.

    Args:
        n: number of examples (at least 2).
        width: input and output size.
        generator: random generator for ``x`` and ``A``.

    Returns:
        ``(x, y, A)``.
    """
    if n < 2 or width < 1:
        raise ValueError(f"need n >= 2 examples and width >= 1, got n={n}, width={width}")
    x = torch.randn(n, width, generator=generator)
    a = torch.randn(width, width, generator=generator) / math.sqrt(width)
    return x, x @ a.T, a
