"""bnlib's layers against their torch.nn counterparts, from one table.

Each row of :data:`TABLE` pairs a bnlib layer with the torch.nn layer it stands for (built with the
same arguments), an input shape, and flags naming the behaviours the row has; each test runs over
the rows that have what it checks. This is the one table of module parity: tests/test_robustness.py
takes its rows for the alternative norms from here.

Deliberate differences (bnlib raises where torch does not) are listed in
tests/test_robustness.py::DIFFERENCES_FROM_TORCH.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import bnlib
from bnlib import norm

torch.set_num_threads(1)

# The behaviours a row has (its flags).
RUNNING = "running"  # running_mean, running_var and num_batches_tracked buffers (track_running_stats=True)
BATCH = "batch"  # batch norm: eps checked in training, track_running_stats switchable, convertible to SyncBatchNorm
CHECKED = "checked"  # num_features, momentum and eps validated at construction (bnlib.norm.modules.NormBase)
STAND_IN = "stand-in"  # another bnlib layer that equals torch's under these arguments (so its repr differs)
BN = frozenset({RUNNING, BATCH, CHECKED})


@dataclass(frozen=True)
class Row:
    """A bnlib layer and its torch.nn counterpart, built with ``args`` and ``kwargs``, on ``shape``."""

    name: str
    ours: Callable[..., nn.Module]
    theirs: Callable[..., nn.Module]
    args: tuple
    shape: tuple[int, ...]
    flags: frozenset[str]
    kwargs: dict = field(default_factory=dict)
    ours_only: dict = field(default_factory=dict)  # arguments only bnlib's layer takes (stand-ins)
    scale: float = 1.0  # of the inputs in the training steps (small where eps must show)

    def make(self, **overrides) -> tuple[nn.Module, nn.Module]:
        """A fresh (bnlib, torch) pair; ``overrides`` go to both."""
        kwargs = {**self.kwargs, **overrides}
        return self.ours(*self.args, **{**self.ours_only, **kwargs}), self.theirs(*self.args, **kwargs)


UNIT_RENORM = {"momentum": 0.1, "rmax": 1.0, "dmax": 0.0}  # r = 1, d = 0: batch renormalization is batch norm
TRACKED = {"affine": True, "track_running_stats": True}
PER_SAMPLE = frozenset()
INSTANCE, INSTANCE_TRACKED = frozenset({CHECKED}), frozenset({RUNNING, CHECKED})
STAND_INS = frozenset({RUNNING, CHECKED, STAND_IN})

# one row a line where it fits
# fmt: off
TABLE = [
    # batch norm; SyncBatchNorm is plain batch norm in one process (torch's too, on the CPU)
    Row("BatchNorm1d (N, C)", bnlib.BatchNorm1d, nn.BatchNorm1d, (4,), (8, 4), BN),
    Row("BatchNorm1d (N, C, L)", bnlib.BatchNorm1d, nn.BatchNorm1d, (4,), (8, 4, 3), BN),
    Row("BatchNorm2d", bnlib.BatchNorm2d, nn.BatchNorm2d, (4,), (4, 4, 3, 3), BN),
    Row("BatchNorm3d", bnlib.BatchNorm3d, nn.BatchNorm3d, (4,), (2, 4, 2, 3, 3), BN),
    Row("BatchNorm1d momentum=None", bnlib.BatchNorm1d, nn.BatchNorm1d, (4,), (8, 4), BN, {"momentum": None}),
    Row("BatchNorm2d bias=False", bnlib.BatchNorm2d, nn.BatchNorm2d, (4,), (4, 4, 3, 3), BN, {"bias": False}),
    Row("BatchNorm1d affine=False", bnlib.BatchNorm1d, nn.BatchNorm1d, (4,), (8, 4, 3), BN, {"affine": False}),
    Row("BatchNorm2d track_running_stats=False", bnlib.BatchNorm2d, nn.BatchNorm2d, (4,), (4, 4, 3, 3), BN - {RUNNING},
        {"track_running_stats": False}),
    Row("SyncBatchNorm (N, C)", bnlib.SyncBatchNorm, nn.SyncBatchNorm, (4,), (8, 4), BN),
    Row("SyncBatchNorm bias=False", bnlib.SyncBatchNorm, nn.SyncBatchNorm, (4,), (4, 4, 3, 3), BN, {"bias": False}),
    # per-sample statistics (the rows named by the class alone are those tests/test_robustness.py uses)
    Row("LayerNorm", norm.LayerNorm, nn.LayerNorm, ([4, 5],), (6, 3, 4, 5), PER_SAMPLE),
    Row("LayerNorm last dimension", norm.LayerNorm, nn.LayerNorm, (10,), (6, 10), PER_SAMPLE, {"eps": 1e-4}),
    Row("LayerNorm bias=False", norm.LayerNorm, nn.LayerNorm, ((4, 5, 5),), (3, 4, 5, 5), PER_SAMPLE, {"bias": False}),
    Row("LayerNorm elementwise_affine=False", norm.LayerNorm, nn.LayerNorm, ((10,),), (4, 7, 10), PER_SAMPLE,
        {"elementwise_affine": False}),
    Row("GroupNorm", norm.GroupNorm, nn.GroupNorm, (2, 4), (6, 4, 3, 3), PER_SAMPLE),
    Row("GroupNorm one group (N, C)", norm.GroupNorm, nn.GroupNorm, (1, 8), (5, 8), PER_SAMPLE),
    Row("GroupNorm a group per channel", norm.GroupNorm, nn.GroupNorm, (8, 8), (5, 8, 7), PER_SAMPLE),
    Row("GroupNorm bias=False", norm.GroupNorm, nn.GroupNorm, (2, 8), (3, 8, 4, 4), PER_SAMPLE, {"bias": False}),
    Row("GroupNorm affine=False", norm.GroupNorm, nn.GroupNorm, (2, 8), (5, 8, 7), PER_SAMPLE, {"affine": False}),
    Row("InstanceNorm1d", norm.InstanceNorm1d, nn.InstanceNorm1d, (4,), (6, 4, 5), INSTANCE),
    Row("InstanceNorm1d unbatched momentum=None", norm.InstanceNorm1d, nn.InstanceNorm1d, (3,), (3, 9),
        INSTANCE_TRACKED, {**TRACKED, "momentum": None}),
    Row("InstanceNorm2d", norm.InstanceNorm2d, nn.InstanceNorm2d, (4,), (6, 4, 3, 3), INSTANCE_TRACKED, TRACKED),
    Row("InstanceNorm2d bias=False momentum=0.5", norm.InstanceNorm2d, nn.InstanceNorm2d, (3,), (4, 3, 5, 5),
        INSTANCE_TRACKED, {**TRACKED, "bias": False, "momentum": 0.5}),
    Row("InstanceNorm2d unbatched", norm.InstanceNorm2d, nn.InstanceNorm2d, (3,), (3, 5, 5), INSTANCE),
    Row("RMSNorm", norm.RMSNorm, nn.RMSNorm, (5,), (6, 3, 5), PER_SAMPLE, {"eps": 1e-6}),
    Row("RMSNorm eps=None", norm.RMSNorm, nn.RMSNorm, (10,), (6, 10), PER_SAMPLE, {"eps": None}, scale=1e-3),
    Row("RMSNorm elementwise_affine=False", norm.RMSNorm, nn.RMSNorm, ((7, 10),), (4, 7, 10), PER_SAMPLE,
        {"eps": 1e-3, "elementwise_affine": False}),
    # stand-ins: ghost batch norm without ghosts, batch renorm with r = 1 and d = 0
    Row("GhostBatchNorm", norm.GhostBatchNorm, nn.BatchNorm2d, (4,), (6, 4, 3, 3), STAND_INS),
    Row("GhostBatchNorm (N, C)", norm.GhostBatchNorm, nn.BatchNorm1d, (5,), (8, 5), STAND_INS),
    Row("BatchRenorm (r=1, d=0)", norm.BatchRenorm, nn.BatchNorm2d, (4,), (6, 4, 3, 3), STAND_INS, {}, UNIT_RENORM),
    Row("BatchRenorm (r=1, d=0) (N, C)", norm.BatchRenorm, nn.BatchNorm1d, (5,), (16, 5), STAND_INS, {}, UNIT_RENORM),
]
# fmt: on
BY_NAME = {row.name: row for row in TABLE}
assert len(BY_NAME) == len(TABLE), "row names must be unique"


def rows(*need: str, without: tuple[str, ...] = ()):
    """pytest parameters: the rows that have every flag in ``need`` and none in ``without``."""
    return [pytest.param(row, id=row.name) for row in TABLE if set(need) <= row.flags and not set(without) & row.flags]


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _randomize(*modules: nn.Module, seed: int = 1) -> None:
    """The same random parameters in each module (they start at ones and zeros)."""
    for m in modules:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _batches(shape, count: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (step + 2) + step for step in range(count)]


def _train(modules, shape, steps: int = 3, seed: int = 2) -> None:
    """Training-mode forward passes on the same batches (they move the running statistics)."""
    for x in _batches(shape, steps, seed):
        for m in modules:
            m.train()
            m(x)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sb.items():
        assert torch.equal(sa[key], value), key


# -- every row ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", rows())
def test_same_parameters_buffers_and_repr(row):
    ours, theirs = row.make()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(ours, name, None) is None) == (getattr(theirs, name, None) is None), name
    if STAND_IN not in row.flags:
        assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("row", rows())
def test_training_steps_then_eval_match(row):
    """Outputs, input and parameter gradients, and buffers over three SGD steps, then in eval mode."""
    ours, theirs = row.make()
    _randomize(ours, theirs)
    g = torch.Generator().manual_seed(3)
    for mode in ("train", "train", "train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        x = ((torch.randn(row.shape, generator=g) * 3 + 1) * row.scale).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y1, y2 = ours(x), theirs(x2)
        _close(y1, y2)
        dy = torch.randn(row.shape, generator=g)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        _close(x.grad * row.scale, x2.grad * row.scale, 1e-4)
        with torch.no_grad():  # one SGD step, so that later steps see changed parameters
            for p, q in zip(ours.parameters(), theirs.parameters()):
                _close(p.grad, q.grad, 1e-4)
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
        for (n1, b1), (n2, b2) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            assert n1 == n2
            _close(b1.double(), b2.double())


@pytest.mark.parametrize("row", rows())
def test_state_dict_round_trip_both_ways(row):
    """bnlib -> torch and torch -> bnlib: every entry arrives as it was, and the eval outputs agree."""
    ours, theirs = row.make()
    _randomize(ours, theirs, seed=4)
    _train([ours], row.shape, seed=5)
    fresh_theirs = row.make()[1]
    fresh_theirs.load_state_dict(ours.state_dict())
    _same_state(fresh_theirs, ours)
    x = torch.randn(row.shape) * 2 + 1
    _close(ours.eval()(x), fresh_theirs.eval()(x))

    _train([fresh_theirs], row.shape, seed=6)  # torch's values now differ from what bnlib saved
    fresh_ours = row.make()[0]
    fresh_ours.load_state_dict(fresh_theirs.state_dict())
    _same_state(fresh_ours, fresh_theirs)
    _close(fresh_ours.eval()(x), fresh_theirs.eval()(x))


# -- rows with running statistics ------------------------------------------------------------------------


def _legacy(state: dict) -> OrderedDict:
    """``state`` as saved before torch added num_batches_tracked: no counter, version 1 metadata."""
    legacy = OrderedDict((k, v) for k, v in state.items() if k != "num_batches_tracked")
    legacy._metadata = OrderedDict({"": {"version": 1}})
    return legacy


@pytest.mark.parametrize("row", rows(RUNNING))
def test_legacy_state_dict_without_num_batches_tracked_loads(row):
    source = row.make()[1]
    _randomize(source)
    _train([source], row.shape)
    legacy = _legacy(source.state_dict())
    ours, theirs = row.make()
    for m in (ours, theirs):
        m.load_state_dict(legacy)
    for key, value in legacy.items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    # a current (version 2) state_dict without the counter is incomplete, in both
    current = OrderedDict(legacy)
    current._metadata = OrderedDict({"": {"version": 2}})
    for m in row.make():
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(current)


@pytest.mark.parametrize("row", rows(RUNNING))
def test_legacy_state_dict_keeps_the_modules_own_counter(row):
    legacy = _legacy(row.make()[1].state_dict())
    ours, theirs = row.make()
    for m in (ours, theirs):
        m.num_batches_tracked.fill_(7)
        m.load_state_dict(legacy)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 7


# -- batch norm --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", rows(BATCH, RUNNING))
def test_flag_turned_off_after_training_eval_uses_running_stats_and_leaves_them_alone(row):
    ours, theirs = row.make()
    _randomize(ours, theirs)
    _train([ours, theirs], row.shape)
    before = [[b.clone() for b in m.buffers()] for m in (ours, theirs)]
    for m in (ours, theirs):
        m.track_running_stats = False
        m.eval()
    x = torch.randn(row.shape) * 3 + 1
    _close(ours(x), theirs(x))
    # in training mode the flag stops the updates; the batch's statistics are used
    for m in (ours, theirs):
        m.train()
    _close(ours(x), theirs(x))
    for m, kept in zip((ours, theirs), before):
        assert all(torch.equal(b, b0) for b, b0 in zip(m.buffers(), kept, strict=True)), type(m).__module__
    _close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("row", rows(BATCH))
def test_eps_is_refused_at_construction_and_in_training(row):
    """torch accepts eps <= 0 at construction and refuses it at the first training forward; bnlib refuses it at
    construction, and at a training forward when set later. eps = 0 is legal in eval mode in both."""
    x = torch.randn(row.shape)
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match="eps must be positive"):
            row.make(eps=eps)[0]
    theirs = row.theirs(*row.args, **{**row.kwargs, "eps": 0.0})
    with pytest.raises(ValueError, match="eps must be positive"):
        theirs.train()(x)
    ours = row.make()[0]
    ours.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive"):
        ours.train()(x)
    if RUNNING in row.flags:  # (without running statistics eval normalizes with the batch's: refused by torch)
        _close(ours.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize("row", [p for p in rows(BATCH) if p.values[0].ours is not bnlib.SyncBatchNorm])
@pytest.mark.parametrize("source", ["bnlib", "torch"])
def test_convert_sync_batchnorm_keeps_what_an_optimizer_holds(row, source):
    """The converted layer takes over the Parameter and buffer objects, so an optimizer built before the
    conversion (its momentum buffers included) keeps training it: as torch's own conversion does."""
    layer = row.ours if source == "bnlib" else row.theirs

    def model():
        torch.manual_seed(0)
        return nn.Sequential(layer(*row.args, **row.kwargs), nn.Flatten(), nn.Linear(math.prod(row.shape[1:]), 2))

    def step(model, optimizer, x):
        model.train()
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    # reference: torch's conversion (which passes bnlib's layers through: in one process that is the same layer)
    ours, reference = model(), model()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, reference)]
    batches = _batches(row.shape, 5)
    for x in batches[:2]:
        for m, opt in zip((ours, reference), optimizers):
            step(m, opt, x)
    held = {**dict(ours[0].named_parameters()), **dict(ours[0].named_buffers())}
    ours = bnlib.SyncBatchNorm.convert_sync_batchnorm(ours)
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(reference)
    converted = ours[0]
    assert type(converted) is bnlib.SyncBatchNorm and converted.training
    now = {**dict(converted.named_parameters()), **dict(converted.named_buffers())}
    assert now.keys() == held.keys() and all(now[k] is held[k] for k in held)
    assert repr(converted).split("(", 1)[1] == repr(reference[0]).split("(", 1)[1]
    for x in batches[2:]:
        for m, opt in zip((ours, reference), optimizers):
            step(m, opt, x)
    for key, value in reference.state_dict().items():
        _close(ours.state_dict()[key].double(), value.double())
    x = batches[0]
    _close(ours.eval()(x), reference.eval()(x))
    # a model converted in eval mode stays in eval mode, as torch's conversion keeps it
    assert not bnlib.SyncBatchNorm.convert_sync_batchnorm(model().eval())[0].training


# -- constructor arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("row", rows(CHECKED))
@pytest.mark.parametrize("num_features", [-1, 2.0, "4"])
def test_bad_num_features_is_refused(row, num_features):
    """bnlib raises ValueError; torch raises where it allocates a parameter or buffer (TypeError, RuntimeError)."""
    args = (num_features,) + row.args[1:]
    with pytest.raises(ValueError, match="num_features"):
        row.ours(*args, **{**row.ours_only, **row.kwargs})
    if list(row.make()[1].state_dict()):
        with pytest.raises((TypeError, RuntimeError)):
            row.theirs(*args, **row.kwargs)


@pytest.mark.parametrize("row", rows(CHECKED))
@pytest.mark.parametrize("momentum", [1.5, -0.1])
def test_momentum_outside_zero_one_is_refused(row, momentum):
    """torch accepts any momentum; bnlib refuses one outside [0, 1] (a listed difference)."""
    with pytest.raises(ValueError, match="momentum"):
        row.make(momentum=momentum)


@pytest.mark.parametrize("row", rows(CHECKED, without=(BATCH,)))
def test_eps_is_refused_at_construction_by_the_other_checked_layers(row):
    """torch's instance norm accepts eps <= 0 everywhere (a listed difference); bnlib refuses it."""
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps must be positive"):
            row.make(eps=eps)


def test_rows_cover_every_bnlib_layer_with_a_torch_counterpart():
    """A layer added to bnlib with a torch.nn counterpart needs a row here."""
    covered = {row.ours for row in TABLE}
    expected = {bnlib.BatchNorm1d, bnlib.BatchNorm2d, bnlib.BatchNorm3d, bnlib.SyncBatchNorm}
    expected |= {getattr(norm, name) for name in norm.__all__ if isinstance(getattr(nn, name, None), type)}
    assert expected <= covered, expected - covered
