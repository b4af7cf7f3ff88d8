"""Batch normalization in NumPy: the reading copy of the equations.

Forward functions return ``(out, cache)``; backward functions take the upstream gradient and
that cache and return the gradients, as in CS231n's ``layers.py``. Everything here is plain
NumPy so that every line can be checked against Ioffe & Szegedy (2015), Algorithm 1::

    mu    = mean(x)                      (per feature, over the batch)   batch_mean_var
    var   = mean((x - mu)^2)             (biased)                        batch_mean_var
    x_hat = (x - mu) / sqrt(var + eps)                                   batchnorm_forward
    y     = gamma * x_hat + beta                                         batchnorm_forward

The forward computes the first two lines with :func:`batch_mean_var_shifted`, the same formula
with one correction that keeps float32 digits when the mean is large against the spread.

float32 and float64 inputs keep their dtype (so float32 behaviour can be studied); float16 is
computed in float32 (its range cannot hold a batch's sums safely), and anything else is converted
to float64, the precision the book's gradient checks use.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "BatchNormCache",
    "batch_mean_var",
    "batch_mean_var_shifted",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_graph",
    "batchnorm_inference",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "batchnorm_jacobian",
]


class BatchNormCache(NamedTuple):
    """What the forward pass keeps for the backward pass (one row per example).

    Args:
        x: the input, (N, D) (for spatial input, the ``(N*H*W, C)`` rows).
        mean: the batch mean mu_B, (D,).
        var: the biased batch variance sigma_B^2, (D,).
        eps: the epsilon added to the variance.
        x_hat: the normalized input, (N, D).
        gamma: the scale, (D,).
        std: ``sqrt(var + eps)``, (D,).
    """

    x: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    x_hat: np.ndarray
    gamma: np.ndarray
    std: np.ndarray


def _as_float_array(x) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float64)
    if x.dtype == np.float16:
        return x.astype(np.float32)  # float16 cannot hold the sums of a batch safely
    return x


def _check_params(gamma: np.ndarray, beta: np.ndarray, num_features: int) -> None:
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (num_features,):
            raise ValueError(f"{name} must have shape ({num_features},), one value per feature, got {p.shape}")


def batch_mean_var(x: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance along ``axis``: Algorithm 1's first two lines, in two passes.

    ``mean = mean(x)``, then ``var = mean((x - mean)^2)``. Centring before squaring avoids the
    one-pass trap E[x^2] - E[x]^2, which subtracts two nearly equal numbers when ``|mean| >> std``.
    The mean itself is still rounded, though: for float32 input with ``|mean| >> std`` the rounding
    error of the mean enters the variance squared; :func:`batch_mean_var_shifted` removes it.

    Args:
        x: the values, in any floating dtype (the result keeps it).
        axis: the axis (or axes) to reduce; 0 is the batch dimension of an (N, D) array.

    Returns:
        ``(mean, var)`` with ``axis`` removed.
    """
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    return np.squeeze(mean, axis=axis), np.squeeze(var, axis=axis)


def batch_mean_var_shifted(x: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance along ``axis``, hardened against a large mean (what the forward uses).

    The same two passes as :func:`batch_mean_var`, plus one correction. The rounded mean is a
    shift, ``centred = x - mean``, and the (tiny) mean of the centred values, ``correction``, is
    what rounding lost: ``var = mean(centred^2) - correction^2`` and ``mean + correction``. The
    shifted-data formula is exact in real arithmetic for any shift, so the result is the same
    mathematics; in floating point it keeps the variance's digits when ``|mean| >> std``.

    When it matters: float32 (or float16, computed in float32) input whose mean is large against its
    spread. At mean 1e5 and standard deviation 1, float32 :func:`batch_mean_var` can be off by
    about 1e-4 relative, this by about 1e-7. In float64, or for centred data, the two agree to rounding.

    Args:
        x: the values, in any floating dtype (the result keeps it).
        axis: the axis (or axes) to reduce; 0 is the batch dimension of an (N, D) array.

    Returns:
        ``(mean, var)`` with ``axis`` removed; ``var`` is clipped at 0.
    """
    mean = x.mean(axis=axis, keepdims=True)
    centred = x - mean
    correction = centred.mean(axis=axis, keepdims=True)
    var = (centred**2).mean(axis=axis, keepdims=True) - correction**2
    mean = mean + correction
    return np.squeeze(mean, axis=axis), np.squeeze(np.maximum(var, 0), axis=axis)


def batchnorm_forward(x, gamma, beta, eps: float = 1e-5) -> tuple[np.ndarray, BatchNormCache]:
    """Training-mode batch normalization of ``x`` with shape (N, D) (Algorithm 1).

    Args:
        x: the mini-batch, N examples of D features (N >= 2).
        gamma: the scale, (D,).
        beta: the shift, (D,).
        eps: added to the variance before the square root (>= 0).

    Returns:
        ``(out, cache)``: ``out`` has the shape of ``x``; ``cache`` is what the backward needs.
    """
    x = _as_float_array(x)
    if x.ndim != 2:
        raise ValueError(f"expected x of shape (N, D), got {x.ndim}D input of shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"expected more than 1 value per feature to compute batch statistics, got N={n}")
    gamma = np.asarray(gamma, dtype=x.dtype)
    beta = np.asarray(beta, dtype=x.dtype)
    _check_params(gamma, beta, d)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")

    # Algorithm 1, one line per step; the mean and variance are batch_mean_var's two lines with a
    # correction that keeps float32 digits when |mean| >> std (see batch_mean_var_shifted)
    mean, var = batch_mean_var_shifted(x, axis=0)  # mini-batch mean mu_B and variance sigma_B^2
    std = np.sqrt(var + eps)
    x_hat = (x - mean) / std  # normalize
    out = gamma * x_hat + beta  # scale and shift
    return out, BatchNormCache(x, mean, var, eps, x_hat, gamma, std)


def batchnorm_backward(dout, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dgamma, dbeta)`` by the compact formula.

    With m = N and dx_hat = gamma * dout::

        dx = (1 / (m * std)) * (m * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat))

    Args:
        dout: the upstream gradient, shaped like the forward output (N, D).
        cache: what :func:`batchnorm_forward` returned with the output.
    """
    dout = np.asarray(dout, dtype=cache.x_hat.dtype)
    if dout.shape != cache.x_hat.shape:
        raise ValueError(f"dout must have the forward output's shape {cache.x_hat.shape}, got {dout.shape}")
    m = dout.shape[0]
    x_hat = cache.x_hat
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * cache.gamma
    dx = (m * dx_hat - dx_hat.sum(axis=0) - x_hat * (dx_hat * x_hat).sum(axis=0)) / (m * cache.std)
    return dx, dgamma, dbeta


def batchnorm_backward_graph(dout, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same gradients, node by node through the computational graph (for teaching).

    Forward graph: mu = mean(x); xc = x - mu; var = mean(xc^2); std = sqrt(var + eps);
    inv = 1/std; x_hat = xc * inv; y = gamma * x_hat + beta. Each line below undoes one node.

    Args:
        dout: the upstream gradient, shaped like the forward output (N, D).
        cache: what :func:`batchnorm_forward` returned with the output.
    """
    dout = np.asarray(dout, dtype=cache.x_hat.dtype)
    m = dout.shape[0]
    xc = cache.x - cache.mean
    inv = 1.0 / cache.std

    dbeta = dout.sum(axis=0)  # y = gamma * x_hat + beta
    dgamma = (dout * cache.x_hat).sum(axis=0)
    dx_hat = dout * cache.gamma
    dxc = dx_hat * inv  # x_hat = xc * inv (xc's first path)
    dinv = (dx_hat * xc).sum(axis=0)
    dstd = -dinv / cache.std**2  # inv = 1 / std
    dvar = dstd * 0.5 / cache.std  # std = sqrt(var + eps)
    dxc = dxc + 2.0 * xc * dvar / m  # var = mean(xc^2) (xc's second path)
    dmu = -dxc.sum(axis=0)  # xc = x - mu
    dx = dxc + dmu / m  # mu = mean(x)
    return dx, dgamma, dbeta


def batchnorm_inference(x, running_mean, running_var, gamma, beta, eps: float = 1e-5) -> np.ndarray:
    """Inference-mode batch normalization (Algorithm 2): one fixed affine map per feature.

    ``y = gamma / sqrt(running_var + eps) * x + (beta - gamma * running_mean / sqrt(running_var + eps))``

    Args:
        x: the input, (N, D).
        running_mean: the population mean, (D,).
        running_var: the population variance, (D,).
        gamma: the scale, (D,).
        beta: the shift, (D,).
        eps: added to the variance before the square root.
    """
    x = _as_float_array(x)
    if x.ndim != 2:
        raise ValueError(f"expected x of shape (N, D), got {x.ndim}D input of shape {x.shape}")
    d = x.shape[1]
    gamma, beta = np.asarray(gamma, dtype=x.dtype), np.asarray(beta, dtype=x.dtype)
    _check_params(gamma, beta, d)
    scale = gamma / np.sqrt(np.asarray(running_var, dtype=x.dtype) + eps)
    return scale * x + (beta - scale * np.asarray(running_mean, dtype=x.dtype))


def _to_rows(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> ``(N*H*W, C)``: one row per position, one column per channel.

    Built as the transpose of a ``(C, N*H*W)`` copy: that copy moves whole contiguous ``H*W`` planes and
    is many times faster than gathering one value per channel per position; the rows are the same.
    """
    n, c, h, w = x.shape
    return x.transpose(1, 0, 2, 3).reshape(c, n * h * w).T


def _from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def spatial_batchnorm_forward(x, gamma, beta, eps: float = 1e-5) -> tuple[np.ndarray, BatchNormCache]:
    """Per-channel batch normalization of (N, C, H, W) input (Ioffe & Szegedy §3.2).

    Statistics are taken over ``N*H*W`` values per channel: every position of every example is one
    more sample of the channel, so the effective batch size is m' = ``N*H*W``.

    Args:
        x: the input, (N, C, H, W).
        gamma: the scale, (C,).
        beta: the shift, (C,).
        eps: added to the variance before the square root.

    Returns:
        ``(out, cache)`` as :func:`batchnorm_forward`; ``out`` has the shape of ``x``.
    """
    x = _as_float_array(x)
    if x.ndim != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {x.ndim}D input of shape {x.shape}")
    out, cache = batchnorm_forward(_to_rows(x), gamma, beta, eps)
    return _from_rows(out, x.shape), cache


def spatial_batchnorm_backward(dout, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`spatial_batchnorm_forward`.

    Args:
        dout: the upstream gradient, (N, C, H, W).
        cache: what :func:`spatial_batchnorm_forward` returned with the output.
    """
    dout = np.asarray(dout)
    if dout.ndim != 4:
        raise ValueError(f"expected dout of shape (N, C, H, W), got shape {dout.shape}")
    dx, dgamma, dbeta = batchnorm_backward(_to_rows(dout), cache)
    return _from_rows(dx, dout.shape), dgamma, dbeta


def batchnorm_jacobian(x, eps: float = 1e-5) -> np.ndarray:
    """Jacobian d x_hat / d x of one feature's normalization over a batch of m values.

    ``J = (1 / std) * (I - 1 1^T / m - x_hat x_hat^T / m)``, exact for every eps when
    ``x_hat = (x - mean) / sqrt(var + eps)``.

    Args:
        x: the m >= 2 values of one feature, (m,).
        eps: added to the variance before the square root.

    Returns:
        The (m, m) matrix whose entry (i, j) is d x_hat_i / d x_j.
    """
    x = _as_float_array(x)
    if x.ndim != 1 or x.shape[0] < 2:
        raise ValueError(f"expected a vector of m >= 2 values of one feature, got shape {x.shape}")
    m = x.shape[0]
    mean, var = batch_mean_var_shifted(x)
    std = np.sqrt(var + eps)
    x_hat = (x - mean) / std
    ones = np.ones((m, 1), dtype=x.dtype)
    return (np.eye(m, dtype=x.dtype) - ones @ ones.T / m - np.outer(x_hat, x_hat) / m) / std
