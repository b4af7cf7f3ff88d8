"""bnlib's modules as drop-ins for torch.nn's: one table of (bnlib class, torch class, input shape),
run through the behaviours a torch.nn user relies on without reading the docs."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import bnlib

torch.set_num_threads(1)

# (bnlib class, torch class, input shape); SyncBatchNorm falls back to plain BN in one process.
TABLE = [
    (bnlib.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (bnlib.BatchNorm1d, nn.BatchNorm1d, (8, 4, 3)),
    (bnlib.BatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 3)),
    (bnlib.BatchNorm3d, nn.BatchNorm3d, (2, 4, 2, 3, 3)),
]
IDS = [f"{ours.__name__}-{len(shape)}d" for ours, _, shape in TABLE]


def _pair(ours_cls, theirs_cls, **kwargs):
    torch.manual_seed(0)
    return ours_cls(4, **kwargs), theirs_cls(4, **kwargs)


def _train(modules, shape, steps=3):
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape, generator=g) * (step + 2) + step
        for m in modules:
            m.train()
            m(x)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", TABLE, ids=IDS)
def test_flag_turned_off_after_training_eval_uses_running_stats_and_leaves_them_alone(ours_cls, theirs_cls, shape):
    ours, theirs = _pair(ours_cls, theirs_cls)
    _train([ours, theirs], shape)
    before = ours.running_mean.clone(), ours.running_var.clone()
    for m in (ours, theirs):
        m.track_running_stats = False
        m.eval()
    x = torch.randn(shape) * 3 + 1
    _close(ours(x), theirs(x))
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    # in training mode the flag stops the updates; the batch's statistics are used
    for m in (ours, theirs):
        m.train()
    _close(ours(x), theirs(x))
    assert torch.equal(ours.running_mean, before[0]) and int(ours.num_batches_tracked) == 3
    _close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", TABLE, ids=IDS)
def test_without_running_buffers_eval_uses_batch_statistics(ours_cls, theirs_cls, shape):
    ours, theirs = _pair(ours_cls, theirs_cls, track_running_stats=False)
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()
    x = torch.randn(shape) * 2 - 1
    for m in (ours, theirs):
        m.eval()
    _close(ours(x), theirs(x))


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", TABLE, ids=IDS)
def test_bias_free_layers_match_and_swap_state_dicts(ours_cls, theirs_cls, shape):
    ours, theirs = _pair(ours_cls, theirs_cls, bias=False)
    assert ours.bias is None and sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    _train([ours, theirs], shape)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", TABLE, ids=IDS)
def test_legacy_state_dict_without_num_batches_tracked_loads(ours_cls, theirs_cls, shape):
    source = theirs_cls(4)
    _train([source], shape)
    legacy = OrderedDict((k, v) for k, v in source.state_dict().items() if k != "num_batches_tracked")
    legacy._metadata = OrderedDict({"": {"version": 1}})  # saved before torch added the counter
    ours, theirs = ours_cls(4), theirs_cls(4)
    ours.num_batches_tracked.fill_(7)
    for m in (ours, theirs):
        m.load_state_dict(legacy)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0
    _close(ours.running_var, source.running_var)
    # a current (version 2) state_dict without the counter is incomplete, in both
    current = OrderedDict(legacy)
    current._metadata = OrderedDict({"": {"version": 2}})
    for m in (ours_cls(4), theirs_cls(4)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(current)


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", TABLE, ids=IDS)
@pytest.mark.parametrize("num_features", [-1, 2.0, "4"])
def test_bad_num_features_is_refused_by_both(ours_cls, theirs_cls, shape, num_features):
    with pytest.raises((TypeError, RuntimeError)):
        theirs_cls(num_features)
    with pytest.raises(ValueError, match="num_features"):
        ours_cls(num_features)


def test_sync_batchnorm_is_top_level_and_takes_bias():
    ours, theirs = bnlib.SyncBatchNorm(4, bias=False), nn.SyncBatchNorm(4, bias=False)
    assert repr(ours) == repr(theirs) and sorted(ours.state_dict()) == sorted(theirs.state_dict())


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, bnlib.BatchNorm1d])
@pytest.mark.parametrize("bias", [True, False])
def test_convert_sync_batchnorm_keeps_the_parameters_an_optimizer_holds(norm, bias):
    model = nn.Sequential(nn.Linear(3, 4), norm(4, bias=bias), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _train([model[1]], (8, 4))
    stats = model[1].running_mean
    model = bnlib.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], bnlib.SyncBatchNorm) and model[1].running_mean is stats
    assert (model[1].bias is None) == (not bias)
    before = model[1].weight.detach().clone()
    model.train()
    optimizer.zero_grad()
    model(torch.randn(8, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before), "the optimizer built before conversion trains the converted layer"
