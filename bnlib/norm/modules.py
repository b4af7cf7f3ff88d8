"""``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``: drop-in replacements for torch.nn's, built on
bnlib.norm.functional.

Same constructor arguments, parameter and buffer names, train/eval behaviour and state_dict
layout as ``torch.nn.BatchNorm1d/2d/3d``, so either loads the other's state_dict, including
state_dicts saved before ``num_batches_tracked`` existed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlib.norm import functional as F
from bnlib.norm.channels import channel_shape

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "NormBase",
    "is_batch_norm",
    "normalize_with_running_stats",
]


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer: bnlib's (synchronized included) or torch.nn's.

    Args:
        module: any module.
    """
    return isinstance(module, (BatchNormBase, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))


def normalize_with_running_stats(x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """(x - running_mean) / sqrt(running_var + eps) per channel of an ``(N, C, *)`` tensor, no affine.

    Args:
        x: the input, ``(N, C, *)``.
        running_mean: the mean to subtract, (C,).
        running_var: the variance to divide by (its square root, after adding eps), (C,).
        eps: added to the variance.
    """
    shape = channel_shape(x)
    return (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)


class NormBase(nn.Module):
    """Per-channel parameters (``weight``, ``bias``) and running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``), laid out as in torch.nn; shared by every layer in
    bnlib that normalizes per channel (batch norm here, instance norm in :mod:`bnlib.norm.per_sample`,
    batch renorm in :mod:`bnlib.norm.renorm`, synchronized batch norm in :mod:`bnlib.norm.sync`).

    It holds state only: the subclasses define ``forward``. ``eps`` must be positive, as torch.nn
    requires in training; a subclass that sets :attr:`allows_zero_eps` accepts 0 (exact identities
    in the book's experiments).

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative
            (simple) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
            without them batch statistics are used in eval mode too. Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.
    """

    #: whether eps = 0 is accepted (torch.nn refuses it; see bnlib.lab.invariance.ExactBatchNorm1d)
    allows_zero_eps: bool = False

    # state_dict format: version 2 added num_batches_tracked (as in torch.nn)
    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if not (eps > 0 or (eps == 0 and self.allows_zero_eps)):
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.use_bias = affine and bias
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if self.use_bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch counted (when the layer keeps them)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, and gamma to 1 and beta to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
        if self.use_bias:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A state_dict saved before version 2 has no num_batches_tracked: keep this layer's own count
        # (0 for a layer that has none), as torch does.
        key = prefix + "num_batches_tracked"
        if local_metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            keep = own is not None and own.device.type != "meta"
            state_dict[key] = own if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.use_bias}, track_running_stats={self.track_running_stats}"
        )


class BatchNormBase(NormBase):
    r"""Shared base: parameters, buffers and the forward pass; subclasses only check dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Statistics are taken per channel over every dimension except 1. In training mode the batch
    statistics are used (biased variance) and, with ``track_running_stats``, the running
    averages are updated (unbiased variance). In eval mode the running averages are used.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative
            (simple) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
            without them batch statistics are used in eval mode too. Setting the flag to False on a
            layer that has the buffers (after training) stops their updates in training mode; eval
            mode still normalizes with them, as in torch. Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.

    Shape:
        Input: ``(N, C, *)``, C = ``num_features``; a subclass may restrict the number of dimensions.
        Output: same shape as the input.
    """

    #: the numbers of input dimensions a subclass accepts (None for any ``(N, C, *)`` input)
    input_dims: tuple[int, ...] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if self.input_dims is not None and input.dim() not in self.input_dims:
            expected = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        F.check_batch_norm_input(input, self.num_features)
        if self.training and not (self.eps > 0 or (self.eps == 0 and self.allows_zero_eps)):
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # As torch.nn decides: eval mode uses the running statistics whenever the buffers exist (the
        # flag only stops their updates); training mode updates them only when the flag is set.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(BatchNormBase):
    """Batch normalization over (N, C) or (N, C, L) input, per feature over N (or ``N*L``) values.

    A drop-in replacement for ``torch.nn.BatchNorm1d``; the formula and the train/eval behaviour
    are those of :class:`BatchNormBase`.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative
            (simple) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
            without them batch statistics are used in eval mode too. Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.

    Shape:
        Input: (N, C) or (N, C, L). Output: same shape as the input.
    """

    input_dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Batch normalization over (N, C, H, W) input, per channel over ``N*H*W`` values.

    A drop-in replacement for ``torch.nn.BatchNorm2d``; the formula and the train/eval behaviour
    are those of :class:`BatchNormBase`.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative
            (simple) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
            without them batch statistics are used in eval mode too. Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.

    Shape:
        Input: (N, C, H, W). Output: same shape as the input.
    """

    input_dims = (4,)


class BatchNorm3d(BatchNormBase):
    """Batch normalization over (N, C, D, H, W) input, per channel over ``N*D*H*W`` values.

    A drop-in replacement for ``torch.nn.BatchNorm3d``; the formula and the train/eval behaviour
    are those of :class:`BatchNormBase`.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` gives a cumulative
            (simple) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale (``weight``, gamma) and shift (``bias``, beta). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
            without them batch statistics are used in eval mode too. Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only, as in torch). Default: True.

    Shape:
        Input: (N, C, D, H, W). Output: same shape as the input.
    """

    input_dims = (5,)
