"""Data-parallel training with synchronized and per-process batch normalization: the experiments of
the limitations chapter, each run inside :func:`bnlib.lab.launch.launch` (gloo on the CPU).

:func:`exactness_check` compares synchronized BN with BN on the concatenated batch;
:func:`train_data_parallel` and :func:`train_one_process` train the same network with the same
global batches in several processes and in one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlib.lab.data import index_batches
from bnlib.lab.measure import snapshot
from bnlib.lab.models import mlp
from bnlib.lab.training import train
from bnlib.norm.modules import BatchNorm1d
from bnlib.norm.sync import SyncBatchNorm

__all__ = ["exactness_check", "train_data_parallel", "train_one_process", "try_torch_sync_batchnorm"]


def exactness_check(rank: int, world_size: int, per_process: int = 4, channels: int = 3, seed: int = 0) -> dict:
    """Synchronized BN in this process vs batch normalization of the concatenated global batch.

    Every process draws the same global batch (N = world_size * per_process), input shifted and
    scaled per channel, and a random upstream gradient; it keeps its own slice and compares its
    outputs, input gradient, summed weight/bias gradients and running statistics with
    ``torch.nn.BatchNorm1d`` on the whole batch. Also returns how far plain per-process BN is off.

    Args:
        rank: this process (given by :func:`bnlib.lab.launch.launch`).
        world_size: the number of processes.
        per_process: examples per process.
        channels: features C of the (N, C) input.
        seed: seed of the global batch and upstream gradient (the same in every process).

    Returns:
        The largest absolute differences by name, ``"output"``, ``"input_grad"``,
        ``"param_grad"`` and ``"running_stats"`` (synchronized BN against the reference) and
        ``"local_bn_output"`` (per-process BN against it).
    """
    g = torch.Generator().manual_seed(seed)
    n = world_size * per_process
    x_all = torch.randn(n, channels, generator=g) * torch.linspace(0.5, 3.0, channels) + torch.arange(channels)
    dy_all = torch.randn(n, channels, generator=g)
    mine = slice(rank * per_process, (rank + 1) * per_process)

    ref = nn.BatchNorm1d(channels)
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * dy_all).sum().backward()

    sync = SyncBatchNorm(channels)
    x = x_all[mine].clone().requires_grad_()
    y = sync(x)
    (y * dy_all[mine]).sum().backward()
    grads = torch.cat([sync.weight.grad, sync.bias.grad])
    dist.all_reduce(grads)  # the global loss's gradient is the sum of the per-process ones

    local = nn.BatchNorm1d(channels)(x_all[mine])

    def diff(a: Tensor, b: Tensor) -> float:
        return float((a - b).detach().abs().max())

    return {
        "output": diff(y, y_ref[mine]),
        "input_grad": diff(x.grad, x_ref.grad[mine]),
        "param_grad": diff(grads, torch.cat([ref.weight.grad, ref.bias.grad])),
        "running_stats": max(diff(sync.running_mean, ref.running_mean), diff(sync.running_var, ref.running_var)),
        "local_bn_output": diff(local, y_ref[mine].detach()),
    }


def try_torch_sync_batchnorm(rank: int, world_size: int) -> str | None:
    """Run ``torch.nn.SyncBatchNorm`` in training mode on a CPU tensor inside the process group;
    returns the error message it raises (None if it ran).

    Args:
        rank: this process (given by :func:`bnlib.lab.launch.launch`; not used otherwise).
        world_size: the number of processes (likewise).
    """
    layer = nn.SyncBatchNorm(3)
    try:
        layer(torch.randn(4, 3))
    except (ValueError, RuntimeError) as err:
        return str(err)
    return None


def _global_batches(n: int, global_batch: int, steps: int, seed: int) -> list[Tensor]:
    """Indices of ``steps`` global batches, epoch after epoch without replacement (the same in every process)."""
    return list(itertools.islice(index_batches(n, global_batch, torch.Generator().manual_seed(seed)), steps))


def _all_reduce_mean(model: nn.Module) -> None:
    """Average the gradients over the processes with one all-reduce (what DistributedDataParallel does)."""
    params = list(model.parameters())
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _sgd_momentum(
    net: nn.Module, x: Tensor, y: Tensor, batches: list[Tensor], lr: float, before_step: Callable | None = None
) -> dict:
    """SGD with momentum 0.9 on :func:`bnlib.lab.training.train`; the final state and the losses."""
    history = train(
        net, x, y, batches=batches, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9), before_step=before_step
    )
    return {"state": snapshot(net), "losses": torch.from_numpy(history.train_loss)}


def train_data_parallel(
    rank: int,
    world_size: int,
    x: Tensor,
    y: Tensor,
    sync: bool,
    sizes: tuple[int, ...] = (784, 256, 256, 10),
    per_process: int = 2,
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Data-parallel SGD (momentum 0.9) of ``bnlib.lab.models.mlp(sizes, "relu", BatchNorm1d)``, by hand.

    Every process builds the same network (seeded), takes its slice of each global batch of
    world_size * per_process examples, and the parameter gradients are averaged with one
    all-reduce per step. ``sync=True`` converts the BN layers to :class:`~bnlib.norm.sync.SyncBatchNorm`;
    otherwise each process normalizes with its own per_process examples.

    Running statistics differ between processes with per-process BN (DistributedDataParallel would
    broadcast process 0's); the parameters are the same everywhere. ``dtype=torch.float64`` makes
    runs comparable over many steps: small-batch training amplifies float32 rounding quickly.

    Args:
        rank, world_size: this process and the number of processes (given by :func:`bnlib.lab.launch.launch`).
        x, y: the training set (the same in every process).
        sync: synchronized BN (True) or per-process BN.
        sizes: layer sizes of the MLP.
        per_process: examples per process and step.
        steps: SGD steps.
        lr: learning rate.
        seed: seed of the initialization (``seed``) and of the batch order (``seed + 1``).
        dtype: the dtype to train in.

    Returns:
        A dict with, under ``"state"``, the final parameters and buffers by name
        (:func:`bnlib.lab.measure.snapshot`), under ``"losses"`` this process's training losses (a
        1-D tensor, one per step).
    """
    net = mlp(list(sizes), "relu", BatchNorm1d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x = x.to(dtype)
    if sync:
        net = SyncBatchNorm.convert_sync_batchnorm(net)
    mine = [
        idx[rank * per_process : (rank + 1) * per_process]
        for idx in _global_batches(len(x), world_size * per_process, steps, seed + 1)
    ]
    return _sgd_momentum(net, x, y, mine, lr, _all_reduce_mean)


def train_one_process(
    x: Tensor,
    y: Tensor,
    norm: Callable[[int], nn.Module],
    sizes: tuple[int, ...] = (784, 256, 256, 10),
    batch_size: int = 4,
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The single-process counterpart of :func:`train_data_parallel`: same network initialization,
    same global batches, same optimizer, with the normalization layer ``norm``.

    Args:
        x, y: the training set.
        norm: normalization factory, e.g. ``bnlib.BatchNorm1d``, or ``bnlib.norm.factory("ghost",
            ghost_size=2)`` for what per-process BN computes.
        sizes: layer sizes of the MLP.
        batch_size: the global batch (world_size * per_process of the data-parallel run).
        steps, lr, seed, dtype: as in :func:`train_data_parallel`.

    Returns:
        A dict with ``"state"`` and ``"losses"``, as :func:`train_data_parallel`.
    """
    net = mlp(list(sizes), "relu", norm, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x = x.to(dtype)
    return _sgd_momentum(net, x, y, _global_batches(len(x), batch_size, steps, seed + 1), lr)
