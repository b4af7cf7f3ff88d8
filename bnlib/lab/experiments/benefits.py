r"""Measurements behind the chapter on what batch normalization buys in practice.

- Gradient flow: :func:`hidden_grad_norms` gives the norm of the loss gradient with respect to each
  hidden layer's output (all of one width, so the norms compare fairly), :func:`growth_per_layer`
  the factor by which it grows per layer towards the input, and :func:`gradient_growth` that factor
  at initialization for several depths and seeds (BN's gradient explosion, Yang et al. 2019);
  :func:`scale_weights_` over-scales an initialization, to give a plain network an explosion.
  :func:`sigmoid_slopes` says whether sigmoid units sit in their linear middle or saturate.
- Learning rate: :func:`effective_lr_recorder` records :math:`\eta/\|w\|^2` of the scale-invariant
  weights during training, :func:`relative_first_step` the size of the first update of each layer,
  :func:`first_nonfinite` when a loss overflows.
- Model selection: :func:`select_by_validation` picks, per seed, the learning rate and checkpoint
  with the best validation accuracy and reports the test accuracy there; :func:`steps_to` and
  :func:`trains` (with :func:`largest_trained`) measure speed and success on the validation
  accuracy too, so that the test set only reports results. :func:`first_update` gives the size of
  one SGD step and what it leaves of the effective learning rate, on one batch.
- Overtraining: :func:`with_dropout` adds dropout to a network, :func:`logit_metrics` records
  accuracy, loss and the size of the logits in one pass, :func:`overfit_run` trains a network on a
  small set and records both, and :func:`batch_statistics_noise` measures how much the batch mean
  and variance of a layer's input move from batch to batch, for several batch sizes;
  :func:`finite_population_factor` corrects :math:`1/\sqrt{B}` for batches drawn without
  replacement from a finite set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab.invariance import effective_lr, invariant_weights
from bnlib.lab.measure import LossFn, device_of, layer_inputs, preserved, sigmoid_saturation
from bnlib.lab.seeds import Spread, over_seeds
from bnlib.lab.sweeps import Sweep
from bnlib.lab.training import History, Recorder, TrainState, every, test_metrics, train

__all__ = [
    "hidden_grad_norms",
    "growth_per_layer",
    "gradient_growth",
    "scale_weights_",
    "sigmoid_slopes",
    "effective_lr_recorder",
    "relative_first_step",
    "first_nonfinite",
    "first_update",
    "Choice",
    "select_by_validation",
    "test_at_validation_best",
    "steps_to",
    "trains",
    "largest_trained",
    "with_dropout",
    "logit_metrics",
    "overfit_run",
    "batch_statistics_noise",
    "finite_population_factor",
]


def hidden_grad_norms(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    r"""Norm of the loss gradient w.r.t. the input of every Linear layer but the first, in forward order.

    In a :func:`bnlib.lab.models.mlp` these inputs are the hidden layers' outputs :math:`h_l`, so
    the result is :math:`\|\partial L/\partial h_l\|` for :math:`l = 1, \dots, L`; with hidden
    layers of one width the norms compare like for like (weight gradients of a 784 x 100 and a
    100 x 100 matrix do not). Computed on the batch in training mode (batch statistics); the model's
    mode, buffers and ``.grad`` fields are left as they were.

    Args:
        model: the network (its parameters must require gradients).
        x: inputs of the batch.
        y: its targets.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar loss.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][1:]
    if not linears:
        raise ValueError("the model needs at least two Linear layers")
    captured: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0])) for m in linears]
    try:
        with preserved(model, train=True):
            dev = device_of(model)
            loss = loss_fn(model(x.to(dev)), y.to(dev))
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, captured)
    return torch.stack([g.norm() for g in grads]).detach()


def growth_per_layer(norms: Sequence[float] | Tensor) -> float:
    """Geometric-mean factor by which a gradient norm grows per layer from the last entry to the first.

    ``(norms[0] / norms[-1]) ** (1 / (len(norms) - 1))``: above 1 the gradient grows towards the
    input (explodes), below 1 it shrinks (vanishes).

    Args:
        norms: gradient norms of equally wide layers in forward order (at least two, positive),
            e.g. from :func:`hidden_grad_norms`.
    """
    values = [float(v) for v in norms]
    if len(values) < 2 or min(values) <= 0:
        raise ValueError(f"need at least two positive norms, got {values}")
    return (values[0] / values[-1]) ** (1.0 / (len(values) - 1))


def gradient_growth(
    build: Callable[[int, int], nn.Module], depths: Sequence[int], x: Tensor, y: Tensor, seeds: Sequence[int] | None
) -> dict[int, Spread]:
    """:func:`growth_per_layer` of :func:`hidden_grad_norms` at initialization, per depth, over seeds.

    Args:
        build: ``build(depth, seed)`` returns a freshly initialized network with ``depth`` hidden layers.
        depths: the depths (each at least 2).
        x: the batch the gradients are taken on.
        y: its targets.
        seeds: the seeds (None: :func:`bnlib.lab.seeds.default_seeds`).

    Returns:
        ``{depth: Spread of the factor over the seeds}``.
    """
    if any(d < 2 for d in depths):
        raise ValueError(f"every depth needs at least two hidden layers, got {list(depths)}")
    runs = over_seeds(
        lambda seed: {d: growth_per_layer(hidden_grad_norms(build(d, seed), x, y)) for d in depths}, seeds
    )
    return {d: runs.spread(lambda r, d=d: r[d]) for d in depths}


def scale_weights_(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every Linear/Conv weight of ``model`` by ``factor`` in place; returns the model.

    Applied after He initialization with ``factor`` > 1 it gives the badly scaled initialization
    under which a plain ReLU network's gradient grows by about ``factor`` per layer.

    Args:
        model: the model whose Linear and Conv1d/2d/3d weights are scaled (biases are not).
        factor: the factor (positive).
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                layer.weight.mul_(factor)
    return model


def sigmoid_slopes(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per sigmoid layer: the mean slope :math:`\sigma'(z)` of its units on ``x``, and the saturated fraction.

    The slope is at most 1/4 (at :math:`z = 0`); a unit counts as saturated when its output lies
    within 0.05 of 0 or 1 (:func:`bnlib.lab.measure.sigmoid_saturation`). Inputs are taken in
    training mode (batch statistics).

    Args:
        model: a network with ``nn.Sigmoid`` activations.
        x: the inputs (one batch).

    Returns:
        ``(slope, saturated)``, two 1-D tensors with one value per sigmoid layer, in forward order.
    """
    zs = layer_inputs(model, x, nn.Sigmoid, train=True)
    slope = torch.stack([(torch.sigmoid(z) * (1 - torch.sigmoid(z))).mean() for z in zs])
    saturated = torch.stack([sigmoid_saturation(z) for z in zs])
    return slope, saturated


def effective_lr_recorder(at: Sequence[int]) -> Recorder:
    r"""A recorder of ``effective_lr``: per scale-invariant weight, the median over its rows of :math:`\eta/\|w_i\|^2`.

    The weights are those of :func:`bnlib.lab.invariance.invariant_weights`, in forward order, and
    :math:`\eta` the learning rate of the optimizer's first parameter group. It records at the
    steps in ``at`` only (step 1 is the state after the first update).

    Args:
        at: the steps to record at.
    """
    steps = {int(s) for s in at}

    def record(state: TrainState) -> dict[str, np.ndarray] | None:
        if state.step not in steps:
            return None
        weights = invariant_weights(state.model)
        if not weights:
            raise ValueError("the model has no scale-invariant weights")
        lr = float(state.optimizer.param_groups[0]["lr"])
        return {"effective_lr": np.array([float(effective_lr(lr, w.detach()).median()) for _, w in weights])}

    return record


def relative_first_step(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> Tensor:
    r"""Size of one plain SGD step of every Linear layer's weight relative to the weight, :math:`\eta\|g\|/\|W\|`.

    The gradient is taken on ``(x, y)`` in training mode; nothing is updated.

    Args:
        model: the network.
        x: inputs of the batch.
        y: its targets.
        lr: the learning rate :math:`\eta`.

    Returns:
        A 1-D tensor, one ratio per Linear layer in forward order.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if not weights:
        raise ValueError("the model has no Linear layer")
    with preserved(model, train=True):
        dev = device_of(model)
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
    grads = torch.autograd.grad(loss, weights)
    return torch.stack([lr * g.norm() / w.detach().norm() for g, w in zip(grads, weights)])


def first_nonfinite(losses: Sequence[float] | np.ndarray) -> int:
    """The update (counted from 1) whose training loss is the first that is not finite.

    Args:
        losses: the training loss of every update, e.g. ``History.train_loss``.
    """
    bad = ~np.isfinite(np.asarray(losses, dtype=float))
    if not bad.any():
        raise ValueError("every loss is finite")
    return int(np.argmax(bad)) + 1


def first_update(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    r"""One plain SGD step on ``(x, y)``: its size per Linear layer, and what it leaves of the effective rate.

    Both come from the same gradient (training mode, on the one batch), so they describe the same
    step; nothing is updated. The first is :math:`\eta\|g\|/\|W\|` for every Linear layer's
    weight (as :func:`relative_first_step`); the second, for every scale-invariant weight
    (:func:`bnlib.lab.invariance.invariant_weights`), the median over rows of
    :math:`\eta/\|w_i - \eta g_i\|^2` divided by the median of :math:`\eta/\|w_i\|^2`, the
    quantity :func:`effective_lr_recorder` records.

    Args:
        model: the network.
        x: inputs of the batch.
        y: its targets.
        lr: the learning rate :math:`\eta`.

    Returns:
        ``(relative_step, kept)``: one value per Linear layer, and one per scale-invariant weight,
        both in forward order.
    """
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    invariant = [w for _, w in invariant_weights(model)]
    if not linears or not invariant:
        raise ValueError("the model needs Linear layers and at least one scale-invariant weight")
    with preserved(model, train=True):
        dev = device_of(model)
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
    grads = dict(zip(map(id, linears), torch.autograd.grad(loss, linears)))
    relative = torch.stack([lr * grads[id(w)].norm() / w.detach().norm() for w in linears])
    kept = []
    for w in invariant:
        w0 = w.detach()
        after = effective_lr(lr, w0 - lr * grads[id(w)]).median()
        kept.append(after / effective_lr(lr, w0).median())
    return relative.detach(), torch.stack(kept).detach()


@dataclass(frozen=True)
class Choice:
    """Per seed, the setting and checkpoint :func:`select_by_validation` chose, and what they give.

    Args:
        test: test accuracy at the chosen checkpoint, one per seed.
        validation: validation accuracy there, one per seed.
        value: the chosen setting (e.g. learning rate), one per seed.
        step: the chosen step, one per seed.
    """

    test: Spread
    validation: Spread
    value: Spread
    step: Spread


def select_by_validation(sweep: Sweep, key: str = "val_accuracy", values: Sequence[float] | None = None) -> Choice:
    """Per seed, the setting and recorded step with the highest validation accuracy, and its test accuracy.

    The validation accuracy is what a recorder stored under ``key`` at every recorded step of the
    sweep (e.g. ``bnlib.lab.training.test_metrics(x_val, y_val, prefix="val_")``); the test
    accuracy is the sweep's own. Ties go to the smaller setting and the earlier step.

    Args:
        sweep: a :class:`bnlib.lab.sweeps.Sweep` whose runs recorded ``key``.
        key: the name of the validation accuracy in the runs' histories.
        values: the settings to choose among (None: all of the sweep's).
    """
    chosen = range(len(sweep.values)) if values is None else [sweep.index(v) for v in values]
    cols = list(chosen)
    val = np.array([[sweep.histories[s][v][key] for v in cols] for s in range(len(sweep.seeds))], dtype=float)
    if val.shape[-1] != len(sweep.steps):
        raise ValueError(f"{key!r} must be recorded at every recorded step of the sweep")
    test = sweep.accuracy[:, cols]
    flat = np.nan_to_num(val, nan=-np.inf).reshape(len(sweep.seeds), -1).argmax(axis=1)
    v_idx, r_idx = np.unravel_index(flat, val.shape[1:])
    rows = np.arange(len(sweep.seeds))
    return Choice(
        test=Spread.of(test[rows, v_idx, r_idx], sweep.seeds),
        validation=Spread.of(val[rows, v_idx, r_idx], sweep.seeds),
        value=Spread.of(sweep.values[np.asarray(cols)[v_idx]], sweep.seeds),
        step=Spread.of(np.asarray(sweep.steps)[r_idx], sweep.seeds),
    )


def test_at_validation_best(x_val: Tensor, y_val: Tensor, x_test: Tensor, y_test: Tensor) -> Recorder:
    """A recorder of validation accuracy and loss at every call, and of test accuracy and loss
    only where :func:`select_by_validation` can choose the step.

    Validation metrics are recorded as ``val_accuracy`` and ``val_loss``; test metrics as
    ``accuracy`` and ``loss``, but only when the validation accuracy exceeds every earlier one of
    the run (NaN otherwise). The first highest validation accuracy of a run is such a step, so the
    test accuracy that :func:`select_by_validation` reads is the one recording it at every step
    gives, with fewer test evaluations. Pass it to :func:`bnlib.lab.sweeps.lr_sweep` with
    ``record_test=False``; a run is told from the previous one by its model (or by step 0).

    Args:
        x_val: validation inputs.
        y_val: their class indices.
        x_test: test inputs.
        y_test: their class indices.
    """
    on_val, on_test = test_metrics(x_val, y_val, prefix="val_"), test_metrics(x_test, y_test)
    run: dict[str, object] = {"model": None, "best": -np.inf}

    def recorder(state: TrainState) -> dict[str, float]:
        if state.model is not run["model"] or state.step == 0:
            run.update(model=state.model, best=-np.inf)
        values = dict(on_val(state))
        if values["val_accuracy"] > run["best"]:
            run["best"] = values["val_accuracy"]
            values.update(on_test(state))
        else:
            values.update(accuracy=np.nan, loss=np.nan)
        return values

    return recorder


def _records(sweep: Sweep, key: str) -> np.ndarray:
    """``key`` of every run at every recorded step, shape (seeds, values, records)."""
    out = np.array([[h[key] for h in row] for row in sweep.histories], dtype=float)
    if out.shape != sweep.accuracy.shape:
        raise ValueError(f"{key!r} must be recorded at every recorded step of the sweep")
    return out


def steps_to(sweep: Sweep, target: float, key: str = "val_accuracy") -> np.ndarray:
    """First recorded step at which ``key`` reaches ``target``, shape (seeds, values); NaN if never.

    :meth:`bnlib.lab.sweeps.Sweep.steps_to` does this on the test accuracy; here it is the
    validation accuracy (or any quantity recorded under ``key`` at every recorded step).

    Args:
        sweep: a sweep whose runs recorded ``key``.
        target: the value to reach.
        key: the name of the recorded quantity.
    """
    reached = _records(sweep, key) >= target
    first = np.asarray(sweep.steps, dtype=float)[np.argmax(reached, axis=-1)]
    first[~reached.any(axis=-1)] = np.nan
    return first


def trains(sweep: Sweep, threshold: float = 0.5, key: str = "val_accuracy") -> np.ndarray:
    """Whether each run *trains*: a finite final training loss and ``key`` >= ``threshold`` at some
    recorded step, shape (seeds, values).

    Args:
        sweep: a sweep whose runs recorded ``key``.
        threshold: the validation accuracy a run must reach.
        key: the name of the recorded validation accuracy.
    """
    finite = np.isfinite(sweep.train_loss[..., -1])
    return finite & (_records(sweep, key).max(axis=-1) >= threshold)


def largest_trained(sweep: Sweep, threshold: float = 0.5, key: str = "val_accuracy") -> np.ndarray:
    """Per seed, the largest swept value whose run :func:`trains` (NaN if none), shape (seeds,).

    Args:
        sweep: a sweep whose runs recorded ``key``.
        threshold: as in :func:`trains`.
        key: as in :func:`trains`.
    """
    ok = trains(sweep, threshold, key)
    return np.array([sweep.values[row].max() if row.any() else np.nan for row in ok])


def with_dropout(net: nn.Sequential, p: float) -> nn.Sequential:
    """The same layers (shared, not copied) with ``nn.Dropout(p)`` after every ReLU, sigmoid and tanh.

    Args:
        net: a sequential network such as :func:`bnlib.lab.models.mlp`.
        p: the dropout probability, in [0, 1).
    """
    if not 0 <= p < 1:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    layers: list[nn.Module] = []
    for layer in net:
        layers.append(layer)
        if isinstance(layer, (nn.ReLU, nn.Sigmoid, nn.Tanh)):
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


def logit_metrics(x: Tensor, y: Tensor, prefix: str = "") -> Recorder:
    """A recorder of ``{prefix}accuracy``, ``{prefix}loss`` (cross-entropy) and ``{prefix}logit_rms`` on ``(x, y)``.

    One forward pass in eval mode, without gradients; ``logit_rms`` is the root mean square of all
    logits, the size the softmax turns into confidence.

    Args:
        x: inputs.
        y: their class indices.
        prefix: put before the three names.
    """

    def record(state: TrainState) -> dict[str, float]:
        model = state.model
        with preserved(model, train=False), torch.no_grad():
            dev = device_of(model)
            logits, target = model(x.to(dev)), y.to(dev)
        return {
            f"{prefix}accuracy": float((logits.argmax(dim=1) == target).float().mean()),
            f"{prefix}loss": float(F.cross_entropy(logits, target)),
            f"{prefix}logit_rms": float(logits.pow(2).mean().sqrt()),
        }

    return record


def overfit_run(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    steps: int,
    seed: int,
    lr: float = 0.1,
    batch_size: int = 64,
    record_every: int = 100,
) -> History:
    """Train ``net`` on a small set for many epochs and record test accuracy, loss and logit size.

    Plain SGD (:func:`bnlib.lab.training.train`); every ``record_every`` steps :func:`logit_metrics`
    on the test set (``accuracy``, ``loss``, ``logit_rms``), and at the last step also accuracy and
    loss on the training set (``train_accuracy``, ``train_loss``). Global random draws (dropout
    masks) come from ``seed``; the caller's global random state is restored afterwards.

    Args:
        net: the network, already initialized.
        x: training inputs.
        y: their class indices.
        x_test: test inputs.
        y_test: their class indices.
        steps: parameter updates.
        seed: seed of the mini-batch order and of the dropout masks.
        lr: learning rate.
        batch_size: examples per update.
        record_every: steps between two test records.
    """
    on_train = test_metrics(x, y, prefix="train_")

    def final_train(state: TrainState) -> dict[str, float] | None:
        return on_train(state) if state.step == steps else None

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return train(
            net, x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            record_at=every(record_every, steps), recorders=[logit_metrics(x_test, y_test), final_train],
        )  # fmt: skip


def batch_statistics_noise(
    z: Tensor, sizes: Sequence[int], draws: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    r"""How far the batch mean and variance of each unit move between random batches drawn from ``z``.

    For each batch size B, ``draws`` batches are drawn from the rows of ``z`` (without replacement
    within a batch); per unit, the standard deviation over the draws of the batch mean is divided by
    the unit's standard deviation over all of ``z``, and that of the (biased) batch variance by the
    unit's variance over ``z``; the median over units is reported. For independent examples the
    first is close to :math:`1/\sqrt{B}`.

    Args:
        z: a layer's inputs, (examples, units), e.g. from :func:`bnlib.lab.measure.layer_inputs`.
        sizes: the batch sizes (each at least 2 and at most the number of examples).
        draws: batches per size (at least 2).
        generator: the source of the random batches.

    Returns:
        ``(mean_noise, var_noise)``, two arrays with one value per batch size.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be (examples, units), got shape {tuple(z.shape)}")
    if draws < 2 or any(not 2 <= b <= len(z) for b in sizes):
        raise ValueError(f"need draws >= 2 and batch sizes in 2..{len(z)}, got {draws} and {list(sizes)}")
    z = z.detach().double().cpu()
    z = z[:, z.std(dim=0) > 0]  # a constant unit has no noise to measure
    std, var = z.std(dim=0, unbiased=False), z.var(dim=0, unbiased=False)
    mean_noise, var_noise = [], []
    for b in sizes:
        idx = torch.stack([torch.randperm(len(z), generator=generator)[:b] for _ in range(draws)])
        batches = z[idx]  # (draws, b, units)
        mean_noise.append(float((batches.mean(dim=1).std(dim=0) / std).median()))
        var_noise.append(float((batches.var(dim=1, unbiased=False).std(dim=0) / var).median()))
    return np.array(mean_noise), np.array(var_noise)


def finite_population_factor(population: int, batch_size: int) -> float:
    r"""The factor :math:`\sqrt{(N - B)/(N - 1)}` by which sampling without replacement shrinks
    the standard deviation of a batch mean below :math:`\sigma/\sqrt{B}`.

    Args:
        population: N, the number of examples the batches are drawn from.
        batch_size: B, examples per batch (1 to N).
    """
    if not 1 <= batch_size <= population:
        raise ValueError(f"need 1 <= batch_size <= population, got {batch_size} and {population}")
    return float(np.sqrt((population - batch_size) / max(population - 1, 1)))
