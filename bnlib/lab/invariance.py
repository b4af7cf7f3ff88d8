r"""Weight-scale invariance of batch normalization and what it does to gradient descent.

For a weight matrix :math:`W` whose every row feeds one batch-normalized unit (with eps = 0)
(Ioffe & Szegedy 2015, section 3.3; Arora, Li & Lyu 2019; van Laarhoven 2017):

- invariance: :math:`\mathrm{BN}(aWx) = \mathrm{BN}(Wx)` for :math:`a > 0`, so :math:`L(aW) = L(W)`;
- gradient scaling: :math:`\nabla L(aW) = \nabla L(W) / a`;
- orthogonality: :math:`\langle \nabla_{w_i} L, w_i\rangle = 0` for every row :math:`w_i`;
- norm growth under plain gradient descent: :math:`\|w_{t+1}\|^2 = \|w_t\|^2 + \eta^2 \|g_t\|^2`;
- effective learning rate on the unit sphere: :math:`\eta / \|w\|^2`;
- weight decay :math:`\lambda` equals an exponentially growing learning rate
  :math:`\eta_t = \eta (1 - \eta\lambda)^{-2t-1}` without weight decay (Li & Arora 2020);
- equilibrium angular update per step :math:`\approx \sqrt{2\eta\lambda}` (Wan et al. 2021).

The functions here measure these quantities row by row (one row = one output unit; conv weights
are flattened per output channel) and list which parameters of a network are scale-invariant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from bnlib.norm.modules import BatchNorm1d, is_batch_norm

__all__ = [
    "ExactBatchNorm1d",
    "invariant_weights",
    "non_invariant_parameters",
    "row_norms",
    "radial_cosine",
    "angular_update",
    "effective_lr",
    "predicted_sq_norm",
    "scale_invariant_",
    "exponential_lr",
    "exponential_lr_factor",
    "equilibrium_angular_update",
]

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ExactBatchNorm1d(BatchNorm1d):
    """``bnlib.BatchNorm1d`` with ``eps = 0`` by default: the scale-invariance identities above hold
    exactly (to rounding) rather than up to eps. torch.nn, and ``bnlib.BatchNorm1d``, refuse
    eps <= 0; this experimental layer accepts 0. The state_dict is that of ``bnlib.BatchNorm1d``.

    Args:
        num_features: number of channels C.
        eps: added to the variance; 0 or positive. Default: 0.
        **kwargs: the other arguments of :class:`bnlib.norm.modules.BatchNorm1d`: ``momentum``
            (weight of the new batch in the running averages, None for a cumulative average;
            default 0.1), ``affine`` (learn gamma and beta; default True), ``track_running_stats``
            (keep running averages; default True), ``device``, ``dtype``, and ``bias`` (with
            ``affine``, also learn beta; default True).

    Shape:
        Input: (N, C) or (N, C, L). Output: same shape as the input.
    """

    #: accept eps = 0 (the base class refuses it)
    allows_zero_eps = True

    def __init__(self, num_features: int, eps: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, eps, **kwargs)


def invariant_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights whose every row feeds a batch-normalized unit: ``(name, parameter)`` pairs.

    A Linear or Conv layer counts when the next module of the same ``nn.Sequential`` is a batch
    normalization layer (bnlib's or torch's), as in :func:`bnlib.lab.models.mlp`. Such a weight is
    scale-invariant row by row (exactly at eps = 0); its bias, if any, is cancelled by the mean
    subtraction and gets a zero gradient.

    Args:
        model: the network.
    """
    found: list[tuple[str, nn.Parameter]] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, following) in zip(children[:-1], children[1:]):
            if isinstance(layer, _LINEAR) and is_batch_norm(following):
                found.append((f"{prefix}.{name}.weight" if prefix else f"{name}.weight", layer.weight))
    return found


def non_invariant_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter not returned by :func:`invariant_weights` (gamma, beta, the last layer, ...).

    Args:
        model: the network.

    Returns:
        ``(name, parameter)`` pairs.
    """
    invariant = {id(p) for _, p in invariant_weights(model)}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in invariant]


def _rows(w: Tensor) -> Tensor:
    if w.dim() < 1:
        raise ValueError("expected a weight with at least one dimension (rows = output units)")
    return w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)


def row_norms(w: Tensor) -> Tensor:
    r"""Euclidean norm :math:`\|w_i\|` of each row (output unit); a vector is one row.

    Args:
        w: a weight (out, in) or (out, in, kernel...), whose rows are flattened per output unit.
    """
    return _rows(w).norm(dim=1)


def radial_cosine(grad: Tensor, w: Tensor) -> Tensor:
    r"""Cosine between each row's gradient and the row, :math:`\langle g_i, w_i\rangle / (\|g_i\|\|w_i\|)`.

    Zero (up to rounding) for scale-invariant weights: the gradient is tangent to the sphere.

    Args:
        grad: the weight's gradient.
        w: the weight, the same shape.
    """
    if grad.shape != w.shape:
        raise ValueError(f"grad and w must have the same shape, got {tuple(grad.shape)} and {tuple(w.shape)}")
    g, v = _rows(grad), _rows(w)
    return (g * v).sum(dim=1) / (g.norm(dim=1) * v.norm(dim=1))


def angular_update(w_old: Tensor, w_new: Tensor) -> Tensor:
    r"""Angle in radians between each row before and after a step.

    Uses :math:`2\arctan(\|u - v\| / \|u + v\|)` for the unit vectors :math:`u, v`, which is
    accurate for tiny angles (``arccos`` of the cosine is not).

    Args:
        w_old: the weight before the step.
        w_new: the weight after it, the same shape.
    """
    if w_old.shape != w_new.shape:
        raise ValueError(f"shapes differ: {tuple(w_old.shape)} and {tuple(w_new.shape)}")
    u, v = _rows(w_old), _rows(w_new)
    u = u / u.norm(dim=1, keepdim=True)
    v = v / v.norm(dim=1, keepdim=True)
    return 2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1))


def effective_lr(lr: float, w: Tensor) -> Tensor:
    r"""Effective learning rate of each row on the unit sphere, :math:`\eta / \|w_i\|^2`.

    A gradient step of size :math:`\eta` on :math:`w` moves the direction :math:`w/\|w\|` as far
    as a step of size :math:`\eta/\|w\|^2` would move a unit-norm weight.

    Args:
        lr: the learning rate :math:`\eta` (positive).
        w: the weight.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return lr / row_norms(w) ** 2


def predicted_sq_norm(w: Tensor, grad: Tensor, lr: float) -> Tensor:
    r"""Each row's squared norm after one plain gradient step, :math:`\|w_i\|^2 + \eta^2\|g_i\|^2`.

    Exact when the gradient is orthogonal to the row (scale invariance, eps = 0).

    Args:
        w: the weight before the step.
        grad: its gradient, the same shape.
        lr: the learning rate :math:`\eta`.
    """
    if grad.shape != w.shape:
        raise ValueError(f"grad and w must have the same shape, got {tuple(grad.shape)} and {tuple(w.shape)}")
    return row_norms(w) ** 2 + lr**2 * row_norms(grad) ** 2


@torch.no_grad()
def scale_invariant_(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every weight of :func:`invariant_weights` by ``factor`` in place; returns the model.

    Args:
        model: the network.
        factor: the positive scale factor.
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    for _, w in invariant_weights(model):
        w.mul_(factor)
    return model


def _check_lr_wd(lr: float, wd: float) -> None:
    if lr <= 0 or wd < 0 or lr * wd >= 1:
        raise ValueError(f"need lr > 0, wd >= 0 and lr * wd < 1, got lr={lr}, wd={wd}")


def exponential_lr_factor(lr: float, wd: float) -> Callable[[int], float]:
    r"""Multiplier of step ``t`` (from 0) in Li & Arora's schedule: :math:`(1 - \eta\lambda)^{-2t-1}`.

    Plain SGD with learning rate :math:`\eta` and weight decay :math:`\lambda` on scale-invariant
    weights, :math:`w_{t+1} = (1-\eta\lambda) w_t - \eta \nabla L(w_t)`, gives the same network at
    every step as SGD without weight decay and learning rate :math:`\eta \cdot` this factor, whose
    weights are :math:`\tilde w_t = w_t / (1-\eta\lambda)^t`. Usable with ``torch.optim.lr_scheduler.LambdaLR``.

    Args:
        lr: the learning rate :math:`\eta` (positive).
        wd: the weight decay :math:`\lambda` (non-negative, with :math:`\eta\lambda < 1`).
    """
    _check_lr_wd(lr, wd)
    base = 1.0 - lr * wd
    return lambda t: base ** (-2 * t - 1)


def exponential_lr(lr: float, wd: float, steps: int) -> np.ndarray:
    r"""The learning rates :math:`\eta_t = \eta (1 - \eta\lambda)^{-2t-1}` for t = 0, ..., steps - 1.

    Args:
        lr: the learning rate :math:`\eta` (positive).
        wd: the weight decay :math:`\lambda` (non-negative, with :math:`\eta\lambda < 1`).
        steps: the number of steps.
    """
    _check_lr_wd(lr, wd)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    return lr * (1.0 - lr * wd) ** (-2.0 * np.arange(steps) - 1.0)


def equilibrium_angular_update(lr: float, wd: float, exact: bool = False) -> float:
    r"""Angular update per step once the weight norm is in equilibrium under SGD with weight decay.

    A step :math:`w' = (1-\eta\lambda)w - \eta g` with :math:`g \perp w` keeps :math:`\|w\|` fixed
    when :math:`\eta^2\|g\|^2 = (2\eta\lambda - \eta^2\lambda^2)\|w\|^2`; the angle turned is then
    :math:`\arctan\big(\sqrt{2\eta\lambda - \eta^2\lambda^2} / (1-\eta\lambda)\big)` (``exact``),
    which is :math:`\sqrt{2\eta\lambda}` to first order (the default).

    Args:
        lr: the learning rate :math:`\eta` (positive).
        wd: the weight decay :math:`\lambda` (non-negative, with :math:`\eta\lambda < 1`).
        exact: the exact angle rather than its first-order approximation.
    """
    _check_lr_wd(lr, wd)
    if wd == 0:
        return 0.0
    p = lr * wd
    if exact:
        return math.atan(math.sqrt(2 * p - p * p) / (1 - p))
    return math.sqrt(2 * p)
