r"""The experiments of the loss-landscape smoothing chapter (Santurkar et al. 2018), made reusable.

- :func:`smoothing_mlp`: the chapter's He-initialized ReLU MLP, without BN, with BN, with noisy BN
  or with an l_p normalization.
- :func:`loss_sweep`: short runs over a grid of learning rates, and :func:`largest_stable_lr`, the
  largest rate of the grid at which a run still lowers its loss: what the edge of stability
  (Cohen et al. 2021) says differs between networks, where curvature at one rate does not.
- :func:`value_at_loss`: a recorded quantity (e.g. the curvature along the gradient) at the first
  recorded step where the training loss has come down to a given level, to compare networks at
  equal loss rather than at equal step.
- :func:`scale_invariant_linears`, :func:`turning_angles` and :func:`rescaled_copy`: the weights
  that feed a BN layer, how far a step along the gradient turns them (a step ``-eta g`` with
  ``g`` orthogonal to ``w`` turns ``w`` by ``atan(eta ||g|| / ||w||)``), and the same function
  with those weights rescaled, to separate what a line probe measures about the function from
  what it measures about the parametrization.
- :func:`lp_to_std`: the ratio of an l_p deviation to the standard deviation, batch by batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab import models, training
from bnlib.lab.experiments import noisy
from bnlib.lab.landscape import ModelObjective
from bnlib.norm.modules import is_batch_norm

__all__ = [
    "LP_NORMS",
    "smoothing_mlp",
    "loss_sweep",
    "largest_stable_lr",
    "value_at_loss",
    "scale_invariant_linears",
    "turning_angles",
    "rescaled_copy",
    "lp_to_std",
]

#: the lp batch norms the chapter compares, kind -> p of LpBatchNorm
LP_NORMS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


def smoothing_mlp(
    kind: str,
    seed: int,
    sizes: Sequence[int] = (784, 100, 100, 100, 100, 100, 10),
    noise: dict[str, Any] | None = None,
) -> nn.Sequential:
    """The chapter's ReLU MLP, He-initialized from ``seed``.

    ``kind`` is ``"plain"`` (no normalization), ``"bn"`` (``nn.BatchNorm1d`` after every hidden
    Linear), one of :data:`LP_NORMS` (:class:`~bnlib.lab.experiments.noisy.LpBatchNorm`), or any
    other name with ``noise`` given: BN wrapped in noisy BN with those arguments, its noise seeded
    by ``1000 * (seed + 1)``.

    Args:
        kind: the normalization, as above.
        seed: seeds the weights (and the noise).
        sizes: layer widths, input first.
        noise: keyword arguments of :func:`~bnlib.lab.experiments.noisy.add_noise` (noisy kinds).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "plain":
        norm = None
    elif kind in LP_NORMS:
        p = LP_NORMS[kind]

        def norm(c: int) -> nn.Module:
            return noisy.LpBatchNorm(c, p=p)
    elif kind == "bn" or noise is not None:
        norm = nn.BatchNorm1d
    else:
        raise ValueError(f"unknown kind {kind!r} (a noisy kind needs noise=...)")
    net = models.he_init_(models.mlp(list(sizes), "relu", norm, generator=g), generator=g)
    if noise is not None:
        noisy.add_noise(net, **noise, seed=1000 * (seed + 1))
    return net


def loss_sweep(
    make_net: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    lrs: Sequence[float],
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[float, np.ndarray]:
    """Train a fresh ``make_net()`` with plain SGD at every learning rate: the per-step training losses.

    Every run starts from the same initialization if ``make_net`` is deterministic, and sees the
    same mini-batches (fixed by ``seed``).

    Args:
        make_net: builds the network to train.
        x, y: training data.
        lrs: learning rates.
        steps: SGD steps per run.
        batch_size: examples per step.
        seed: the mini-batch order.
        loss_fn: the training loss.

    Returns:
        learning rate -> the training loss at each step (non-finite once a run has diverged).
    """
    out = {}
    for lr in lrs:
        hist = training.train(make_net(), x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn)
        out[float(lr)] = np.asarray(hist.train_loss, dtype=float)
    return out


def largest_stable_lr(losses: dict[float, np.ndarray], last: int = 10, below: float = 1.0) -> float:
    """The largest learning rate of a :func:`loss_sweep` at which the run still trains.

    A run counts as training stably when its mean training loss over the ``last`` steps is finite
    and below ``below`` times its loss at the first step. Rates above one that fails do not count
    (0.0 if the smallest rate already fails).

    Args:
        losses: the output of :func:`loss_sweep`.
        last: steps averaged at the end of a run.
        below: the fraction of the first loss a run must get under (1: any decrease).
    """
    best = 0.0
    for lr in sorted(losses):
        curve = losses[lr]
        end = float(np.mean(curve[-last:]))
        if not (math.isfinite(end) and end < below * curve[0]):
            break
        best = lr
    return best


def value_at_loss(hist: training.History, name: str, level: float, window: int = 20) -> float:
    """``hist[name]`` at the first recorded step (after 0) where the training loss is down to ``level``.

    The training loss at a recorded step ``s`` is the mean mini-batch loss over the ``window``
    steps before it. NaN if the run never gets there.

    Args:
        hist: a training history with ``name`` recorded.
        level: the training loss to reach.
        window: steps averaged before a recorded step.
    """
    losses = np.asarray(hist.train_loss, dtype=float)
    for i, step in enumerate(hist.steps):
        if step == 0:
            continue
        if float(np.mean(losses[max(0, step - window) : step])) <= level:
            return float(np.mean(hist[name][i]))
    return math.nan


def scale_invariant_linears(model: nn.Module) -> list[str]:
    """Names of the Linear weights directly followed by a BN layer (in module order).

    Each row of such a weight feeds one BN unit, so the loss does not change when the row is
    multiplied by a positive number (at eps = 0): its gradient is orthogonal to it.

    Args:
        model: a sequential-style model (its modules in forward order).
    """
    named = list(model.named_modules())
    out = []
    for (name, mod), (_, nxt) in zip(named, named[1:]):
        if isinstance(mod, nn.Linear) and is_batch_norm(nxt):
            out.append(f"{name}.weight")
    return out


def turning_angles(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eta: float,
    loss_fn: Callable = F.cross_entropy,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """For every scale-invariant weight W: how a step ``-eta g`` on the batch ``(x, y)`` moves it.

    Returns per weight ``cos`` (the cosine between ``g`` and W: 0 for a scale-invariant weight),
    ``relative_step`` (``eta ||g|| / ||W||``) and ``angle`` (``atan`` of it, in degrees: the angle
    by which the step turns W when ``g`` is orthogonal to W, whatever ``eta``: below 90 degrees).

    Args:
        model: the network (gradients on a copy in training mode).
        x, y: the batch.
        eta: the step size.
        loss_fn: the loss.
        names: the weights to report (default: :func:`scale_invariant_linears`); for other
            weights ``cos`` need not be 0 and ``angle`` is not the turning angle.
    """
    model = copy.deepcopy(model).train()
    obj = ModelObjective(model, loss_fn, x, y)
    _, grad = obj(obj.theta())
    grads, params = obj.unflatten(grad), dict(model.named_parameters())
    out = {}
    for name in scale_invariant_linears(model) if names is None else names:
        g, w = grads[name].double(), params[name].detach().double()
        rel = eta * float(g.norm() / w.norm())
        cos = float((g * w).sum() / (g.norm() * w.norm()))
        out[name] = {"cos": cos, "relative_step": rel, "angle": math.degrees(math.atan(rel))}
    return out


def rescaled_copy(model: nn.Module, norms: dict[str, float]) -> nn.Module:
    """A copy of ``model`` whose scale-invariant weights have the Frobenius norms ``norms``.

    In training mode (batch statistics) the copy computes the same function up to BN's eps; its
    gradient with respect to a weight scaled by ``c`` is divided by ``c``.

    Args:
        model: the network.
        norms: weight name -> the norm to give it (names from :func:`scale_invariant_linears`).
    """
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    invariant = set(scale_invariant_linears(out))
    with torch.no_grad():
        for name, target in norms.items():
            if name not in invariant:
                raise ValueError(f"{name} is not a weight feeding a BN layer")
            params[name].mul_(target / params[name].norm())
    return out


def lp_to_std(batches: Tensor, p: float) -> Tensor:
    """Per column of ``batches`` (m, n): the l_p deviation from the mean over the standard deviation.

    The l_p deviation is ``(mean_i |x_i - mu|^p)^(1/p)`` (``max_i |x_i - mu|`` for p = inf); the
    standard deviation is the biased one (p = 2 gives exactly 1).

    Args:
        batches: one batch per column.
        p: 1, 2, inf or any p >= 1.
    """
    centred = batches - batches.mean(0)
    if math.isinf(p):
        dev = centred.abs().amax(0)
    else:
        dev = centred.abs().pow(p).mean(0).pow(1 / p)
    return dev / centred.pow(2).mean(0).sqrt()
