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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnlib.norm import functional as F
from bnlib.norm.channels import affine, channel_shape, reduce_dims, update_running_stats
from bnlib.norm.modules import BatchNormBase, is_batch_norm

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch statistics all-reduced over ``group``; backward all-reduces the two gradient sums."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        dims, shape = reduce_dims(x), channel_shape(x)
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
        out = affine(x_hat, weight, bias).to(x.dtype)  # float32 parameters would promote half input
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.group, ctx.total, ctx.has_bias = group, float(total), bias is not None
        ctx.mark_non_differentiable(mean, var, total)
        return out, mean, var, total

    @staticmethod
    @once_differentiable  # the saved x_hat and inv_std carry no graph: twice would be silently wrong
    def backward(ctx, grad_out: Tensor, _m, _v, _t):
        x_hat, inv_std, weight = ctx.saved_tensors
        dims, shape = reduce_dims(x_hat), channel_shape(x_hat)
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

    Args:
        input: this process's slice of the batch, ``(N, C, *)``.
        running_mean: (C,) buffer, updated in place, or None.
        running_var: (C,) buffer, updated in place, or None.
        weight: gamma, (C,), or None.
        bias: beta, (C,), or None.
        momentum: weight of the new batch in the running averages.
        eps: added to the variance before the square root.
        group: the torch.distributed process group; None for every process.
    """
    F.check_batch_norm_input(input)
    out, mean, var, total = _SyncBatchNormFn.apply(input, weight, bias, eps, group)
    m = float(total)
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m:.0f} in all processes")
    update_running_stats(running_mean, running_var, mean, var, m, momentum)
    return out


class SyncBatchNorm(BatchNormBase):
    """Batch normalization over ``(N, C, *)`` input with statistics synchronized across processes.

    Arguments, parameters and buffers as ``torch.nn.SyncBatchNorm``. In training mode with an
    initialized process group of more than one process it uses :func:`sync_batch_norm`; otherwise
    (evaluation, a single process) it is ``bnlib.BatchNorm1d/2d``, exactly as torch's falls back.
    Unlike torch's, it runs on CPU tensors (with the gloo backend).

    Args:
        num_features: number of channels C.
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new (global) batch in the running averages; ``None`` gives a
            cumulative average. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
            Default: True.
        process_group: the torch.distributed group whose processes share statistics. Default:
            None (every process).
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.

    Shape:
        Input: ``(N, C, *)``, each process its own N. Output: same shape as the input.
    """

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
        if self.track_running_stats and self.num_batches_tracked is not None:
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

        Args:
            module: a layer or a model; converted in place where it has children.
            process_group: the group the new layers synchronize over; None for every process.

        Returns:
            ``module``, or its replacement when ``module`` itself is a batch-norm layer.
        """
        if is_batch_norm(module) and not isinstance(module, cls):
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
