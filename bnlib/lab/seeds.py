"""Experiments over several seeds: one runner, and the spread the chapters report and test by.

A claim that rests on training is a claim about batch normalization, not about one trajectory, so
every such claim is run on several seeds. :func:`over_seeds` runs an experiment once per seed and
keeps the per-seed results; :class:`Spread` summarizes one quantity over those seeds (mean, range,
every value). The range is also the tolerance the notebook tests compare the quantity by: another
CPU changes a run only in the last bits of its arithmetic, which perturbs a trajectory no more than
a new seed (new initialization *and* new mini-batches) does.

>>> runs = over_seeds(lambda seed: {"acc": 0.9 + 0.01 * seed}, [0, 1, 2])
>>> s = runs.spread("acc")
>>> round(s.mean, 3), round(s.range, 3), len(s)
(0.91, 0.02, 3)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from bnlib.lab.scale import full_scale

__all__ = [
    "QUICK_SEEDS",
    "FULL_SEEDS",
    "FIRST_SEED_VARIABLE",
    "SeedRuns",
    "Spread",
    "default_seeds",
    "first_seed",
    "over_seeds",
    "seeds_used",
]

T = TypeVar("T")

#: seeds per training claim at the quick (default) scale
QUICK_SEEDS = 3
#: seeds per training claim at the full scale (``BNBOOK_SCALE=full``)
FULL_SEEDS = 5
#: the environment variable that moves the seeds (``BNBOOK_FIRST_SEED=3`` runs seeds 3, 4 and 5)
FIRST_SEED_VARIABLE = "BNBOOK_FIRST_SEED"

_runs_in_this_process: list[tuple[int, ...]] = []  # the seeds of every over_seeds call, for the status page


def seeds_used() -> dict:
    """What :func:`over_seeds` ran in this process: how many experiments, on which seeds, the fewest in one.

    The book's execution script asks a chapter's kernel for this after a run and shows it on the
    status page.
    """
    seeds = sorted({seed for run in _runs_in_this_process for seed in run})
    fewest = min((len(run) for run in _runs_in_this_process), default=0)
    return {"experiments": len(_runs_in_this_process), "seeds": seeds, "fewest_seeds": fewest}


def first_seed() -> int:
    """The first of the consecutive seeds: 0, or the value of ``BNBOOK_FIRST_SEED``.

    Running a chapter with ``BNBOOK_FIRST_SEED=3`` repeats every experiment on other seeds
    (3, 4, 5), which checks that its claims are about batch normalization and not about seeds 0-2.
    """
    text = os.environ.get(FIRST_SEED_VARIABLE, "0").strip() or "0"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{FIRST_SEED_VARIABLE} must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{FIRST_SEED_VARIABLE} must be a non-negative integer, got {value}")
    return value


def default_seeds(quick: int = QUICK_SEEDS, full: int = FULL_SEEDS) -> list[int]:
    """Consecutive seeds from :func:`first_seed` (0 unless ``BNBOOK_FIRST_SEED`` is set): ``quick``
    of them by default, ``full`` when ``BNBOOK_SCALE=full``.

    Args:
        quick: how many seeds at the quick scale (at least 1).
        full: how many at the full scale (at least ``quick``).
    """
    if quick < 1 or full < quick:
        raise ValueError(f"need 1 <= quick <= full, got quick={quick}, full={full}")
    start = first_seed()
    return list(range(start, start + (full if full_scale() else quick)))


@dataclass(frozen=True)
class Spread:
    """One quantity measured on several seeds: its values, mean and range (max - min).

    ``format(spread, ".3f")`` gives ``"0.912 (0.905-0.918)"``, the mean with the range; with one
    seed it gives the value alone.

    Args:
        values: the quantity on each seed (at least one).
        seeds: the seed of each value, in the same order.
    """

    values: tuple[float, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.values) == 0:
            raise ValueError("a spread needs at least one value")
        if len(self.values) != len(self.seeds):
            raise ValueError(f"{len(self.values)} values for {len(self.seeds)} seeds")

    @classmethod
    def of(cls, values: Sequence[float], seeds: Sequence[int] | None = None) -> Spread:
        """A spread from per-seed values (seeds 0, 1, ... unless given).

        Args:
            values: one number per seed.
            seeds: the seeds, in the order of ``values`` (default: 0, 1, ...).
        """
        vals = tuple(float(v) for v in values)
        return cls(vals, tuple(int(s) for s in (range(len(vals)) if seeds is None else seeds)))

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)

    @property
    def mean(self) -> float:
        """The mean over the seeds."""
        return float(np.mean(self.values))

    @property
    def geometric_mean(self) -> float:
        """The geometric mean over the seeds, the mean for ratios (2 and 1/2 average to 1).

        Raises:
            ValueError: if a value is not positive.
        """
        if min(self.values) <= 0:
            raise ValueError(f"a geometric mean needs positive values, got {self.values}")
        return float(np.exp(np.mean(np.log(self.values))))

    @property
    def min(self) -> float:
        """The smallest value."""
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        """The largest value."""
        return float(np.max(self.values))

    @property
    def range(self) -> float:
        """The seed-to-seed spread, ``max - min`` over the seeds."""
        return self.max - self.min

    def map(self, fn: Callable[[float], float]) -> Spread:
        """The same seeds, each value transformed by ``fn``.

        Args:
            fn: maps one value to its new value.
        """
        return Spread(tuple(float(fn(v)) for v in self.values), self.seeds)

    def count(self, predicate: Callable[[float], bool]) -> int:
        """On how many seeds ``predicate(value)`` holds.

        Args:
            predicate: a test of one value.
        """
        return sum(bool(predicate(v)) for v in self.values)

    def __format__(self, spec: str) -> str:
        if len(self.values) == 1:
            return format(self.values[0], spec)
        if any(math.isnan(v) for v in self.values):
            return "nan"
        return f"{format(self.mean, spec)} ({format(self.min, spec)}-{format(self.max, spec)})"

    def __str__(self) -> str:
        return format(self, ".3g")


@dataclass(frozen=True)
class SeedRuns(Generic[T]):
    """What :func:`over_seeds` returns: the seeds and the result of the experiment for each.

    Args:
        seeds: the seeds, in the order they ran.
        results: the experiment's result on each seed, in the same order.
    """

    seeds: tuple[int, ...]
    results: tuple[T, ...]

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[tuple[int, T]]:
        return iter(zip(self.seeds, self.results))

    def __getitem__(self, seed: int) -> T:
        """The result of one seed (by seed, not by position); KeyError for a seed that was not run."""
        try:
            return self.results[self.seeds.index(seed)]
        except ValueError:
            raise KeyError(f"seed {seed} was not run (seeds: {list(self.seeds)})") from None

    def spread(self, quantity: str | Callable[[T], Any]) -> Spread:
        """One scalar per seed, by key (``result[key]``) or by function (``quantity(result)``).

        Args:
            quantity: a key of each result, or a function of one result; either gives a scalar.
        """
        get = quantity if callable(quantity) else (lambda result: result[quantity])
        values = []
        for seed, result in self:
            value = get(result)
            if np.ndim(value) != 0:
                raise ValueError(f"seed {seed}: the quantity must be a scalar, got shape {np.shape(value)}")
            values.append(float(value))
        return Spread(tuple(values), self.seeds)

    def stack(self, quantity: str | Callable[[T], Any]) -> np.ndarray:
        """Per-seed arrays (e.g. a curve over steps) stacked along a new first axis.

        Args:
            quantity: a key of each result, or a function of one result; either gives an array of
                the same shape on every seed.
        """
        get = quantity if callable(quantity) else (lambda result: result[quantity])
        return np.stack([np.asarray(get(result)) for _, result in self])


def over_seeds(experiment: Callable[[int], T], seeds: Sequence[int] | None = None) -> SeedRuns[T]:
    """Run ``experiment(seed)`` once per seed (by default :func:`default_seeds`) and keep every result.

    The experiment must derive all of its randomness (initialization, mini-batch order, noise)
    from the seed it is given, so that seeds are independent repetitions of the same experiment.

    Args:
        experiment: the experiment, called with one seed; it returns anything.
        seeds: the seeds to run, distinct (None: :func:`default_seeds`).

    Returns:
        A :class:`SeedRuns` of the seeds and their results.
    """
    seeds = default_seeds() if seeds is None else [int(s) for s in seeds]
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    runs = SeedRuns(tuple(seeds), tuple(experiment(seed) for seed in seeds))
    _runs_in_this_process.append(runs.seeds)
    return runs
