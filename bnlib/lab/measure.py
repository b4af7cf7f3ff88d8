"""Measurements on a network: accuracy, layer inputs, their percentiles, saturation, gradient norms.

Every function leaves the model as it found it: training/eval mode, parameters, buffers (BN's
running statistics) and ``.grad`` fields are unchanged, so measurements can be taken in the
middle of training (see :mod:`bnlib.lab.training`). Everything is vectorized over units and examples.

The lab's one way to keep a model's state is here too: :func:`snapshot` copies it,
:func:`restore` puts it back and :func:`preserved` does both around a block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "device_of",
    "snapshot",
    "restore",
    "preserved",
    "evaluate",
    "layer_inputs",
    "percentiles",
    "sigmoid_saturation",
    "dead_and_linear",
    "grad_norms",
    "flat_grad",
    "batch_companion_outputs",
]

#: a loss function, ``loss_fn(outputs, targets)`` -> a scalar tensor (e.g. ``F.cross_entropy``)
LossFn = Callable[[Tensor, Tensor], Tensor]


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters).

    Args:
        model: the model.
    """
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def snapshot(model: nn.Module, parameters: bool = True) -> dict[str, Tensor]:
    """Detached copies of ``model``'s state by name: every buffer and, unless told not to, every parameter.

    The lab's one way to keep a model's state: :func:`restore` puts it back, :func:`preserved`
    does both around a block.

    Args:
        model: the model.
        parameters: include the parameters (False: buffers only, e.g. BN's running statistics and
            step counters).
    """
    named = [*(model.named_parameters() if parameters else ()), *model.named_buffers()]
    return {name: t.detach().clone() for name, t in named}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Copy a :func:`snapshot` back into ``model``'s parameters and buffers, in place.

    Args:
        model: the model the snapshot was taken of.
        saved: the snapshot (a subset of the names is fine).
    """
    current = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in saved.items():
        current[name].copy_(value)


@contextlib.contextmanager
def preserved(model: nn.Module, train: bool | None = None) -> Iterator[nn.Module]:
    """Run a block with ``model`` in train (True) or eval (False) mode, then restore mode and buffers.

    Buffers (e.g. running means) are restored too, so a training-mode forward pass inside the
    block does not move BN's running statistics.

    Args:
        model: the model.
        train: the mode inside the block (None: leave it).
    """
    was_training = model.training
    saved = snapshot(model, parameters=False)
    if train is not None:
        model.train(train)
    try:
        yield model
    finally:
        restore(model, saved)
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy) -> tuple[float, float]:
    """Mean loss and accuracy (fraction of argmax predictions equal to ``y``) in eval mode.

    Args:
        model: a classifier returning logits (N, classes); its mode and buffers are left as they were.
        x: inputs (moved to the model's device).
        y: class indices.
        loss_fn: ``loss_fn(logits, y)`` gives the mean loss.

    Returns:
        ``(loss, accuracy)`` as floats.
    """
    with preserved(model, train=False):
        dev = device_of(model)
        logits = model(x.to(dev))
        y = y.to(dev)
        loss = loss_fn(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
    return float(loss), float(acc)


def layer_inputs(
    model: nn.Module,
    x: Tensor,
    kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Sigmoid,
    train: bool = False,
) -> list[Tensor]:
    """The inputs that every submodule of type ``kind`` receives when ``model`` runs on ``x``.

    For ``kind=nn.Sigmoid`` in a Linear -> BN -> sigmoid network these are the sigmoid inputs
    (pre-activations) of each hidden layer, in forward order, each (N, units). Runs in eval mode by
    default (``train=True``: batch statistics, with running statistics left untouched).

    Args:
        model: the network.
        x: the inputs it runs on (one batch).
        kind: the module type (or types) whose inputs are captured.
        train: run in training mode (batch statistics) rather than eval mode.

    Returns:
        One detached tensor per ``kind`` module, in forward order.
    """
    targets = [m for m in model.modules() if isinstance(m, kind)]
    if not targets:
        raise ValueError(f"the model has no submodule of type {kind}")
    captured: dict[int, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, i=i: captured.__setitem__(i, inp[0].detach()))
        for i, m in enumerate(targets)
    ]
    try:
        with torch.no_grad(), preserved(model, train=train):
            model(x.to(device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    return [captured[i] for i in range(len(targets))]


def percentiles(z: Tensor, q: Sequence[float] = (15, 50, 85)) -> Tensor:
    """Per-unit percentiles over the examples: ``z`` is (N, units), the result (len(q), units).

    Percentiles are in 0..100 and interpolate linearly (``torch.quantile``), as in Ioffe &
    Szegedy's Fig. 1(b, c), which follows the {15, 50, 85}th percentiles of one sigmoid's input.

    Args:
        z: values (examples, units).
        q: the percentiles, each in 0..100.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be (examples, units), got shape {tuple(z.shape)}")
    if any(not 0 <= p <= 100 for p in q):
        raise ValueError(f"percentiles must lie in 0..100, got {list(q)}")
    qs = torch.tensor([p / 100 for p in q], dtype=z.dtype, device=z.device)
    return torch.quantile(z, qs, dim=0)


def sigmoid_saturation(z: Tensor, margin: float = 0.05, dim: int | None = None) -> Tensor:
    """Fraction of sigmoid inputs ``z`` whose output lies within ``margin`` of 0 or 1.

    ``sigma(z) < margin`` or ``sigma(z) > 1 - margin`` exactly when ``|z| > log((1 - margin) / margin)``
    (2.94 for 0.05); there the local gradient ``sigma'(z) = sigma(z) (1 - sigma(z))`` is below
    ``margin (1 - margin)``.

    Args:
        z: sigmoid inputs, e.g. from :func:`layer_inputs`.
        margin: distance from 0 and 1 that counts as saturated, in (0, 0.5).
        dim: ``None`` averages over everything; ``dim=0`` gives one fraction per unit.
    """
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5), got {margin}")
    threshold = math.log((1 - margin) / margin)
    sat = (z.abs() > threshold).float()
    return sat.mean() if dim is None else sat.mean(dim=dim)


def dead_and_linear(
    model: nn.Module,
    x: Tensor,
    kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.ReLU,
    train: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per ``kind`` layer (ReLU by default): the fraction of its units that are dead and that are linear on ``x``.

    A unit is *dead* on ``x`` when its input is <= 0 for every example (a ReLU then outputs 0 and
    passes back a gradient of exactly 0), and *linear* when its input is > 0 for every example
    (the ReLU passes everything through unchanged). Inputs are taken as :func:`layer_inputs` takes
    them, with batch statistics by default (``train=True``: ``x`` is normalized as one batch, the
    running statistics are left untouched); an input of more than two dimensions is flattened per
    example, so that every position counts as a unit.

    Args:
        model: the network.
        x: the inputs (one batch).
        kind: the activation type (or types) whose inputs are examined.
        train: take the inputs with batch statistics (True) or in eval mode.

    Returns:
        ``(dead, linear)``, two 1-D tensors with one fraction per layer, in forward order.
    """
    zs = [z.reshape(len(z), -1) for z in layer_inputs(model, x, kind=kind, train=train)]
    positive = [(z > 0).sum(dim=0) for z in zs]  # per unit: on how many examples the input is positive
    dead = torch.stack([(p == 0).float().mean() for p in positive])
    linear = torch.stack([(p == len(z)).float().mean() for p, z in zip(positive, zs)])
    return dead, linear


def _gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, params: list[Tensor]) -> tuple[Tensor, ...]:
    with preserved(model, train=True):
        dev = device_of(model)
        loss = loss_fn(model(x.to(dev)), y.to(dev))
        return torch.autograd.grad(loss, params, allow_unused=True)


def grad_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    kind: type[nn.Module] | tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> Tensor:
    """Euclidean norm of the loss gradient w.r.t. the weight of every ``kind`` layer, in forward order.

    Computed on the batch ``(x, y)`` in training mode (batch statistics, as during training), with
    ``torch.autograd.grad``: ``.grad`` fields and running statistics stay untouched.

    Args:
        model: the network.
        x: inputs of the batch.
        y: its targets.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar loss.
        kind: the layer type (or types) whose ``weight`` gradients are measured.

    Returns:
        A 1-D tensor, one norm per layer.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, kind)]
    if not weights:
        raise ValueError(f"the model has no submodule of type {kind}")
    grads = _gradients(model, x, y, loss_fn, weights)
    return torch.stack(
        [g.norm() if g is not None else torch.zeros((), device=w.device) for g, w in zip(grads, weights)]
    )


def flat_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """The gradient of the loss on ``(x, y)`` w.r.t. all trainable parameters, as one flat vector.

    Computed in training mode, as :func:`grad_norms`; a parameter the loss does not reach
    contributes zeros.

    Args:
        model: the network.
        x: inputs of the batch.
        y: its targets.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = _gradients(model, x, y, loss_fn, params)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


@torch.no_grad()
def batch_companion_outputs(
    model: nn.Module, x: Tensor, companions: Tensor, *, draws: int, batch_size: int, generator: torch.Generator
) -> Tensor:
    """Training-mode outputs for the examples ``x`` when they share each batch with random companions.

    In each of ``draws`` rounds, ``x`` is cut in a random order into groups of ``batch_size // 2``
    examples, and each group is completed to ``batch_size`` with examples drawn at random from
    ``companions``. The model runs in training mode, so a batch-normalized network normalizes with
    the statistics of that batch and the output for one example depends on its companions (running
    statistics are restored afterwards). Dropout, if any, draws new masks.

    Args:
        model: the network.
        x: the examples whose outputs are taken.
        companions: the examples that fill up each batch.
        draws: the number of rounds.
        batch_size: examples per batch (at least 2), half of them from ``x``.
        generator: the source of the random orders and companions.

    Returns:
        A tensor (draws, len(x), outputs) in the order of ``x``. Its spread over the first axis is
        the noise that training-mode computation adds to each example's output.
    """
    if draws < 1 or batch_size < 2:
        raise ValueError(f"need draws >= 1 and batch_size >= 2, got draws={draws}, batch_size={batch_size}")
    own = batch_size // 2
    dev = device_of(model)
    x, companions = x.to(dev), companions.to(dev)
    rounds = []
    with preserved(model, train=True):
        for _ in range(draws):
            order = torch.randperm(len(x), generator=generator).to(dev)
            out = None
            for start in range(0, len(x), own):
                idx = order[start : start + own]
                pick = torch.randperm(len(companions), generator=generator)[: batch_size - len(idx)].to(dev)
                y = model(torch.cat([x[idx], companions[pick]]))[: len(idx)]
                if out is None:
                    out = y.new_empty((len(x), *y.shape[1:]))
                out[idx] = y
            rounds.append(out)
    return torch.stack(rounds)
