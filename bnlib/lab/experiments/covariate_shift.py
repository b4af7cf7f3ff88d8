"""The experiments of the internal-covariate-shift chapter.

- Feature scaling: :func:`gd_path` runs gradient descent with step 1/L on a least-squares problem
  and records how far it gets; :func:`hessian_condition` is the condition number it depends on.
- Ioffe & Szegedy's MNIST experiment (their Fig. 1): :func:`sigmoid_mlp` builds the network, with
  batch normalization before the sigmoid (their placement) or after it, and with their small
  Gaussian weights or a Glorot initialization scaled for the sigmoid; :func:`mnist_run` trains one
  and records what the chapter reads, per hidden layer: the sigmoid inputs, the inputs of the BN
  layers, and BN's learned scale and shift. :func:`band_growth`, :func:`band_widening`, :func:`median_move`,
  :func:`std_growth` and :func:`mean_drift` summarize the recordings.
- ReLU dead and linear units: :func:`relu_units_run`, :func:`dead_rows_gradient`.
- Ordinary covariate shift: :func:`affine_shift_study` evaluates a trained BN network on affinely
  changed inputs with its stored statistics, after standardizing the inputs, and with statistics
  recomputed on changed inputs (AdaBN, Li et al. 2016).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bnlib.lab import measure, models, training
from bnlib.lab.data import Split, index_batches
from bnlib.norm.population import batch_norm_layers, recompute_statistics

__all__ = [
    "GDPath",
    "gd_path",
    "hessian_condition",
    "PAPER_STD",
    "SIGMOID_GAIN",
    "sigmoid_mlp",
    "mnist_run",
    "band_growth",
    "band_widening",
    "median_move",
    "std_growth",
    "mean_drift",
    "relu_units_run",
    "dead_rows_gradient",
    "affine_shift_study",
]

NormFactory = Callable[[int], nn.Module]
#: the standard deviation of every weight in our runs of Ioffe & Szegedy's MNIST network
PAPER_STD = 0.1
#: the gain on Glorot's scale usually recommended for sigmoid layers (4x)
SIGMOID_GAIN = 4.0


@dataclass(frozen=True)
class GDPath:
    """A gradient-descent run on a least-squares problem (what :func:`gd_path` returns).

    Args:
        path: the weights after each step, ``(steps + 1, d)``; row 0 is the start, 0.
        w_star: the least-squares solution.
        hessian: the Hessian of the mean squared error, ``X^T X / n``.
        kappa: its condition number (largest over smallest eigenvalue).
        excess: the loss minus its minimum after each step, over its value at the start, ``(steps + 1,)``.
        steps_to_tol: the first step whose relative excess loss is below the tolerance (None: never).
    """

    path: np.ndarray
    w_star: np.ndarray
    hessian: np.ndarray
    kappa: float
    excess: np.ndarray
    steps_to_tol: int | None

    @property
    def remaining(self) -> float:
        """The relative excess loss left after the last step."""
        return float(self.excess[-1])


def hessian_condition(X: np.ndarray) -> float:
    """Condition number of ``X^T X / n``, the Hessian of the mean squared error of a linear model.

    Args:
        X: the features, ``(n, d)``.
    """
    eig = np.linalg.eigvalsh(X.T @ X / len(X))
    return float(eig.max() / eig.min())


def gd_path(X: np.ndarray, y: np.ndarray, steps: int, tol: float = 1e-6) -> GDPath:
    """Gradient descent from 0 with step ``1/L`` on the mean squared error ``|Xw - y|^2 / (2n)``.

    ``L`` is the largest eigenvalue of the Hessian ``H = X^T X / n``, the textbook step that
    guarantees descent. The excess loss ``(w - w*)^T H (w - w*) / 2`` is recorded after every step.

    Args:
        X: the features, ``(n, d)``.
        y: the targets, ``(n,)``.
        steps: the number of steps (positive).
        tol: the relative excess loss :attr:`GDPath.steps_to_tol` waits for.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    H, g0 = X.T @ X / len(X), X.T @ y / len(X)
    w_star = np.linalg.solve(H, g0)
    eig = np.linalg.eigvalsh(H)
    lr = 1 / eig.max()
    w = np.zeros(len(w_star))
    path = [w]
    for _ in range(steps):
        w = w - lr * (H @ w - g0)
        path.append(w)
    path_arr = np.array(path)
    diff = path_arr - w_star
    excess = 0.5 * np.einsum("si,ij,sj->s", diff, H, diff)
    excess = excess / excess[0]
    hit = np.nonzero(excess < tol)[0]
    return GDPath(path_arr, w_star, H, float(eig.max() / eig.min()), excess, int(hit[0]) if len(hit) else None)


def sigmoid_mlp(
    norm: NormFactory | None = None,
    seed: int = 0,
    placement: str = "before",
    init: str = "paper",
    sizes: Sequence[int] = (784, 100, 100, 100, 10),
) -> nn.Sequential:
    """Ioffe & Szegedy's MNIST network: hidden sigmoid layers, optionally batch-normalized.

    With ``placement="before"`` (the paper's) a hidden layer is Linear (no bias) -> norm -> Sigmoid,
    the layout of :func:`bnlib.lab.models.mlp`, which gives the same weights for the same seed;
    with ``"after"`` it is Linear (with bias) -> Sigmoid -> norm. The last layer is a Linear
    (logits). Biases start at 0. Weights are drawn in layer order from one generator seeded with
    ``seed``: from N(0, PAPER_STD^2) with ``init="paper"``, or with ``init="sigmoid-glorot"`` from
    N(0, 2 / (fan_in + fan_out)) (Glorot's variance) times SIGMOID_GAIN^2 in the hidden layers and
    times 1 in the output layer.

    Args:
        norm: normalization factory, e.g. ``bnlib.BatchNorm1d`` (None: no normalization).
        seed: seed of the initialization.
        placement: ``"before"`` or ``"after"`` the sigmoid (ignored without ``norm``).
        init: ``"paper"`` or ``"sigmoid-glorot"``.
        sizes: input size, hidden sizes..., output size.
    """
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
    if init not in ("paper", "sigmoid-glorot"):
        raise ValueError(f"init must be 'paper' or 'sigmoid-glorot', got {init!r}")
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    pairs = list(zip(sizes[:-1], sizes[1:]))
    for i, (fan_in, fan_out) in enumerate(pairs):
        last = i == len(pairs) - 1
        linear = nn.Linear(fan_in, fan_out, bias=last or norm is None or placement == "after")
        if init == "paper":
            std = PAPER_STD
        else:
            std = (1.0 if last else SIGMOID_GAIN) * math.sqrt(2.0 / (fan_in + fan_out))
        with torch.no_grad():
            linear.weight.normal_(0.0, std, generator=g)
            if linear.bias is not None:
                linear.bias.zero_()
        layers.append(linear)
        if not last:
            block = [nn.Sigmoid()] if norm is None else [norm(fan_out), nn.Sigmoid()]
            layers += block if placement == "before" else block[::-1]
    return nn.Sequential(*layers)


def _bn_kinds(net: nn.Module) -> tuple[type, ...]:
    return tuple({type(m) for m in batch_norm_layers(net)})


def _layer_record(net: nn.Module, x: Tensor) -> tuple[dict[str, Any], list[Tensor]]:
    """Per hidden layer, over the examples ``x`` (batch statistics): statistics of the sigmoid inputs
    and BN inputs, and the sigmoid inputs themselves."""
    kinds = _bn_kinds(net)
    zs = measure.layer_inputs(net, x, kind=(nn.Sigmoid, *kinds), train=True)
    sig = [z for z, m in zip(zs, _captured(net, kinds)) if isinstance(m, nn.Sigmoid)]
    out: dict[str, Any] = {
        "percentiles": measure.percentiles(sig[-1]),  # (q, unit), last hidden layer
        "saturation": torch.stack([measure.sigmoid_saturation(z) for z in sig]),  # (layer,)
        "sig_std": torch.stack([z.std(0, unbiased=False) for z in sig]),  # (layer, unit)
        "sig_mean": torch.stack([z.mean(0) for z in sig]),
    }
    if kinds:
        bn_in = [z for z, m in zip(zs, _captured(net, kinds)) if not isinstance(m, nn.Sigmoid)]
        layers = batch_norm_layers(net)
        out["bn_std"] = torch.stack([z.std(0, unbiased=False) for z in bn_in])
        out["bn_mean"] = torch.stack([z.mean(0) for z in bn_in])
        out["gamma"] = torch.stack([bn.weight.detach().clone() for bn in layers])
        out["beta"] = torch.stack([bn.bias.detach().clone() for bn in layers])
    return out, sig


def _captured(net: nn.Module, kinds: tuple[type, ...]) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Sigmoid, *kinds))]


def mnist_run(
    net: nn.Module,
    split: Split,
    *,
    steps: int,
    seed: int,
    record_at: Sequence[int],
    detail: bool = True,
    frame_steps: Sequence[int] = (),
    frame_examples: int = 200,
    probe: int = 600,
    lr: float = 0.1,
    batch_size: int = 60,
) -> dict[str, Any]:
    """Train one network of the MNIST experiment with plain SGD and record along the way.

    At every step of ``record_at`` the test accuracy and loss are recorded (inference mode, running
    statistics). With ``detail`` the run also records, on the test inputs normalized with their own
    batch statistics (the running statistics are left untouched):

    - ``percentiles``: the 15th, 50th, 85th percentile of every last-hidden-layer sigmoid input, (q, unit);
    - ``saturation``: the fraction of saturated sigmoid inputs per hidden layer;
    - ``sig_std``, ``sig_mean``: per hidden layer and unit, the (biased) standard deviation and the
      mean of the sigmoid input over the test inputs, (layer, unit);
    - for a network with BN: ``bn_std``, ``bn_mean`` of each BN layer's input, and its ``gamma``
      and ``beta``, (layer, unit);

    and, outside the history: ``frames`` (step -> sigmoid inputs of the first ``frame_examples`` test
    inputs, (layer, example, unit)), ``grad0`` and ``grad_end`` (the weight-gradient norm of every
    Linear layer on the first ``probe`` training examples, at the start and the end), ``sigma_b0``
    (with BN: the mean per-unit batch standard deviation of the BN inputs of the hidden layers after
    the first, on the same examples, at the start) and ``train_stats`` (with BN, at the end: each BN
    input's per-unit ``mean`` and ``std`` over all training inputs, (layer, unit)).

    Args:
        net: the network (trained in place), e.g. from :func:`sigmoid_mlp`.
        split: the data; the test part is what the recorders look at.
        steps: parameter updates.
        seed: seed of the mini-batch order.
        record_at: the steps at which to record.
        detail: record the layer statistics (False: the accuracy only).
        frame_steps: the steps at which to keep the sigmoid inputs of ``frame_examples`` test inputs.
        frame_examples: how many test inputs a frame keeps.
        probe: how many training examples the gradient norms use.
        lr: learning rate of plain SGD.
        batch_size: examples per update.

    Returns:
        ``dict(net=..., hist=History, frames=..., grad0=..., grad_end=...)``, plus ``sigma_b0`` and
        ``train_stats`` for a network with BN.
    """
    frames: dict[int, np.ndarray] = {}

    def layers(state: training.TrainState) -> dict[str, Any]:
        out, sig = _layer_record(state.model, split.x_test)
        if state.step in frame_steps:
            frames[state.step] = torch.stack([z[:frame_examples] for z in sig]).cpu().numpy()
        return out

    px, py = split.x_train[:probe], split.y_train[:probe]
    result: dict[str, Any] = {"net": net, "frames": frames}
    kinds = _bn_kinds(net)
    if detail:
        result["grad0"] = measure.grad_norms(net, px, py).cpu().numpy()
        if kinds:
            bn_in = measure.layer_inputs(net, px, kind=kinds, train=True)
            result["sigma_b0"] = float(torch.cat([z.std(0) for z in bn_in[1:]]).mean())
    recorders = [training.test_metrics(split.x_test, split.y_test)] + ([layers] if detail else [])
    result["hist"] = training.train(net, split.x_train, split.y_train, steps=steps, batch_size=batch_size, lr=lr,
                                    seed=seed, record_at=record_at, recorders=recorders)
    if detail:
        result["grad_end"] = measure.grad_norms(net, px, py).cpu().numpy()
        if kinds:
            bn_in = measure.layer_inputs(net, split.x_train, kind=kinds, train=True)
            result["train_stats"] = {"mean": torch.stack([z.mean(0) for z in bn_in]).cpu().numpy(),
                                     "std": torch.stack([z.std(0, unbiased=False) for z in bn_in]).cpu().numpy()}
    return result


def band_growth(percentiles: np.ndarray) -> np.ndarray:
    """Per unit: the 15-85 percentile spread at the last recorded step over that at the first.

    Args:
        percentiles: (recorded step, q, unit) with q = 15th, 50th, 85th percentile.
    """
    p = np.asarray(percentiles)
    return (p[-1, 2] - p[-1, 0]) / (p[0, 2] - p[0, 0])


def band_widening(percentiles: np.ndarray) -> np.ndarray:
    """Per unit: how much the 15-85 percentile spread widens from the first to the last recorded
    step, in the input's own units (the last spread minus the first; no yardstick).

    Args:
        percentiles: (recorded step, q, unit) with q = 15th, 50th, 85th percentile.
    """
    p = np.asarray(percentiles)
    return (p[-1, 2] - p[-1, 0]) - (p[0, 2] - p[0, 0])


def median_move(percentiles: np.ndarray) -> float:
    """How far the units' medians move from the first to the last recorded step: the median over units.

    Args:
        percentiles: (recorded step, q, unit) with q = 15th, 50th, 85th percentile.
    """
    p = np.asarray(percentiles)
    return float(np.median(np.abs(p[-1, 1] - p[0, 1])))


def std_growth(stds: np.ndarray, start: int = 0, end: int = -1) -> np.ndarray:
    """Per layer: the median over units of a unit's standard deviation at ``end`` over that at ``start``.

    Args:
        stds: (recorded step, layer, unit), e.g. the ``sig_std`` record of :func:`mnist_run`.
        start: the index of the first recorded step compared.
        end: the index of the second.
    """
    s = np.asarray(stds)
    return np.median(s[end] / s[start], axis=-1)


def mean_drift(means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """Per layer: the median over units of how far a unit's mean moves from the first to the last
    recorded step, in units of its standard deviation at the first.

    Args:
        means: (recorded step, layer, unit).
        stds: the same shape.
    """
    m, s = np.asarray(means), np.asarray(stds)
    return np.median(np.abs(m[-1] - m[0]) / s[0], axis=-1)


def relu_units_run(
    split: Split, norm: NormFactory | None, seed: int, steps: int, shift: float = 1.0, lr: float = 0.1
) -> dict[float, dict[str, Any]]:
    """Dead and linear units of the MNIST network with ReLU, on the pixels as they are and shifted.

    Builds :func:`bnlib.lab.models.mlp` ``[inputs, 100, 100, 100, classes]`` with ReLU, N(0, PAPER_STD^2)
    weights and ``norm`` (twice, from the same seed). Counts (:func:`bnlib.lab.measure.dead_and_linear`,
    batch statistics) on the test inputs as they are, at initialization; and on inputs shifted by
    ``shift``, at initialization and after ``steps`` updates of training on shifted training inputs
    (batch 60, plain SGD), with the test accuracy at the end.

    Args:
        split: the data.
        norm: normalization factory (None: no normalization).
        seed: seed of the initialization and of the mini-batch order.
        steps: training steps on shifted inputs.
        shift: added to every pixel.
        lr: learning rate.

    Returns:
        ``{0.0: {"before": (dead, linear)}, shift: {"net", "before", "after", "acc"}}``, each
        ``(dead, linear)`` a pair of NumPy arrays with one fraction per hidden layer.
    """

    def net() -> nn.Sequential:
        g = torch.Generator().manual_seed(seed)
        sizes = [split.x_train.shape[1], 100, 100, 100, split.num_classes]
        return models.mlp(sizes, "relu", norm, init_std=PAPER_STD, generator=g).to(split.x_train.device)

    def units(model: nn.Module, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
        return tuple(t.cpu().numpy() for t in measure.dead_and_linear(model, x))

    out: dict[float, dict[str, Any]] = {0.0: {"before": units(net(), split.x_test)}}
    model, x_shift = net(), split.x_test + shift
    before = units(model, x_shift)
    h = training.train(model, split.x_train + shift, split.y_train, steps=steps, batch_size=60, lr=lr, seed=seed,
                       record_at=[steps], recorders=[training.test_metrics(x_shift, split.y_test)])
    out[shift] = {"net": model, "before": before, "after": units(model, x_shift), "acc": float(h["accuracy"][-1])}
    return out


def dead_rows_gradient(net: nn.Module, x: Tensor, y: Tensor) -> tuple[int, float]:
    """The dead units of the first hidden layer on ``x`` and the largest gradient their weights get.

    A unit is dead when its ReLU input is <= 0 for every example of ``x`` (batch statistics); its
    row of the first weight matrix then receives exactly zero gradient from the loss on ``(x, y)``.

    Args:
        net: a ReLU network whose first module of type Linear is the first layer.
        x: the inputs (one batch).
        y: their class indices.

    Returns:
        ``(number of dead units, largest absolute gradient entry in their rows)``.
    """
    first = next(m for m in net.modules() if isinstance(m, nn.Linear))
    dead = measure.layer_inputs(net, x, kind=nn.ReLU, train=True)[0].le(0).all(0)
    with measure.preserved(net, train=True):
        loss = nn.functional.cross_entropy(net(x), y)
        (grad,) = torch.autograd.grad(loss, [first.weight])
    return int(dead.sum()), float(grad[dead].abs().max()) if dead.any() else 0.0


@torch.no_grad()
def affine_shift_study(
    net: nn.Module, split: Split, scale: float, offset: float, batch_size: int = 60, seed: int = 0
) -> dict[str, Any]:
    """A trained BN network on inputs changed by ``x -> scale * x + offset``, four ways.

    - ``"test digits"``: the unchanged test inputs, stored (running) statistics;
    - ``"shifted"``: the changed test inputs, stored statistics;
    - ``"standardized"``: the changed test inputs with their mean and standard deviation matched
      to those of the training inputs (all pixels pooled), stored statistics;
    - ``"AdaBN"``: the changed test inputs, with every BN layer's statistics recomputed
      (:func:`bnlib.norm.population.recompute_statistics`) on the changed training inputs, in one
      pass over seeded batches of ``batch_size``;
    - ``"recomputed"``: the unchanged test inputs, statistics recomputed in the same way on the
      same batches of unchanged training inputs.

    When the first layer is a Linear without bias followed by BN and ``scale > 0``, the first BN
    layer normalizes ``W(scale x + offset)`` with mean ``scale mu + W offset`` and variance
    ``scale^2 sigma^2`` to ``(Wx - mu) / sqrt(sigma^2 + eps / scale^2)``, so AdaBN on changed inputs
    equals ``"recomputed"`` on unchanged ones up to the change of eps (and round-off).

    Args:
        net: the trained network (not changed; copies are).
        split: the data.
        scale: the factor of the affine change (positive for the identity above).
        offset: the offset.
        batch_size: examples per batch of the recomputation.
        seed: seed of the batches.

    Returns:
        The accuracy of each of the five, and ``"logit_gap"``: the largest absolute difference of the
        logits of ``"AdaBN"`` and ``"recomputed"`` over the largest absolute logit; ``"same_predictions"``;
        ``"first_var_min"``: the smallest recomputed variance of the first BN layer's input (unchanged inputs);
        ``"eps"``: that layer's eps.
    """
    shift = lambda x: scale * x + offset  # noqa: E731
    x_tr, x_te, y_te = split.x_train, split.x_test, split.y_test
    changed = shift(x_te)
    matched = (changed - changed.mean()) / changed.std() * x_tr.std() + x_tr.mean()
    order = index_batches(len(x_tr), batch_size, torch.Generator().manual_seed(seed))
    idx = [next(order).to(x_tr.device) for _ in range(len(x_tr) // batch_size)]
    clean, adapted = copy.deepcopy(net), copy.deepcopy(net)
    recompute_statistics(clean, [x_tr[i] for i in idx])
    recompute_statistics(adapted, [shift(x_tr[i]) for i in idx])
    acc = {name: measure.evaluate(model, x, y_te)[1] for name, model, x in [
        ("test digits", net, x_te), ("shifted", net, changed), ("standardized", net, matched),
        ("AdaBN", adapted, changed), ("recomputed", clean, x_te)]}
    logits_clean, logits_adapted = clean.eval()(x_te), adapted.eval()(changed)
    first = batch_norm_layers(clean)[0]
    return dict(acc, logit_gap=float((logits_adapted - logits_clean).abs().max() / logits_clean.abs().max()),
                same_predictions=bool(torch.equal(logits_clean.argmax(1), logits_adapted.argmax(1))),
                first_var_min=float(first.running_var.min()), eps=float(first.eps))
