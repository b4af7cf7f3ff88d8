"""Numerical gradients by centred differences, and the relative error used to compare them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["numeric_gradient", "numeric_jacobian", "rel_error"]


def numeric_gradient(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """Gradient of ``sum(f(x) * dout)`` with respect to ``x`` by centred differences.

    ``x`` is perturbed in place one entry at a time and restored; use float64 (the truncation
    error is O(h^2), the rounding error about machine epsilon / h).

    Args:
        f: the function; it may return an array of any shape.
        x: the point (float64; restored after the differences).
        dout: the weights of ``f(x)``'s entries, the shape of ``f(x)`` (the upstream gradient).
        h: the step of the centred differences.
    """
    if x.dtype != np.float64:
        raise ValueError(f"numeric gradients need a float64 array, got {x.dtype}")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f(x) * dout)
        x[i] = old - h
        minus = np.sum(f(x) * dout)
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def numeric_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Jacobian of a vector function ``f`` at the vector ``x`` by centred differences: J[i, j] = d f_i / d x_j.

    Args:
        f: maps a vector to a vector.
        x: the point (a copy in float64 is used).
        h: the step of the centred differences.
    """
    x = np.array(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a vector x, got shape {x.shape}")
    columns = []
    for j in range(x.size):
        step = np.zeros_like(x)
        step[j] = h
        columns.append((np.asarray(f(x + step)) - np.asarray(f(x - step))) / (2 * h))
    return np.stack(columns, axis=1)


def rel_error(a, b) -> float:
    """Normwise relative error ||a - b|| / (||a|| + ||b||) (0 when both are zero).

    Normwise rather than elementwise: an entry that is tiny by cancellation carries the
    centred difference's absolute error (about 1e-10) and would dominate an elementwise measure.

    Args:
        a: an array.
        b: an array of the same shape.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)
