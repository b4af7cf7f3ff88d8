"""Data-parallel training with synchronized and per-process batch normalization: the experiments of
the limitations chapter, each run inside :func:`bnlib.lab.launch.launch` (gloo on the CPU).

:func:`exactness_check` compares synchronized BN with BN on the concatenated batch;
:func:`train_data_parallel` and :func:`train_one_process` train the same network with the same
global batches in several processes and in one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlib.lab.models import mlp
from bnlib.norm.modules import BatchNorm1d
from bnlib.norm.sync import SyncBatchNorm

__all__ = ["exactness_check", "train_data_parallel", "train_one_process", "try_torch_sync_batchnorm"]


def exactness_check(rank: int, world_size: int, per_process: int = 4, channels: int = 3, seed: int = 0) -> dict:
    """Synchronized BN in this process vs batch normalization of the concatenated global batch.

    Every process draws the same global batch (N = world_size * per_process), input shifted and
    scaled per channel, and a random upstream gradient; it keeps its own slice and compares its
    outputs, input gradient, summed weight/bias gradients and running statistics with
    ``torch.nn.BatchNorm1d`` on the whole batch. Also returns how far plain per-process BN is off.
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
    returns the error message it raises (None if it ran)."""
    layer = nn.SyncBatchNorm(3)
    try:
        layer(torch.randn(4, 3))
    except (ValueError, RuntimeError) as err:
        return str(err)
    return None


def _global_batches(n: int, global_batch: int, steps: int, seed: int) -> list[Tensor]:
    """Indices of ``steps`` global batches, epoch after epoch without replacement (the same in every process)."""
    if global_batch > n:
        raise ValueError(f"global batch {global_batch} is larger than the training set ({n})")
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += list(perm[: n - n % global_batch].split(global_batch))
    return out[:steps]


def _sgd_run(net: nn.Module, batches, lr: float, step_hook: Callable[[list[Tensor]], None] | None = None) -> Tensor:
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    net.train()
    for xb, yb in batches:
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        if step_hook is not None:
            step_hook(params)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _allreduce_mean(params: list[Tensor]) -> None:
    """Average the gradients over the processes with one all-reduce (what DistributedDataParallel does)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


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
    all-reduce per step. ``sync=True`` converts the BN layers to :class:`SyncBatchNorm`;
    otherwise each process normalizes with its own per_process examples.

    Returns ``{"state": the final state_dict, "losses": this process's training losses}``. Running
    statistics differ between processes with per-process BN (DistributedDataParallel would
    broadcast process 0's); the parameters are the same everywhere. ``dtype=torch.float64`` makes
    runs comparable over many steps: small-batch training amplifies float32 rounding quickly.
    """
    net = mlp(list(sizes), "relu", BatchNorm1d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x = x.to(dtype)
    if sync:
        net = SyncBatchNorm.convert_sync_batchnorm(net)
    mine = [
        idx[rank * per_process : (rank + 1) * per_process]
        for idx in _global_batches(len(x), world_size * per_process, steps, seed + 1)
    ]
    losses = _sgd_run(net, ((x[i], y[i]) for i in mine), lr, _allreduce_mean)
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}


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
    same global batches, same optimizer, with the normalization layer ``norm`` (e.g.
    ``bnlib.BatchNorm1d``, or ``bnlib.norm.factory("ghost", ghost_size=2)`` for per-process BN)."""
    net = mlp(list(sizes), "relu", norm, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x = x.to(dtype)
    batches = _global_batches(len(x), batch_size, steps, seed + 1)
    losses = _sgd_run(net, ((x[i], y[i]) for i in batches), lr)
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}
