r"""Batch normalization with a correction for small or unrepresentative batches: batch
renormalization (Ioffe 2017), with its r_max/d_max schedule, and ghost batch normalization
(statistics over groups of ``ghost_size`` samples, which is what one device sees in data-parallel
training).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlib.norm.channels import affine, in_compute_precision, to_input_precision, update_running_stats
from bnlib.norm.modules import NormBase, normalize_with_running_stats
from bnlib.norm.taxonomy import mean_var

__all__ = ["BatchRenorm", "GhostBatchNorm"]


class BatchRenorm(NormBase):
    r"""Batch renormalization (Ioffe 2017) over ``(N, C, *)`` input, optionally in ghost batches.

    Training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` and
    running ones :math:`\mu, \sigma = \sqrt{\text{running\_var} + \epsilon}`:

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),

        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\quad y = \gamma \hat x + \beta,

    with no gradient through r and d. Unclipped, :math:`\hat x = (x - \mu)/\sigma`: the output
    no longer depends on the batch companions, and training computes what evaluation computes.
    With r_max = 1 and d_max = 0 it is batch normalization. The limits follow a schedule in
    updates: (1, 0) for ``warmup_steps``, then a linear ramp over ``ramp_steps`` to
    (``rmax``, ``dmax``). The running averages (PyTorch's convention: unbiased variance, weight
    ``momentum`` for the new batch; the paper averages sigma instead) are updated once per update.
    Evaluation: :math:`(x - \mu)/\sigma`, as batch normalization's.

    As with ``torch.nn.BatchNorm2d``, an empty batch gives an empty output and leaves the running
    statistics as they are, though it counts as an update (``num_batches_tracked``).

    Args:
        num_features: number of channels C.
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages. Default: 0.01 (long averages,
            as the paper recommends, since the running statistics enter training).
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        rmax: final limit of r (>= 1). Default: 3 (the paper's).
        dmax: final limit of d (>= 0). Default: 5 (the paper's).
        warmup_steps: updates with plain batch normalization (r = 1, d = 0). Default: 0.
        ramp_steps: updates over which the limits grow linearly to (rmax, dmax). Default: 0.
        ghost_size: if given, the batch is split into consecutive groups of this many samples and
            each group is normalized with its own statistics (the running averages use their
            average): what each device computes in data-parallel training without synchronization.
            Default: None (one group).
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.

    Shape:
        Input: ``(N, C, *)``, N a multiple of ``ghost_size`` when it is given. Output: same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
        ghost_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if momentum is None:
            raise ValueError("momentum must be a number for batch renormalization")
        if rmax < 1 or dmax < 0:
            raise ValueError(f"need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be non-negative, got {warmup_steps}, {ramp_steps}")
        if ghost_size is not None and ghost_size < 2:
            raise ValueError(f"ghost_size must be at least 2 (or None), got {ghost_size}")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.ramp_steps, self.ghost_size = warmup_steps, ramp_steps, ghost_size

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """The clipping limits (r_max, d_max) in force at update ``step`` (default: the next one).

        Args:
            step: the number of updates made before it; None for the layer's own count.
        """
        t = int(self.num_batches_tracked) if step is None else step
        if t < self.warmup_steps:
            frac = 0.0
        elif self.ramp_steps == 0:
            frac = 1.0
        else:
            frac = min(1.0, (t - self.warmup_steps) / self.ramp_steps)
        return 1.0 + (self.rmax - 1.0) * frac, self.dmax * frac

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, *), got shape {tuple(input.shape)}")
        if not self.training:
            x_hat = normalize_with_running_stats(
                in_compute_precision(input), self.running_mean, self.running_var, self.eps
            )
            return to_input_precision(affine(x_hat, self.weight, self.bias), input)
        n, c = input.shape[:2]
        if input.numel() == 0:  # as torch.nn.BatchNorm: an empty output, the update counted, no statistics
            self.num_batches_tracked.add_(1)
            return to_input_precision(affine(in_compute_precision(input), self.weight, self.bias), input)
        g = self.ghost_size or n
        if n % g:
            raise ValueError(f"batch size {n} is not a multiple of ghost_size {g}")
        if g * input[0, 0].numel() < 2:
            raise ValueError(f"expected more than 1 value per channel when training, got input size {input.shape}")
        x = in_compute_precision(input).reshape(n // g, g, c, -1)  # (groups, samples, C, positions)
        mean, var = mean_var(x, (1, 3))
        std_b = torch.sqrt(var + self.eps)
        x_hat = (x - mean) / std_b
        rmax, dmax = self.limits()
        if rmax > 1.0 or dmax > 0.0:
            shape = (1, 1, c, 1)
            std = torch.sqrt(self.running_var + self.eps).view(shape)
            r = (std_b.detach() / std).clamp(1.0 / rmax, rmax)
            d = ((mean.detach() - self.running_mean.view(shape)) / std).clamp(-dmax, dmax)
            x_hat = x_hat * r + d
        m = g * x.shape[3]
        batch_mean, batch_var = mean.detach().mean((0, 1, 3)), var.detach().mean((0, 1, 3))
        update_running_stats(self.running_mean, self.running_var, batch_mean, batch_var, m, self.momentum)
        self.num_batches_tracked.add_(1)
        return to_input_precision(affine(x_hat.reshape(input.shape), self.weight, self.bias), input)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, ghost_size={self.ghost_size}"
        )


class GhostBatchNorm(BatchRenorm):
    """Batch normalization with statistics over groups of ``ghost_size`` samples (Hoffer et al. 2017).

    It is :class:`BatchRenorm` with r_max = 1 and d_max = 0; with ``ghost_size=None`` it computes
    what ``torch.nn.BatchNorm1d/2d`` computes. Evaluation uses the running statistics.

    Args:
        num_features: number of channels C.
        ghost_size: samples per group; each group is normalized with its own statistics and the
            running averages receive their average. Default: None (the whole batch, one group).
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages. Default: 0.1, as in batch
            normalization.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.

    Shape:
        Input: ``(N, C, *)``, N a multiple of ``ghost_size`` when it is given. Output: same shape.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, 1.0, 0.0, ghost_size=ghost_size, device=device, dtype=dtype
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"
