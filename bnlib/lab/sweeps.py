"""Learning-rate and initialization sweeps: train one network per setting and seed, return arrays.

:func:`lr_sweep` trains ``build(seed)`` once per learning rate and seed; :func:`init_sweep` trains
``build(std, seed)`` once per initialization scale and seed at a fixed learning rate. Both use
:func:`bnlib.lab.training.train` (plain SGD unless an optimizer factory is given), run the seeds through
:func:`bnlib.lab.seeds.over_seeds` (by default :func:`bnlib.lab.seeds.default_seeds`) and record test
accuracy and loss every ``record_every`` steps. The :class:`Sweep` they return holds the results as
arrays indexed ``[seed, setting, record]`` for plotting, with the summaries the chapters report:
the first step at which a target accuracy is reached, and whether a run trained at all; and
:meth:`Sweep.spread` turns any per-run summary at one setting into a :class:`bnlib.lab.seeds.Spread`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlib.lab.data import Split
from bnlib.lab.seeds import Spread, over_seeds
from bnlib.lab.training import History, Recorder, every, test_metrics, train

__all__ = ["Sweep", "lr_sweep", "init_sweep"]


@dataclass
class Sweep:
    """Results of a sweep: what :func:`lr_sweep` and :func:`init_sweep` return.

    Args:
        values: the swept settings (learning rates or initialization scales), shape (V,).
        seeds: the seeds, length S.
        steps: the recorded steps, length R (0 and the last step included).
        accuracy: test accuracy, shape (S, V, R).
        loss: test loss (NaN where the run diverged), shape (S, V, R).
        train_loss: training loss of every update, shape (S, V, steps).
        histories: the full :class:`bnlib.lab.training.History` of each run, ``histories[s][v]``.
    """

    values: np.ndarray
    seeds: list[int]
    steps: list[int]
    accuracy: np.ndarray
    loss: np.ndarray
    train_loss: np.ndarray
    histories: list[list[History]]

    def steps_to(self, target: float) -> np.ndarray:
        """First recorded step with test accuracy >= ``target``, shape (S, V); NaN where never reached.

        Args:
            target: the test accuracy to reach.
        """
        reached = self.accuracy >= target
        first = np.argmax(reached, axis=-1)
        out = np.asarray(self.steps, dtype=float)[first]
        out[~reached.any(axis=-1)] = np.nan
        return out

    def best_accuracy(self) -> np.ndarray:
        """Highest recorded test accuracy of each run, shape (S, V)."""
        return self.accuracy.max(axis=-1)

    def trained(self, threshold: float = 0.5) -> np.ndarray:
        """Whether each run trained: finite final training loss and some test accuracy >= ``threshold``, (S, V).

        Args:
            threshold: the test accuracy a run must reach at some recorded step.
        """
        finite = (
            np.isfinite(self.train_loss[..., -1])
            if self.train_loss.shape[-1]
            else np.ones(self.accuracy.shape[:2], bool)
        )
        return finite & (self.best_accuracy() >= threshold)

    def largest_trained(self, threshold: float = 0.5) -> np.ndarray:
        """Per seed, the largest swept value whose run trained (NaN if none), shape (S,).

        Args:
            threshold: as in :meth:`trained`.
        """
        ok = self.trained(threshold)
        out = np.full(len(self.seeds), np.nan)
        for s in range(len(self.seeds)):
            if ok[s].any():
                out[s] = self.values[ok[s]].max()
        return out

    def index(self, value: float) -> int:
        """Position of a swept ``value`` in :attr:`values` (ValueError if it was not swept).

        Args:
            value: a swept setting (compared to a relative tolerance of 1e-12).
        """
        hits = np.flatnonzero(np.isclose(self.values, float(value), rtol=1e-12, atol=0.0))
        if len(hits) == 0:
            raise ValueError(f"{value} was not swept; swept values: {self.values.tolist()}")
        return int(hits[0])

    def spread(self, per_run: np.ndarray, value: float | None = None) -> Spread:
        """Per-seed values as a :class:`~bnlib.lab.seeds.Spread` over this sweep's seeds.

        Args:
            per_run: a per-run summary of shape (S, V), such as :meth:`best_accuracy` or
                :meth:`steps_to`; or a per-seed array of shape (S,), such as :meth:`largest_trained`.
            value: for an (S, V) summary, the swept setting to take; left out for an (S,) array.
        """
        per_run = np.asarray(per_run, dtype=float)
        if per_run.shape == (len(self.seeds), len(self.values)):
            if value is None:
                raise ValueError("a (seeds, values) array needs the swept value to take")
            return Spread.of(per_run[:, self.index(value)], self.seeds)
        if per_run.shape == (len(self.seeds),) and value is None:
            return Spread.of(per_run, self.seeds)
        raise ValueError(
            f"expected shape ({len(self.seeds)}, {len(self.values)}) with a value, or ({len(self.seeds)},) "
            f"without one; got {per_run.shape} and value={value}"
        )


def _run(
    builds: Callable[[float, int], nn.Module],
    lr_of: Callable[[float], float],
    values: Sequence[float],
    seeds: Sequence[int] | None,
    split: Split,
    steps: int,
    batch_size: int,
    record_every: int,
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None,
    recorders: Sequence[Recorder],
    record_at: Sequence[int],
    device: torch.device | str | None,
    record_test: bool = True,
) -> Sweep:
    if len(values) == 0 or (seeds is not None and len(seeds) == 0):
        raise ValueError("need at least one value and one seed")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    record = sorted(set(every(record_every, steps)) | {int(s) for s in record_at})
    x_test, y_test = split.x_test, split.y_test
    if device is not None:
        x_test, y_test = x_test.to(device), y_test.to(device)
    metrics = [test_metrics(x_test, y_test)] if record_test else []

    def one_seed(seed: int) -> list[History]:
        """Every setting trained from this seed's initialization and mini-batch order."""
        row = []
        for value in values:
            # global-RNG draws (dropout masks, a build without a generator) also come from the seed;
            # the caller's global RNG state is restored afterwards
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = builds(float(value), seed)
                if device is not None:
                    model = model.to(device)
                lr = lr_of(float(value))
                opt = optimizer(model, lr) if optimizer is not None else None
                row.append(train(
                    model, split.x_train, split.y_train, steps=steps, batch_size=batch_size, lr=lr,
                    optimizer=opt, record_at=record, recorders=[*metrics, *recorders], seed=seed, device=device,
                ))  # fmt: skip
        return row

    runs = over_seeds(one_seed, seeds)
    histories = list(runs.results)
    return Sweep(
        values=np.asarray(values, dtype=float),
        seeds=list(runs.seeds),
        steps=record,
        accuracy=np.array([[h["accuracy"] for h in row] for row in histories]),
        loss=np.array([[h["loss"] for h in row] for row in histories]),
        train_loss=np.array([[h.train_loss for h in row] for row in histories]),
        histories=histories,
    )


def lr_sweep(
    build: Callable[[int], nn.Module],
    lrs: Sequence[float],
    seeds: Sequence[int] | None,
    split: Split,
    *,
    steps: int,
    batch_size: int = 64,
    record_every: int = 25,
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None,
    recorders: Sequence[Recorder] = (),
    record_at: Sequence[int] = (),
    device: torch.device | str | None = None,
    record_test: bool = True,
) -> Sweep:
    """Train ``build(seed)`` with every learning rate in ``lrs`` and every seed (None: the default seeds).

    The seed fixes the initialization (through ``build``) and the mini-batch order, so runs with
    the same seed differ only in the learning rate. Any other randomness (dropout) must also come
    from the seed, inside ``build`` or the model.

    Args:
        build: returns a fresh network for a seed (its initialization drawn from that seed).
        lrs: the learning rates (positive).
        seeds: the seeds (None: :func:`bnlib.lab.seeds.default_seeds`).
        split: training and test data; test accuracy and loss are recorded on its test set.
        steps: parameter updates per run.
        batch_size: examples per update.
        record_every: steps between two records (the last step is always recorded).
        optimizer: ``optimizer(model, lr)`` builds the optimizer (None: plain SGD).
        recorders: extra recorders, run at the recorded steps.
        record_at: further steps to record at.
        device: where to train (None: where ``build`` puts the model).
        record_test: record test accuracy and loss at every recorded step (the default); False: a
            recorder among ``recorders`` records ``accuracy`` and ``loss`` itself (NaN where it skips
            a step), e.g. only at the steps a chapter can read them.

    Returns:
        A :class:`Sweep` over the learning rates.
    """
    if any(lr <= 0 for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {list(lrs)}")
    return _run(
        lambda _value, seed: build(seed), lambda lr: lr, lrs, seeds, split, steps, batch_size, record_every,
        optimizer, recorders, record_at, device, record_test,
    )  # fmt: skip


def init_sweep(
    build: Callable[[float, int], nn.Module],
    stds: Sequence[float],
    seeds: Sequence[int] | None,
    split: Split,
    *,
    lr: float,
    steps: int,
    batch_size: int = 64,
    record_every: int = 25,
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None,
    recorders: Sequence[Recorder] = (),
    record_at: Sequence[int] = (),
    device: torch.device | str | None = None,
) -> Sweep:
    """Train ``build(std, seed)`` (e.g. ``mlp(..., init_std=std)``) for every scale and seed at one ``lr``.

    Args:
        build: returns a fresh network for an initialization scale and a seed.
        stds: the initialization scales (positive).
        seeds: the seeds (None: :func:`bnlib.lab.seeds.default_seeds`).
        split: training and test data; test accuracy and loss are recorded on its test set.
        lr: the learning rate of every run.
        steps: parameter updates per run.
        batch_size: examples per update.
        record_every: steps between two records (the last step is always recorded).
        optimizer: ``optimizer(model, lr)`` builds the optimizer (None: plain SGD).
        recorders: extra recorders, run at the recorded steps.
        record_at: further steps to record at.
        device: where to train (None: where ``build`` puts the model).

    Returns:
        A :class:`Sweep` over the initialization scales.
    """
    if any(s <= 0 for s in stds):
        raise ValueError(f"initialization scales must be positive, got {list(stds)}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return _run(
        build, lambda _value: lr, stds, seeds, split, steps, batch_size, record_every, optimizer, recorders,
        record_at, device,
    )  # fmt: skip
