r"""Synchronized batch normalization across processes, with torch.distributed (gloo on the CPU).

In data-parallel training every process (device) sees only its own slice of the batch. Plain batch
normalization then uses per-process statistics over b samples; synchronized batch normalization
uses the statistics of the whole global batch of M = (processes) x b samples:

.. math::
    \mu = \frac{1}{M}\sum x, \qquad \sigma^2 = \frac{1}{M}\sum x^2 - \mu^2,

found with one all-reduce of [sum x, sum x^2, count] per channel (sums in float64). Its backward is
batch normalization's compact formula with global sums, again one all-reduce:

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{M\sigma}\Big(M\,dy - \sum dy - \hat x \sum dy\,\hat x\Big).

The result equals batch normalization on the concatenated batch. torch.nn.SyncBatchNorm does the
same but only for GPU tensors (CPU input raises in training); :class:`SyncBatchNorm` here has its
constructor, parameters and buffers and falls back to plain batch normalization where torch's does
(evaluation, or no process group of more than one process).

:func:`launch` runs a function in several local processes joined by a gloo process group on
127.0.0.1; :func:`exactness_check` and :func:`train_data_parallel` are the book's demonstrations.
"""

from __future__ import annotations

import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from bnlib import functional as F
from bnlib.modules import _BatchNorm

__all__ = [
    "SyncBatchNorm",
    "sync_batch_norm",
    "launch",
    "free_port",
    "exactness_check",
    "train_data_parallel",
    "train_one_process",
    "try_torch_sync_batchnorm",
    "run_several",
]


def _dims_shape(x: Tensor) -> tuple[list[int], tuple[int, ...]]:
    return [0] + list(range(2, x.dim())), (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch statistics all-reduced over ``group``; backward all-reduces the two gradient sums."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        dims, shape = _dims_shape(x)
        c = x.shape[1]
        x64 = x.double()
        count = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0.0)
        inv_std = torch.rsqrt(var + eps).to(x.dtype)
        x_hat = (x - mean.to(x.dtype).view(shape)) * inv_std.view(shape)
        out = x_hat
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.group, ctx.total, ctx.has_bias = group, float(total), bias is not None
        ctx.mark_non_differentiable(mean, var, total)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out: Tensor, _m, _v, _t):
        x_hat, inv_std, weight = ctx.saved_tensors
        dims, shape = _dims_shape(x_hat)
        c = x_hat.shape[1]
        sum_dy = grad_out.sum(dims)
        sum_dy_xhat = (grad_out * x_hat).sum(dims)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)  # the gradient needs every process's outputs
            m = ctx.total
            g = inv_std if weight is None else inv_std * weight
            grad_x = (g.view(shape) / m) * (m * grad_out - sums[:c].view(shape) - x_hat * sums[c:].view(shape))
        # weight and bias gradients stay local: data-parallel training sums or averages them with the others
        return grad_x, grad_weight, grad_bias, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group=None,
) -> Tensor:
    """Training-mode batch normalization with statistics over the inputs of every process in ``group``.

    Updates the running buffers (when given) with the global mean and the unbiased global variance
    M/(M - 1) * var, as batch normalization on the concatenated batch would.
    """
    F.check_batch_norm_input(input)
    out, mean, var, total = _SyncBatchNormFn.apply(input, weight, bias, eps, group)
    m = float(total)
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m:.0f} in all processes")
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_((var * (m / (m - 1))).to(running_var.dtype), alpha=momentum)
    return out


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over (N, C, *) input with statistics synchronized across processes.

    Arguments, parameters and buffers as ``torch.nn.SyncBatchNorm``. In training mode with an
    initialized process group of more than one process it uses :func:`sync_batch_norm`; otherwise
    (evaluation, a single process) it is ``bnlib.BatchNorm1d/2d``, exactly as torch's falls back.
    Unlike torch's, it runs on CPU tensors (with the gloo backend).
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self._world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        F.check_batch_norm_input(input, self.num_features)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return sync_batch_norm(
            input,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            factor,
            self.eps,
            self.process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch-norm layer (bnlib's or torch.nn's) in ``module`` by a SyncBatchNorm, as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

        The new layer takes over the old one's Parameter and buffer objects themselves (not copies),
        so an optimizer built before the conversion keeps training the converted model.
        """
        if isinstance(module, (_BatchNorm, nn.modules.batchnorm._BatchNorm)) and not isinstance(module, cls):
            ref = _any_tensor(module)
            sync = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                device=ref.device if ref is not None else None,
                dtype=ref.dtype if ref is not None else None,
                bias=module.bias is not None,
            )
            for name, param in module.named_parameters(recurse=False):
                setattr(sync, name, param)
            for name, buffer in module.named_buffers(recurse=False):
                setattr(sync, name, buffer)
            sync.train(module.training)
            return sync
        for name, child in module.named_children():
            setattr(module, name, cls.convert_sync_batchnorm(child, process_group))
        return module


def _any_tensor(module: nn.Module) -> Tensor | None:
    """A floating-point parameter or buffer of ``module`` (its device and dtype), if it has one."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return None


# --- running several processes -----------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, pickle.dumps(result)))  # bytes: tensors copied, not shared with a dying process
    except Exception:  # report to the parent, which raises
        queue.put((rank, False, traceback.format_exc()))


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout_s: float = 120.0,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined by a gloo process
    group on 127.0.0.1, and return their results in rank order.

    ``start_method``: "fork" by default on Linux (the children start in about a second, sharing
    what the parent has imported); elsewhere "spawn", which starts fresh
    interpreters (several seconds) and needs ``fn`` importable from a module. Raises RuntimeError
    with the worker's traceback if a process fails or none answers within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"  # fork is unsafe on macOS
    ctx = mp.get_context(start_method)
    if start_method == "fork":  # the first optimizer imports torch._dynamo (seconds): do it once, here
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue, timeout_s), daemon=True)
        for rank in range(world_size)
    ]
    with warnings.catch_warnings():  # Python >= 3.12 warns about forking a multi-threaded kernel
        warnings.simplefilter("ignore", DeprecationWarning)
        for p in procs:
            p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, value = queue.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(
                        f"processes {dead} exited without a result (exit codes {[procs[r].exitcode for r in dead]})"
                    )
                elif time.monotonic() > deadline:
                    errors.append(f"no result within {timeout_s} s")
                else:
                    continue
                break
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"process {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(5 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


# --- the book's demonstrations (run inside :func:`launch`) -------------------------------------


def run_several(rank: int, world_size: int, calls: Sequence[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` for every ``(fn, args)`` in ``calls``, one after the other
    in the same process group, and return their results in order: one :func:`launch` (starting
    processes costs more than most demonstrations) for several demonstrations."""
    return [fn(rank, world_size, *args) for fn, args in calls]


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
    """Data-parallel SGD (momentum 0.9) of ``bnlib.models.mlp(sizes, "relu", BatchNorm1d)``, by hand.

    Every process builds the same network (seeded), takes its slice of each global batch of
    world_size * per_process examples, and the parameter gradients are averaged with one
    all-reduce per step. ``sync=True`` converts the BN layers to :class:`SyncBatchNorm`;
    otherwise each process normalizes with its own per_process examples.

    Returns ``{"state": the final state_dict, "losses": this process's training losses}``. Running
    statistics differ between processes with per-process BN (DistributedDataParallel would
    broadcast process 0's); the parameters are the same everywhere. ``dtype=torch.float64`` makes
    runs comparable over many steps: small-batch training amplifies float32 rounding quickly.
    """
    from bnlib.models import mlp
    from bnlib.modules import BatchNorm1d

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
    ``bnlib.BatchNorm1d``, or ``bnlib.norms.factory("ghost", ghost_size=2)`` for per-process BN)."""
    from bnlib.models import mlp

    net = mlp(list(sizes), "relu", norm, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x = x.to(dtype)
    batches = _global_batches(len(x), batch_size, steps, seed + 1)
    losses = _sgd_run(net, ((x[i], y[i]) for i in batches), lr)
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}
