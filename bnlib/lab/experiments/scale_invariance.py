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
- :class:`AngularTracker` is a callback for the same loop: the angle every update turns each
  invariant weight's rows by (mean and mean square over rows) and the weights' squared norms.
- The invariance holds in training mode, where every batch is normalized by its own statistics. In
  eval mode the running averages can break it: :func:`eval_disagreement` compares two networks'
  eval-mode outputs, :func:`with_recomputed_statistics` gives a copy whose running statistics are
  population statistics at its current weights, and :func:`recomputed_test_metrics` is a recorder of
  the test accuracy measured with such a copy (not lagging the weights as the running averages do).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab.invariance import angular_update, invariant_weights, row_norms
from bnlib.lab.measure import device_of, evaluate
from bnlib.lab.training import Recorder, TrainState
from bnlib.norm.modules import is_batch_norm
from bnlib.norm.population import recompute_statistics

__all__ = [
    "invariant_affine_groups",
    "invariant_parameters",
    "JointScaling",
    "joint_scaling",
    "angle_from_start",
    "AngularTracker",
    "EvalDisagreement",
    "eval_disagreement",
    "with_recomputed_statistics",
    "recomputed_test_metrics",
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


class AngularTracker:
    """A callback for :func:`bnlib.lab.training.train` that follows the invariant weights
    (:func:`bnlib.lab.invariance.invariant_weights`) update by update.

    After every update it records, for each weight, the mean over rows of the angle the update
    turned each row by (:func:`bnlib.lab.invariance.angular_update`), the mean of its square, and
    the mean squared row norm. Create it after the weights have their starting values.

    The records are ``mean_angle``, ``mean_sq_angle`` and ``sq_norm``, arrays of shape
    ``(updates, weights)``, and ``start_sq_norm``, the mean squared row norms at creation, of shape
    ``(weights,)``.

    Args:
        model: the network being trained.
    """

    def __init__(self, model: nn.Module) -> None:
        self.weights = [w for _, w in invariant_weights(model)]
        if not self.weights:
            raise ValueError("the model has no scale-invariant weights")
        self.before = [w.detach().clone() for w in self.weights]
        self.start_sq_norm = np.array(self._sq_norms())
        self._log: dict[str, list[list[float]]] = {"mean_angle": [], "mean_sq_angle": [], "sq_norm": []}

    def _sq_norms(self) -> list[float]:
        return [float((row_norms(w.detach()) ** 2).mean()) for w in self.weights]

    def __call__(self, state: TrainState) -> None:
        turns = [angular_update(b, w.detach()) for b, w in zip(self.before, self.weights)]
        self._log["mean_angle"].append([float(u.mean()) for u in turns])
        self._log["mean_sq_angle"].append([float(u.pow(2).mean()) for u in turns])
        self._log["sq_norm"].append(self._sq_norms())
        self.before = [w.detach().clone() for w in self.weights]

    @property
    def mean_angle(self) -> np.ndarray:
        """Mean over rows of the angle (radians) each update turned the rows by."""
        return np.array(self._log["mean_angle"]).reshape(-1, len(self.weights))

    @property
    def mean_sq_angle(self) -> np.ndarray:
        """Mean over rows of the squared angle of each update."""
        return np.array(self._log["mean_sq_angle"]).reshape(-1, len(self.weights))

    @property
    def sq_norm(self) -> np.ndarray:
        """Mean squared row norm after each update."""
        return np.array(self._log["sq_norm"]).reshape(-1, len(self.weights))


@dataclass(frozen=True)
class EvalDisagreement:
    """How far two classifiers' eval-mode outputs are apart on the same inputs.

    Args:
        max_logit_gap: largest absolute difference of the outputs over all inputs and classes.
        disagreement: fraction of inputs whose argmax predictions differ.
    """

    max_logit_gap: float
    disagreement: float


@torch.no_grad()
def eval_disagreement(model_a: nn.Module, model_b: nn.Module, x: Tensor) -> EvalDisagreement:
    """Compare two networks in eval mode (running statistics) on ``x``; both are left in the
    mode they were in.

    Args:
        model_a: a classifier returning logits (N, classes).
        model_b: another, with outputs of the same shape.
        x: the inputs (moved to each model's device).

    Returns:
        An :class:`EvalDisagreement`.
    """
    outputs = []
    for model in (model_a, model_b):
        mode = model.training
        model.eval()
        try:
            outputs.append(model(x.to(device_of(model))).cpu())
        finally:
            model.train(mode)
    a, b = outputs
    if a.shape != b.shape:
        raise ValueError(f"the outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return EvalDisagreement(float((a - b).abs().max()),
                            float((a.argmax(dim=1) != b.argmax(dim=1)).double().mean()))


def with_recomputed_statistics(model: nn.Module, x: Tensor, batch_size: int = 500) -> nn.Module:
    """A copy of ``model`` whose batch-norm running statistics are population statistics of ``x``
    at the current weights (:func:`bnlib.norm.population.recompute_statistics`); ``model`` is
    unchanged.

    Args:
        model: the network.
        x: training inputs, fed in consecutive batches of ``batch_size`` (the last may be smaller).
        batch_size: examples per forward pass; large batches only save time, since the running
            variance becomes the average of the batches' unbiased variances.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2, got {batch_size}")
    copy_ = copy.deepcopy(model)
    recompute_statistics(copy_, x.to(device_of(copy_)).split(batch_size))
    return copy_


def recomputed_test_metrics(
    x_train: Tensor, x_test: Tensor, y_test: Tensor, batch_size: int = 500, prefix: str = "recomputed_"
) -> Recorder:
    """A recorder of ``{prefix}accuracy`` and ``{prefix}loss`` on ``(x_test, y_test)`` in eval mode,
    with statistics recomputed from ``x_train`` at the current weights
    (:func:`with_recomputed_statistics`; the trained model and its running averages are unchanged).

    Args:
        x_train: inputs the statistics are computed from.
        x_test: held-out inputs.
        y_test: their class indices.
        batch_size: see :func:`with_recomputed_statistics`.
        prefix: put before both names.
    """

    def recorder(state: TrainState) -> dict[str, float]:
        loss, acc = evaluate(with_recomputed_statistics(state.model, x_train, batch_size), x_test, y_test)
        return {f"{prefix}accuracy": acc, f"{prefix}loss": loss}

    return recorder
