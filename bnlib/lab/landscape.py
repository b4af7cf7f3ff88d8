"""Probes of the loss landscape and of internal covariate shift, after Santurkar et al. (2018).

Everything here measures a network *at one point* of training without changing it: parameters,
running statistics and step counters are left exactly as they were.

- :class:`ModelObjective` turns ``(model, loss_fn, x, y)`` into a function of one flat parameter
  vector ``theta`` that returns the loss and its gradient (the model is evaluated functionally, on
  copies of its buffers).
- :func:`probe_along_gradient`: from ``theta`` with gradient ``g``, step to ``theta - eta g`` for
  several step sizes ``eta`` and measure (a) the range of the loss values, (b) gradient
  predictiveness ``||grad L(theta - eta g) - grad L(theta)||`` and (c) the effective beta-smoothness
  ``max_eta ||grad L(theta - eta g) - grad L(theta)|| / ||eta g||`` (the paper's landscape figure).
- :func:`internal_covariate_shift`: the paper's Definition 2.1, ``G`` (gradient of a layer's weights)
  against ``G'`` (the same gradient after the earlier layers took their SGD step, same batch), as the
  l2 distance ``||G - G'||`` and the cosine ``<G, G'> / (||G|| ||G'||)``.
- :func:`gradient_norm_bound`: both sides of the paper's Theorem 4.1 for one BN unit.
- :func:`filter_normalized_direction` and :func:`loss_surface`: a 2-D slice of the loss around
  ``theta`` along random directions scaled filter by filter (Li et al., 2018).

For a quadratic ``L(theta) = theta^T A theta / 2 - b^T theta`` all three probes are known in closed
form: the gradient changes by ``-eta A g``, so (b) is ``eta ||A g||`` and (c) is ``||A g|| / ||g||``,
a Rayleigh-type quotient between the smallest and largest eigenvalue of ``A``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnlib.lab.measure import LossFn, snapshot

__all__ = [
    "ModelObjective",
    "GradientProbe",
    "probe_along_gradient",
    "ICS",
    "internal_covariate_shift",
    "gradient_norm_bound",
    "filter_normalized_direction",
    "loss_surface",
    "landscape_recorder",
]

Objective = Callable[[Tensor], "tuple[Tensor, Tensor]"]


class ModelObjective:
    """The loss of ``model`` on the fixed batch ``(x, y)`` as a function of a flat parameter vector.

    ``objective(theta)`` returns ``(loss, grad)`` (a 0-d tensor and a flat tensor like ``theta``);
    ``objective.loss(theta)`` the loss alone. The model runs in its current mode (training mode for a
    network being trained: BN then uses the batch's statistics) on *copies* of its buffers, so running
    statistics and ``num_batches_tracked`` are never changed by a probe.

    Args:
        model: the network (its parameters define ``theta``'s layout, in ``named_parameters`` order).
        loss_fn: ``loss_fn(model(x), y)`` gives a scalar.
        x, y: the batch the loss is measured on.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> None:
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.names = [n for n, _ in model.named_parameters()]
        if not self.names:
            raise ValueError("the model has no parameters to probe")
        params = [p for _, p in model.named_parameters()]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]

    def theta(self) -> Tensor:
        """The model's current parameters as one flat (detached) vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into ``{parameter name: tensor}`` views.

        Args:
            theta: a flat vector with as many values as the model has parameters.
        """
        if theta.dim() != 1 or theta.numel() != sum(self.sizes):
            raise ValueError(f"theta must be a flat vector of {sum(self.sizes)} values, got shape {tuple(theta.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}

    def _loss(self, params: dict[str, Tensor]) -> Tensor:
        buffers = snapshot(self.model, parameters=False)  # copies: a probe never moves running statistics
        out = functional_call(self.model, {**params, **buffers}, (self.x,))
        return self.loss_fn(out, self.y)

    def loss(self, theta: Tensor) -> Tensor:
        """The loss at ``theta`` (no gradient).

        Args:
            theta: a flat parameter vector, laid out as :meth:`theta`.
        """
        with torch.no_grad():
            return self._loss(self.unflatten(theta)).detach()

    def __call__(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(self.unflatten(theta))
            (grad,) = torch.autograd.grad(loss, theta)
        return loss.detach(), grad.detach()


@dataclass(frozen=True)
class GradientProbe:
    """What :func:`probe_along_gradient` measured at one point.

    Args:
        etas: the step sizes.
        losses: ``L(theta - eta g)`` for each step size.
        grad_changes: ``||grad L(theta - eta g) - grad L(theta)||`` for each step size.
        loss_range: ``max(losses) - min(losses)`` (the paper's "variation in loss").
        grad_change: ``max(grad_changes)``, gradient predictiveness (small = predictive).
        beta: ``max over eta of grad_changes / (eta ||g||)``, the effective beta-smoothness.
        grad_norm: ``||g||`` at ``theta``.
        loss0: ``L(theta)``.
    """

    etas: np.ndarray
    losses: np.ndarray
    grad_changes: np.ndarray
    loss_range: float
    grad_change: float
    beta: float
    grad_norm: float
    loss0: float


def probe_along_gradient(objective: Objective, theta: Tensor, etas: Sequence[float]) -> GradientProbe:
    """Move from ``theta`` along the negative gradient by each step size and measure the landscape.

    Implements the three landscape measurements of Santurkar et al. (2018) at one point: with
    ``g = grad L(theta)`` and ``theta_eta = theta - eta g``,

        loss range      = max_eta L(theta_eta) - min_eta L(theta_eta)
        predictiveness  = max_eta ||grad L(theta_eta) - g||
        beta_eff        = max_eta ||grad L(theta_eta) - g|| / (eta ||g||)

    Args:
        objective: ``theta -> (loss, grad)``, e.g. a :class:`ModelObjective`.
        theta: flat parameter vector where the probe starts.
        etas: positive step sizes (e.g. 0.5 to 4 times the learning rate).
    """
    etas = np.asarray(list(etas), dtype=float)
    if etas.size == 0 or not np.all(etas > 0) or not np.all(np.isfinite(etas)):
        raise ValueError(f"etas must be a non-empty list of positive step sizes, got {etas.tolist()}")
    loss0, g = objective(theta)
    gnorm = float(g.norm())
    losses, changes = [], []
    for eta in etas:
        loss, g_eta = objective(theta - float(eta) * g)
        losses.append(float(loss))
        changes.append(float((g_eta - g).norm()))
    losses_a, changes_a = np.array(losses), np.array(changes)
    beta = float(np.max(changes_a / (etas * gnorm))) if gnorm > 0 else 0.0
    return GradientProbe(
        etas=etas,
        losses=losses_a,
        grad_changes=changes_a,
        loss_range=float(losses_a.max() - losses_a.min()),
        grad_change=float(changes_a.max()),
        beta=beta,
        grad_norm=gnorm,
        loss0=float(loss0),
    )


@dataclass(frozen=True)
class ICS:
    """Internal covariate shift of each measured layer (Santurkar et al. 2018, Definition 2.1).

    Args:
        layers: parameter names of the measured weights (every weighted layer after the first).
        l2: ``||G - G'||`` per layer.
        cosine: ``<G, G'> / (||G|| ||G'||)`` per layer (1 means no shift).
        relative: ``||G - G'|| / ||G||`` per layer (the l2 distance on the gradient's own scale).
    """

    layers: list[str]
    l2: np.ndarray
    cosine: np.ndarray
    relative: np.ndarray


def _weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def internal_covariate_shift(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, lr: float, layers: Sequence[str] | None = None
) -> ICS:
    """Measure ICS the paper's way: how much a layer's gradient changes when the layers before it move.

    For the weights ``W_i`` of a layer, ``G = grad_{W_i} L(W_1, ..., W_k)`` and
    ``G' = grad_{W_i} L(W_1 - lr G_1, ..., W_{i-1} - lr G_{i-1}, W_i, ..., W_k)`` on the same batch:
    every parameter that comes before ``W_i`` (in ``named_parameters`` order, BN's gamma and beta
    included) takes its plain SGD step with learning rate ``lr``; ``W_i`` and everything after stay.

    Args:
        model: a network whose parameters are registered in forward order (e.g. ``nn.Sequential``).
        loss_fn, x, y: the loss on one batch.
        lr: the SGD learning rate of the update of the earlier layers.
        layers: names of the weights to measure (default: every Linear/Conv2d weight but the first).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    obj = ModelObjective(model, loss_fn, x, y)
    if layers is None:
        layers = _weight_names(model)[1:]
    missing = [n for n in layers if n not in obj.names]
    if missing:
        raise ValueError(f"no parameters named {missing}; the model has {obj.names}")
    if not layers:
        raise ValueError("no layer to measure: the model needs at least two weighted layers")
    theta = obj.theta()
    _, grad = obj(theta)
    params, grads = obj.unflatten(theta), obj.unflatten(grad)
    l2, cos, rel = [], [], []
    for target in layers:
        k = obj.names.index(target)
        moved = {n: (p - lr * grads[n] if i < k else p) for i, (n, p) in enumerate(params.items())}
        w = moved[target].detach().requires_grad_(True)
        moved[target] = w
        with torch.enable_grad():
            (g_prime,) = torch.autograd.grad(obj._loss(moved), w)
        g = grads[target]
        diff = float((g - g_prime).norm())
        denom = float(g.norm() * g_prime.norm())
        l2.append(diff)
        rel.append(diff / float(g.norm()) if float(g.norm()) > 0 else float("nan"))
        cos.append(float((g * g_prime).sum()) / denom if denom > 0 else float("nan"))
    return ICS(list(layers), np.array(l2), np.array(cos), np.array(rel))


def gradient_norm_bound(grad_out: Tensor, x_hat: Tensor, gamma: Tensor | float, sigma: Tensor | float) -> Tensor:
    """Right-hand side of Santurkar et al. (2018), Theorem 4.1, for one BN unit over a batch of m.

        ||grad_y L_hat||^2 <= (gamma^2 / sigma^2) (||g||^2 - <1, g>^2 / m - <g, x_hat>^2 / m)

    where ``g = grad_out`` is the gradient with respect to the BN output ``z = gamma x_hat + beta``,
    ``x_hat`` the normalized batch and ``sigma = sqrt(var + eps)``. The left-hand side is the squared
    norm of the gradient with respect to BN's input. Equality holds at ``eps = 0``; with ``eps > 0``
    the left side is smaller by ``(gamma^2 / sigma^2) <g, x_hat>^2 (1 - ||x_hat||^2 / m) / m``.

    Args:
        grad_out: the gradient with respect to BN's output, (m,) or (m, C) (one bound per column).
        x_hat: the normalized batch, the same shape.
        gamma: BN's scale (a number, or one per column).
        sigma: ``sqrt(var + eps)`` of the batch (a number, or one per column).
    """
    if grad_out.shape != x_hat.shape:
        raise ValueError(
            f"grad_out and x_hat must have the same shape, got {tuple(grad_out.shape)} and {tuple(x_hat.shape)}"
        )
    m = grad_out.shape[0]
    bracket = (grad_out**2).sum(0) - grad_out.sum(0) ** 2 / m - (grad_out * x_hat).sum(0) ** 2 / m
    return (torch.as_tensor(gamma) ** 2 / torch.as_tensor(sigma) ** 2) * bracket


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> Tensor:
    """A random direction in parameter space, scaled filter by filter (Li et al. 2018, Sec. 4).

    For every weight with two or more dimensions, a Gaussian direction of the same shape is drawn and
    each filter (each output unit's row, or each output channel of a convolution) is rescaled to the
    norm of the corresponding filter of the weight. One-dimensional parameters (biases, BN's gamma and
    beta) get a zero direction, as in Li et al.'s default.

    Args:
        model: the network.
        generator: random generator for the Gaussian directions.

    Returns:
        A flat vector in ``named_parameters`` order, on the parameters' device.
    """
    parts = []
    for p in model.parameters():
        w = p.detach()
        if w.dim() <= 1:
            parts.append(torch.zeros_like(w).reshape(-1))
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        dn = d.reshape(w.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        d = d * (wn / dn).view(-1, *([1] * (w.dim() - 1)))
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def loss_surface(
    loss: Callable[[Tensor], Tensor], theta: Tensor, d1: Tensor, d2: Tensor, coords: Sequence[float]
) -> np.ndarray:
    """``L(theta + a d1 + b d2)`` on the grid ``coords x coords``: rows run over ``b``, columns over ``a``.

    Args:
        loss: maps a flat parameter vector to a scalar, e.g. :meth:`ModelObjective.loss`.
        theta: the centre of the slice.
        d1: the first direction (e.g. from :func:`filter_normalized_direction`), the shape of ``theta``.
        d2: the second direction.
        coords: the values of ``a`` and of ``b``.
    """
    if not (theta.shape == d1.shape == d2.shape):
        raise ValueError("theta, d1 and d2 must have the same shape")
    coords = [float(c) for c in coords]
    if not coords:
        raise ValueError("coords must not be empty")
    out = np.empty((len(coords), len(coords)))
    for i, b in enumerate(coords):
        for j, a in enumerate(coords):
            out[i, j] = float(loss(theta + a * d1 + b * d2))
    return out


def landscape_recorder(
    lr: float,
    multipliers: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 4.0),
    loss_fn: LossFn = F.cross_entropy,
    ics: bool = True,
    layers: Sequence[str] | None = None,
) -> Callable[[object], dict[str, object]]:
    """A recorder for :func:`bnlib.lab.training.train` that probes the landscape where training stands.

    At each record step it runs :func:`probe_along_gradient` on the batch the model trains on next,
    with step sizes ``lr * multipliers``, and (``ics=True``) :func:`internal_covariate_shift` with
    learning rate ``lr`` on ``layers`` (default: every weighted layer but the first). Recorded
    names: ``loss_range``, ``grad_change``, ``beta``, ``grad_norm``, and ``ics_l2``,
    ``ics_cosine``, ``ics_relative`` (one value per measured layer).

    Args:
        lr: the learning rate of the training run (positive).
        multipliers: the probe's step sizes, as multiples of ``lr``.
        loss_fn: the loss on one batch.
        ics: also measure internal covariate shift.
        layers: the weights :func:`internal_covariate_shift` measures (default: every weighted layer
            but the first).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    etas = [lr * float(k) for k in multipliers]

    def recorder(state) -> dict[str, object]:
        obj = ModelObjective(state.model, loss_fn, state.x, state.y)
        p = probe_along_gradient(obj, obj.theta(), etas)
        out: dict[str, object] = {
            "loss_range": p.loss_range,
            "grad_change": p.grad_change,
            "beta": p.beta,
            "grad_norm": p.grad_norm,
        }
        if ics:
            m = internal_covariate_shift(state.model, loss_fn, state.x, state.y, lr, layers)
            out.update(ics_l2=m.l2, ics_cosine=m.cosine, ics_relative=m.relative)
        return out

    return recorder
