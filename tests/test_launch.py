"""bnlib.lab.launch: results of any size come back, failures and time-outs are reported."""

import pytest
import torch

from bnlib.lab.launch import launch


def _large_result(rank: int, world_size: int, n: int) -> torch.Tensor:
    return torch.full((n,), float(rank))  # far larger than a pipe's buffer


def _sleep(rank: int, world_size: int) -> None:
    import time

    time.sleep(30)


def test_large_results_come_back_in_rank_order():
    results = launch(_large_result, 2, (1_000_000,), timeout_s=60)
    assert [float(r[0]) for r in results] == [0.0, 1.0]
    assert all(r.numel() == 1_000_000 for r in results)


def test_a_process_past_its_time_is_stopped():
    with pytest.raises(RuntimeError, match="no result within"):
        launch(_sleep, 2, timeout_s=3)


def test_processes_are_spawned_once_cuda_is_in_use(monkeypatch):
    """A child forked after CUDA work fails at its first backward pass: spawn then."""
    from bnlib.lab import launch as launch_module

    monkeypatch.setattr(launch_module.sys, "platform", "linux")
    monkeypatch.setattr(launch_module.torch.cuda, "is_initialized", lambda: False)
    assert launch_module.default_start_method() == "fork"
    monkeypatch.setattr(launch_module.torch.cuda, "is_initialized", lambda: True)
    assert launch_module.default_start_method() == "spawn"
    monkeypatch.setattr(launch_module.sys, "platform", "darwin")
    monkeypatch.setattr(launch_module.torch.cuda, "is_initialized", lambda: False)
    assert launch_module.default_start_method() == "spawn"
