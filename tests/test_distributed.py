"""bnlib.norm.sync and bnlib.lab.launch: a real 2-process gloo job (a few seconds), and the single-process fallback."""

import pytest
import torch

import bnlib
import bnlib.lab.models
from bnlib import norm
from bnlib.lab.experiments import data_parallel as D
from bnlib.lab.launch import launch, run_several
from bnlib.norm.sync import SyncBatchNorm

torch.set_num_threads(1)


def _data(n=96, features=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) * 2 + 1
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def test_sync_bn_equals_bn_on_the_concatenated_batch():
    results = launch(D.exactness_check, 2, (4, 3, 0))
    for r in results:
        for key in ("output", "input_grad", "param_grad", "running_stats"):
            assert r[key] < 1e-5, (key, r[key])
        assert r["local_bn_output"] > 0.1  # per-process statistics are not the global ones


@pytest.mark.parametrize("sync", [True, False])
def test_data_parallel_training_equals_one_process(sync):
    """Synced BN trains exactly like BN on the global batch; per-process BN like ghost batches of that size."""
    x, y = _data()
    sizes, per_process, steps = (20, 16, 16, 4), 4, 20
    f64 = torch.float64  # float32 rounding grows quickly in small-batch training; float64 keeps the comparison tight
    runs = launch(D.train_data_parallel, 2, (x, y, sync, sizes, per_process, steps, 0.05, 3, f64))
    layer = bnlib.BatchNorm1d if sync else norm.factory("ghost", ghost_size=per_process)
    ref = D.train_one_process(x, y, layer, sizes, 2 * per_process, steps, 0.05, 3, f64)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close((runs[0]["losses"] + runs[1]["losses"]) / 2, ref["losses"], **tight)
    for name, value in ref["state"].items():
        if "running" in name or "num_batches" in name:
            continue
        for run in runs:  # the parameters are the same in both processes
            torch.testing.assert_close(run["state"][name], value, **tight)
    if sync:  # synchronized running statistics are those of the global batch
        torch.testing.assert_close(
            runs[0]["state"]["1.running_var"], ref["state"]["1.running_var"], rtol=1e-3, atol=1e-4
        )
    else:
        assert not torch.allclose(runs[0]["state"]["1.running_mean"], runs[1]["state"]["1.running_mean"])


def test_launch_reports_a_failing_worker():
    with pytest.raises(RuntimeError, match="failed"):
        launch(D.exactness_check, 2, (4, "not a number"), timeout_s=30)


def test_convert_sync_batchnorm_keeps_the_dtype_of_a_float64_model():
    net64 = SyncBatchNorm.convert_sync_batchnorm(bnlib.lab.models.mlp([5, 6, 3], norm=bnlib.BatchNorm1d).double())
    assert net64[1].weight.dtype == net64[1].running_var.dtype == torch.float64


def _double_backward(rank: int, world_size: int) -> str:
    layer = SyncBatchNorm(3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    try:
        g.pow(2).sum().backward()
    except RuntimeError as error:
        return str(error)
    return "ran"


def test_double_backward_through_synchronized_statistics_is_refused():
    """Its backward uses saved statistics that carry no graph: a second derivative would be wrong, so it raises."""
    messages = launch(_double_backward, 2)
    assert all("once_differentiable" in m or "twice" in m for m in messages), messages


def test_run_several_gives_what_separate_launches_give():
    calls = [(D.exactness_check, (4, 3, 0)), (D.exactness_check, (2, 5, 1))]
    together = launch(run_several, 2, (calls,))
    assert len(together) == 2 and all(len(results) == 2 for results in together)
    assert [r[0] for r in together] == launch(D.exactness_check, 2, (4, 3, 0))
    assert [r[1] for r in together] == launch(D.exactness_check, 2, (2, 5, 1))
