r"""Scale invariance beyond single weight matrices, and what the first large step does.

- :func:`invariant_affine_groups` finds the :math:`(\gamma, \beta)` pairs of a batch-norm layer
  whose output reaches another batch normalization through a positively homogeneous activation
  (ReLU, leaky ReLU, identity) and a Linear or Conv layer. Scaling such a pair *jointly* by
  :math:`a > 0` scales the next layer's pre-activations by :math:`a` (plus a bias, which the
  mean subtraction removes), and the second normalization divides :math:`a` out: at eps = 0 the
  loss is unchanged, so the pair is one scale-invariant group, like the weights that feed a
  normalization (:func:`bnlib.lab.invariance.invariant_weights`).
- :func:`joint_scaling` measures :math:`L(a p) - L(p)` for a group of parameters scaled together
  and the cosine between the group's gradient and the group (zero for a scale-invariant group).
- :func:`invariant_parameters` lists the invariant weights and those groups together, for an
  optimizer that treats every scale-invariant parameter alike.
- :func:`angle_from_start` is a recorder for :func:`bnlib.lab.training.train`: the angle between
  each invariant weight's rows now and at the start, which after one step is that step's angle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab.invariance import angular_update, invariant_weights
from bnlib.lab.training import Recorder, TrainState
from bnlib.norm.modules import is_batch_norm

__all__ = [
    "invariant_affine_groups",
    "invariant_parameters",
    "JointScaling",
    "joint_scaling",
    "angle_from_start",
]

_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)  # f(a x) = a f(x) for a > 0
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def invariant_affine_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    r"""The :math:`(\gamma, \beta)` pairs that are scale-invariant together (exactly at eps = 0).

    A batch-norm layer of an ``nn.Sequential`` counts when the modules after it are zero or more
    positively homogeneous activations (ReLU, LeakyReLU, Identity), then one Linear or Conv layer,
    then a batch normalization, as in :func:`bnlib.lab.models.mlp` for every hidden layer but the
    last. Its ``weight`` and ``bias`` (only those it has) form one group.

    Args:
        model: the network.

    Returns:
        One list of ``(name, parameter)`` pairs per group.
    """
    groups: list[list[tuple[str, nn.Parameter]]] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for k, (name, layer) in enumerate(children):
            if not is_batch_norm(layer):
                continue
            rest = [child for _, child in children[k + 1 :]]
            j = 0
            while j < len(rest) and isinstance(rest[j], _HOMOGENEOUS):
                j += 1
            if j + 1 < len(rest) and isinstance(rest[j], _LINEAR) and is_batch_norm(rest[j + 1]):
                group = [(f"{prefix}.{name}.{p}" if prefix else f"{name}.{p}", param)
                         for p, param in layer.named_parameters(recurse=False)]
                if group:
                    groups.append(group)
    return groups


def invariant_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every scale-invariant parameter: the weights that feed a normalization
    (:func:`bnlib.lab.invariance.invariant_weights`) and the members of
    :func:`invariant_affine_groups`, in the order of ``model.named_parameters()``.

    Args:
        model: the network.
    """
    chosen = {id(p) for _, p in invariant_weights(model)}
    chosen |= {id(p) for group in invariant_affine_groups(model) for _, p in group}
    return [(name, p) for name, p in model.named_parameters() if id(p) in chosen]


@dataclass(frozen=True)
class JointScaling:
    """What scaling a group of parameters together does to the loss.

    Args:
        scales: the factors :math:`a`.
        loss_gaps: :math:`L(a p) - L(p)` for each factor (training-mode loss).
        radial_cosine: cosine between the group's gradient and the group's values, each flattened
            and concatenated over the group's parameters.
    """

    scales: np.ndarray
    loss_gaps: np.ndarray
    radial_cosine: float


def joint_scaling(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    scales: Sequence[float],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> JointScaling:
    """Scale the named parameters together by each factor and measure the loss; also the radial
    part of their gradient. Works on a copy: ``model`` (and its running statistics) is unchanged.

    Args:
        model: the network (evaluated in training mode, on the whole batch ``x``).
        names: parameter names, as in ``model.named_parameters()``.
        x: the inputs.
        y: the targets.
        scales: positive factors.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar loss.

    Returns:
        A :class:`JointScaling`.
    """
    if not names:
        raise ValueError("names is empty")
    if any(not a > 0 for a in scales):
        raise ValueError(f"scales must be positive, got {list(scales)}")
    probe = copy.deepcopy(model).train()
    params = dict(probe.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameters named {missing}")
    group = [params[n] for n in names]
    probe.zero_grad(set_to_none=True)
    base = loss_fn(probe(x), y)
    grads = torch.autograd.grad(base, group)
    g = torch.cat([t.reshape(-1) for t in grads])
    v = torch.cat([p.detach().reshape(-1) for p in group])
    cosine = float(g @ v / (g.norm() * v.norm()))
    originals = [p.detach().clone() for p in group]
    gaps = []
    with torch.no_grad():
        for a in scales:
            for p, p0 in zip(group, originals):
                p.copy_(a * p0)
            gaps.append(float(loss_fn(probe(x), y) - base))
    return JointScaling(np.asarray(scales, dtype=float), np.asarray(gaps), cosine)


def angle_from_start(model: nn.Module) -> Recorder:
    """A recorder of ``angle_from_start``: for each weight of
    :func:`bnlib.lab.invariance.invariant_weights`, the mean over rows of the angle (radians)
    between the row now and the row when this function was called (call it before training).

    Args:
        model: the network whose invariant weights are remembered now.
    """
    start = [w.detach().clone() for _, w in invariant_weights(model)]
    if not start:
        raise ValueError("the model has no scale-invariant weights")

    def recorder(state: TrainState) -> dict[str, Tensor]:
        now = [w.detach() for _, w in invariant_weights(state.model)]
        angles = [angular_update(w0, w).mean() for w0, w in zip(start, now)]
        return {"angle_from_start": torch.stack(angles)}

    return recorder
