"""A seeded training loop that records what a chapter plots.

:func:`train` is the lab's one training loop: mini-batch training (any ``nn.Module``, any optimizer,
any device) for a fixed number of steps on seeded mini-batches, or on index batches the caller
gives; the chapters' recipes (:mod:`bnlib.lab.experiments`) are thin callers of it. At the steps
listed in ``record_at`` it calls *recorders*: functions that receive a :class:`TrainState` and
return a mapping of named values (floats, tensors, arrays), which are collected in a :class:`History`.
Recorders measure what a chapter needs, for example ``test_metrics`` (accuracy and loss on
held-out data) or anything built from :mod:`bnlib.lab.measure`.

Step convention: "step s" means *after s parameter updates*; step 0 is the initial model. At a
record step the state also carries the mini-batch the model is about to train on next, so that a
recorder can probe gradients at exactly the point where training stands.

Example::

    net = bnlib.lab.models.mlp([784, 100, 10], "sigmoid", init_std=0.1, generator=g)
    hist = train(net, d.x_train, d.y_train, steps=1000, batch_size=60, lr=0.1,
                 record_at=every(100, 1000), recorders=[test_metrics(d.x_test, d.y_test)])
    hist["accuracy"]     # one value per recorded step, as a NumPy array
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab.data import index_batches
from bnlib.lab.measure import LossFn, device_of, evaluate

__all__ = ["TrainState", "History", "Recorder", "train", "every", "log_steps", "test_metrics"]

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


@dataclass
class TrainState:
    """What a recorder or callback sees.

    Args:
        step: parameter updates done so far.
        model: the model (in training mode; a recorder that switches modes must switch back).
        optimizer: the optimizer.
        x: the inputs of a mini-batch: at a record step, the one the model trains on next; in a
            per-step callback, the one of the update just made.
        y: the targets of that mini-batch.
        loss: training loss of the last update (None at step 0).
    """

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    loss: float | None


#: the type of a recorder, called with the :class:`TrainState` at a record step; it returns ``{name: value}`` or None
Recorder = Callable[[TrainState], "Mapping[str, Any] | None"]


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return value


@dataclass
class History:
    """Recorded values of one run.

    ``history[name]`` stacks a record into an array whose first axis runs over ``steps``;
    ``name in history`` says whether anything was recorded under ``name``.

    Args:
        steps: the recorded steps, in order.
        records: by name, one entry per recorded step at which the name was recorded (tensors are
            moved to the CPU as NumPy arrays).
        train_loss: the training loss of every update: ``train_loss[s - 1]`` is the loss of update s.
    """

    steps: list[int] = field(default_factory=list)
    records: dict[str, list[Any]] = field(default_factory=dict)
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, step: int, values: Mapping[str, Any]) -> None:
        """Record ``values`` at ``step`` (a new step is appended to :attr:`steps`).

        Args:
            step: the step the values belong to (the last recorded one, or a new one).
            values: ``{name: value}``; tensors are stored as NumPy arrays.
        """
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
        for name, value in values.items():
            self.records.setdefault(name, []).append(_to_numpy(value))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.records:
            raise KeyError(f"nothing recorded under {name!r}; recorded: {sorted(self.records)}")
        return np.stack([np.asarray(v) for v in self.records[name]])

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def at(self, name: str, step: int) -> Any:
        """The value of ``name`` recorded at ``step``.

        Args:
            name: a recorded name.
            step: a recorded step.
        """
        if step not in self.steps:
            raise KeyError(f"step {step} was not recorded; recorded steps: {self.steps}")
        return self.records[name][self.steps.index(step)]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    batches: Iterable[Tensor] | None = None,
    lr: float = 0.1,
    optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    before_step: Callable[[nn.Module], Any] | None = None,
    record_at: Sequence[int] = (),
    recorders: Sequence[Recorder] = (),
    callbacks: Sequence[Callable[[TrainState], None]] = (),
    seed: int = 0,
    device: torch.device | str | None = None,
) -> History:
    """Train ``model`` on ``(x, y)`` with mini-batch updates and record along the way: the lab's one training loop.

    By default ``steps`` mini-batches of ``batch_size`` are drawn epoch by epoch without replacement
    (:func:`bnlib.lab.data.index_batches`), the order fixed by ``seed``; or the caller gives the index
    ``batches`` to train on, one update each. The model's initialization is the caller's (seed it there).

    Args:
        model: any module mapping a batch of ``x`` to what ``loss_fn`` takes.
        x, y: training inputs and targets (moved to ``device``).
        steps: number of parameter updates (with ``batches``: their number, the default).
        batch_size: examples per update (not with ``batches``).
        batches: index batches into ``x`` and ``y``, in training order (e.g. from
            :func:`bnlib.lab.data.index_batches`); replaces the seeded sampler. At a record step after
            the last update, the state carries the last of them.
        lr: learning rate of the default optimizer, plain SGD.
        optimizer: an optimizer already built on ``model``'s parameters, or a factory called with
            ``model.parameters()`` (e.g. ``lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)``).
        scheduler: factory called with the optimizer (e.g. a ``torch.optim.lr_scheduler``); stepped
            after every update.
        loss_fn: ``loss_fn(model(x_b), y_b)`` gives the scalar loss.
        before_step: called with the model between the backward pass and the optimizer step (e.g. to
            clip or to all-reduce the gradients).
        record_at: steps (0..steps) at which the recorders run.
        recorders: functions ``state -> {name: value}``; their values go into the history.
        callbacks: functions ``state -> None`` called after every update.
        seed: seed of the mini-batch order (not used with ``batches``).
        device: where to train (default: the device of the model's first parameter).

    Returns:
        A :class:`History` with the recorded values and the per-update training loss.
    """
    device = device_of(model) if device is None else device
    model.to(device)
    x, y = x.to(device), y.to(device)
    if batches is None:
        if steps is None or batch_size is None:
            raise ValueError("give steps and batch_size, or the batches to train on")
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        order = index_batches(len(x), batch_size, torch.Generator().manual_seed(seed), device=device)  # no end
    else:
        if batch_size is not None:
            raise ValueError("give batch_size or batches, not both")
        given = list(batches)
        if not given:
            raise ValueError("batches is empty")
        if steps is not None and steps != len(given):
            raise ValueError(f"steps ({steps}) must be the number of batches ({len(given)})")
        steps, order = len(given), iter(given)
    record = sorted(set(int(s) for s in record_at))
    if record and (record[0] < 0 or record[-1] > steps):
        raise ValueError(f"record_at must lie in 0..{steps}, got {record[0]}..{record[-1]}")
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    sched = scheduler(optimizer) if scheduler is not None else None

    history = History()
    losses: list[Tensor] = []
    to_record = set(record)
    model.train()
    last_loss: float | None = None
    idx = None
    for step in range(steps + 1):
        if step == steps and step not in to_record:
            break
        idx = next(order, idx).to(device)  # the given batches end: a final record sees the last one
        xb, yb = x[idx], y[idx]
        if step in to_record:
            state = TrainState(step, model, optimizer, xb, yb, last_loss)
            history.add(step, {})
            for recorder in recorders:
                values = recorder(state)
                if values:
                    history.add(step, values)
            model.train()
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if before_step is not None:
            before_step(model)
        optimizer.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
        if callbacks or (step + 1) in to_record:
            last_loss = float(losses[-1])
        for callback in callbacks:
            callback(TrainState(step + 1, model, optimizer, xb, yb, last_loss))
    if losses:
        history.train_loss = torch.stack(losses).cpu().numpy()
    return history


def every(interval: int, steps: int, start: int = 0) -> list[int]:
    """Record steps ``start, start + interval, ...`` up to and including ``steps``.

    Args:
        interval: steps between two records (positive).
        steps: the last step, always included.
        start: the first step.
    """
    if interval < 1:
        raise ValueError(f"interval must be positive, got {interval}")
    out = list(range(start, steps + 1, interval))
    if out[-1] != steps:
        out.append(steps)
    return out


def log_steps(steps: int, count: int = 30) -> list[int]:
    """About ``count`` record steps spaced evenly on a log scale from 0 to ``steps`` (0 included).

    Args:
        steps: the last step (at least 1).
        count: the number of steps wanted (at least 2; rounding to whole steps can merge a few).
    """
    if steps < 1 or count < 2:
        raise ValueError(f"need steps >= 1 and count >= 2, got steps={steps}, count={count}")
    grid = np.unique(np.round(np.geomspace(1, steps, count - 1)).astype(int))
    return [0, *grid.tolist()]


def test_metrics(x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy, prefix: str = "") -> Recorder:
    """A recorder of ``{prefix}accuracy`` and ``{prefix}loss`` on ``(x, y)`` (eval mode, no gradients).

    Args:
        x: held-out inputs.
        y: their class indices.
        loss_fn: the loss to report.
        prefix: put before both names (e.g. ``"train_"``).
    """

    def recorder(state: TrainState) -> dict[str, float]:
        loss, acc = evaluate(state.model, x, y, loss_fn)
        return {f"{prefix}accuracy": acc, f"{prefix}loss": loss}

    return recorder


test_metrics.__test__ = False  # not a pytest test despite the name
