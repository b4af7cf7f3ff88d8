r"""Training without batch normalization: weight standardization, normalizer-free residual
blocks, adaptive gradient clipping and Fixup.

- :func:`standardize_weight`, :class:`WSLinear`, :class:`WSConv2d`: weight standardization
  (Qiao et al. 2019), every output unit's weights reparametrized to zero mean and unit variance,
  :math:`\hat W_i = (W_i - \mathrm{mean}(W_i)) / \sqrt{\mathrm{Var}(W_i) + \epsilon}`; with
  ``scaled=True`` the *scaled* weight standardization of normalizer-free networks (Brock, De &
  Smith 2021), :math:`\hat W_i = \gamma\, (W_i - \mathrm{mean}(W_i)) / (\sqrt{\mathrm{Var}(W_i)
  + \epsilon}\, \sqrt{N})` with N the fan-in and :math:`\gamma` the gain of the activation in front
  (:data:`RELU_GAIN` for ReLU), which keeps the variance of a layer's output at 1; with
  ``learnable_gain=True`` each unit also gets a learned gain (starting at 1), as in NF-ResNets.
- :class:`NFResidual`, :func:`nf_betas`: the normalizer-free residual block
  :math:`x_{l+1} = x_l + \alpha f(x_l / \beta_l)` with :math:`\beta_l` the expected standard
  deviation of :math:`x_l`: at initialization the variance of the residual stream grows as
  :math:`1 + l \alpha^2`.
- :func:`unitwise_ratio`, :func:`adaptive_clip_grad_`: adaptive gradient clipping (Brock et al.
  2021), which rescales the gradient of every output unit whose ratio
  :math:`\|G_i\| / \max(\|W_i\|, \epsilon)` exceeds :math:`\lambda` down to that ratio.
- :func:`fixup_init_`, :class:`ScalarBias`, :class:`ScalarScale`: Fixup (Zhang, Dauphin & Ma 2019):
  the last layer of every residual branch (and the classifier) starts at zero, the other branch
  layers are scaled by :math:`L^{-1/(2m-2)}` (L branches of m layers), and scalar biases and a scalar
  multiplier per branch replace what normalization's :math:`\beta` and :math:`\gamma` did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "RELU_GAIN",
    "standardize_weight",
    "WSLinear",
    "WSConv2d",
    "NFResidual",
    "nf_betas",
    "unitwise_norm",
    "unitwise_ratio",
    "adaptive_clip_grad_",
    "ScalarBias",
    "ScalarScale",
    "fixup_init_",
]

#: gain that makes ``relu(z)`` followed by a zero-mean, unit-norm row of weights keep unit
#: variance for :math:`z \sim N(0, 1)`: :math:`\sqrt{2 / (1 - 1/\pi)}` (Brock, De & Smith 2021)
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def standardize_weight(weight: Tensor, eps: float = 1e-5, gain: float | None = None) -> Tensor:
    r"""Weight standardization of ``weight``, one output unit (``weight[i]``) at a time.

    :math:`\hat W_i = (W_i - \mathrm{mean}(W_i)) / \sqrt{\mathrm{Var}(W_i) + \epsilon}` with the
    biased variance over the unit's N = fan-in weights (Qiao et al. 2019). With ``gain``, the scaled
    form of normalizer-free networks: the result is further multiplied by ``gain / sqrt(N)``, so
    that the row has squared norm ``gain**2`` (up to eps).

    Args:
        weight: a Linear ``(out, in)`` or convolution ``(out, in / groups, *kernel)`` weight.
        eps: added to the variance (guards a constant row).
        gain: None for Qiao et al.'s form; a number for the scaled form (e.g. :data:`RELU_GAIN`).

    Returns:
        The standardized weight, same shape, differentiable with respect to ``weight``.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight needs an output axis and at least one input axis, got shape {tuple(weight.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    dims = list(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    out = (weight - mean) * torch.rsqrt(var + eps)
    if gain is not None:
        out = out * (gain / math.sqrt(weight[0].numel()))
    return out


def _times_channel_gain(weight: Tensor, channel_gain: Tensor | None) -> Tensor:
    """``weight`` with each output unit (``weight[i]``) multiplied by ``channel_gain[i]``."""
    if channel_gain is None:
        return weight
    return weight * channel_gain.reshape((-1,) + (1,) * (weight.dim() - 1))


class WSLinear(nn.Linear):
    r"""A Linear layer whose weight is standardized per output unit at every call,
    :math:`y = x \hat W^\top + b` with :math:`\hat W` from :func:`standardize_weight`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias. Default: True.
        eps: added to each unit's weight variance. Default: 1e-5.
        gain: None: weight standardization (unit variance per unit); a number: scaled weight
            standardization with that gain (e.g. :data:`RELU_GAIN` after a ReLU, 1 after nothing).
        learnable_gain: also multiply each standardized row by a learned gain ``channel_gain``
            (one per output unit, starting at 1), as the scaled weight standardization of NF-ResNets
            and NFNets does. Default: False.

    Shape:
        Input: ``(*, in_features)``. Output: ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-5,
        gain: float | None = None,
        learnable_gain: bool = False,
    ) -> None:
        if in_features < 2:
            raise ValueError(f"weight standardization needs at least 2 inputs per unit, got {in_features}")
        super().__init__(in_features, out_features, bias)
        self.eps, self.gain = eps, gain
        self.channel_gain = nn.Parameter(torch.ones(out_features)) if learnable_gain else None

    def standardized_weight(self) -> Tensor:
        """The weight the layer applies: :func:`standardize_weight` of ``self.weight``, each row
        times its ``channel_gain`` if the layer has one."""
        return _times_channel_gain(standardize_weight(self.weight, self.eps, self.gain), self.channel_gain)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, gain={self.gain}"


class WSConv2d(nn.Conv2d):
    r"""A Conv2d whose weight is standardized per output channel (over its in/groups x kH x kW
    weights) at every call (Qiao et al. 2019), with :func:`standardize_weight`.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: size of the kernel.
        stride: stride of the convolution. Default: 1.
        padding: padding added to all four sides. Default: 0.
        dilation: spacing between kernel elements. Default: 1.
        groups: blocked connections from input to output channels. Default: 1.
        bias: learn an additive bias. Default: True.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        eps: added to each output channel's weight variance. Default: 1e-5.
        gain: None: weight standardization; a number: scaled weight standardization with that gain.
        learnable_gain: also multiply each standardized output channel by a learned gain
            ``channel_gain`` (starting at 1), as NF-ResNets and NFNets do. Default: False.

    Shape:
        Input: ``(N, C_in, H, W)``. Output: ``(N, C_out, H_out, W_out)``, as ``torch.nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        gain: float | None = None,
        learnable_gain: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        if self.weight[0].numel() < 2:
            raise ValueError("weight standardization needs at least 2 weights per output channel")
        self.eps, self.gain = eps, gain
        self.channel_gain = nn.Parameter(torch.ones(out_channels)) if learnable_gain else None

    def standardized_weight(self) -> Tensor:
        """The weight the layer applies: :func:`standardize_weight` of ``self.weight``, each output
        channel times its ``channel_gain`` if the layer has one."""
        return _times_channel_gain(standardize_weight(self.weight, self.eps, self.gain), self.channel_gain)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, gain={self.gain}"


def nf_betas(num_blocks: int, alpha: float) -> list[float]:
    r"""The expected standard deviations :math:`\beta_l = \sqrt{1 + l\alpha^2}`, l = 0 ..
    ``num_blocks - 1``, of the residual stream entering each block of a normalizer-free stage whose
    input has unit variance (Brock, De & Smith 2021). The input must have unit variance for the
    betas to be right: scale the stem accordingly.

    Args:
        num_blocks: blocks in the stage (at least 1).
        alpha: the residual branches' scale (positive).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return [math.sqrt(1.0 + l * alpha**2) for l in range(num_blocks)]


class NFResidual(nn.Module):
    r"""A normalizer-free residual block, :math:`y = x + \alpha\, f(x / \beta)`.

    With :math:`\beta` the standard deviation of x at initialization (:func:`nf_betas`) and a branch
    ``f`` that keeps unit variance (e.g. scaled weight-standardized layers, :class:`WSLinear` with
    ``gain``), the branch adds :math:`\alpha^2` to the variance of the stream: what batch
    normalization's downscaled branches achieve (De & Smith 2020), fixed analytically instead of
    measured on the batch.

    Args:
        branch: the residual branch f (shape-preserving).
        alpha: scale of the branch (positive; Brock, De & Smith use 0.2).
        beta: expected standard deviation of the block's input (positive).

    Shape:
        Input: any shape ``branch`` accepts. Output: the same shape.
    """

    def __init__(self, branch: nn.Module, alpha: float, beta: float) -> None:
        super().__init__()
        if not alpha > 0 or not beta > 0:
            raise ValueError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
        self.branch, self.alpha, self.beta = branch, float(alpha), float(beta)

    def forward(self, input: Tensor) -> Tensor:
        return input + self.alpha * self.branch(input / self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4g}"


def unitwise_norm(t: Tensor) -> Tensor:
    """The Frobenius norm of each output unit of ``t`` (over all axes but the first); a tensor
    with at most one axis (a bias, a gain) counts as one unit, as in Brock et al. (2021)'s code.

    Args:
        t: a weight ``(out, *)`` or a vector.

    Returns:
        Shape ``(out,)`` for a weight, ``(1,)`` for a vector or scalar.
    """
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape(1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def unitwise_ratio(weight: Tensor, grad: Tensor, eps: float = 1e-3) -> Tensor:
    r"""The ratio AGC tests, :math:`\|G_i\| / \max(\|W_i\|, \epsilon)`, for every unit i
    (:func:`unitwise_norm`).

    Args:
        weight: a parameter.
        grad: its gradient, same shape.
        eps: floor of the weight norm (zero-initialized weights can still move). Default: 1e-3.
    """
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ in shape")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return unitwise_norm(grad) / unitwise_norm(weight).clamp(min=eps)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3) -> int:
    r"""Adaptive gradient clipping in place (Brock et al. 2021): every unit i whose ratio
    :math:`\|G_i\| / \max(\|W_i\|, \epsilon)` exceeds ``clipping`` (:math:`\lambda`) gets
    :math:`G_i \leftarrow \lambda \max(\|W_i\|, \epsilon)\, G_i / \|G_i\|`; the others are left as
    they are. Brock et al. do not clip the final classifier layer: leave it out of ``parameters``.

    Args:
        parameters: the parameters whose ``.grad`` to clip (those without a gradient are skipped).
        clipping: the threshold :math:`\lambda` (positive).
        eps: floor of the weight norm. Default: 1e-3.

    Returns:
        How many units were clipped.
    """
    if not clipping > 0:
        raise ValueError(f"clipping must be positive, got {clipping}")
    clipped = torch.zeros((), dtype=torch.long)
    for p in parameters:
        if p.grad is None:
            continue
        ratio = unitwise_ratio(p, p.grad, eps)
        over = ratio > clipping
        factor = torch.where(over, clipping / ratio.clamp(min=clipping), torch.ones_like(ratio))
        p.grad.mul_(factor.reshape((-1,) + (1,) * (p.dim() - 1)) if p.dim() > 1 else factor.reshape(()))
        clipped = clipped + over.sum().cpu()
    return int(clipped)


class ScalarBias(nn.Module):
    """A learned scalar added to the input (Fixup's bias before every layer and activation); starts at 0.

    Shape:
        Input: any. Output: the same shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, input: Tensor) -> Tensor:
        return input + self.bias


class ScalarScale(nn.Module):
    """A learned scalar multiplier (Fixup's multiplier at the end of every residual branch); starts at 1.

    Shape:
        Input: any. Output: the same shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input: Tensor) -> Tensor:
        return input * self.scale


WeightLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


@torch.no_grad()
def fixup_init_(
    branches: Sequence[Sequence[WeightLayer]],
    classifier: nn.Linear | None = None,
    generator: torch.Generator | None = None,
) -> None:
    r"""Fixup initialization (Zhang, Dauphin & Ma 2019) in place.

    For L residual branches of m weight layers each: the first m - 1 layers of every branch get He
    initialization scaled by :math:`L^{-1/(2m-2)}`, the last layer of every branch and the
    ``classifier`` get zero weights; all their biases start at zero. At initialization every
    branch outputs zero, so the network is its skip path.

    Args:
        branches: the weight layers (Linear or Conv) of each residual branch, in order; every branch
            has the same number m >= 2 of them.
        classifier: the final Linear layer (zeroed), or None.
        generator: random generator for the He initialization.
    """
    if not branches:
        raise ValueError("need at least one residual branch")
    m = len(branches[0])
    if m < 2 or any(len(b) != m for b in branches):
        raise ValueError(
            f"every branch needs the same number (>= 2) of weight layers, got {[len(b) for b in branches]}"
        )
    scale = len(branches) ** (-1.0 / (2 * m - 2))
    for branch in branches:
        for i, layer in enumerate(branch):
            if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ValueError(f"branch layers must be Linear or Conv, got {type(layer).__name__}")
            if i < m - 1:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
                layer.weight.mul_(scale)
            else:
                nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    if classifier is not None:
        nn.init.zeros_(classifier.weight)
        if classifier.bias is not None:
            nn.init.zeros_(classifier.bias)
