r"""Fold an inference-mode batch-norm layer into the convolution or linear layer before it.

In eval mode BN is a fixed per-channel affine map (Ioffe & Szegedy, Algorithm 2, step 11):

.. math::
    y = \gamma \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta = s\,z + (\beta - s\,\mu),
    \qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}},

with the running mean :math:`\mu` and running variance :math:`\sigma^2`. When :math:`z = W x + b`
comes from a convolution or linear layer, the two maps compose into one layer with

.. math::
    W' = s \cdot W \ \text{(row / output channel } k \text{ scaled by } s_k), \qquad b' = s\,(b - \mu) + \beta .

The same result as ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, for
torch's and bnlib's BN layers alike; the fold is computed in float64 and cast back.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bnlib.norm.modules import is_batch_norm

__all__ = ["fold_weights", "fuse_conv_bn", "fuse_linear_bn", "fuse_model"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    out_dim: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""The folded layer's ``(W', b')``: :math:`W' = s W` and :math:`b' = s (b - \mu) + \beta`,
    with :math:`s = \gamma/\sqrt{\sigma^2+\epsilon}` per output channel.

    Args:
        weight: the layer's weight; its dimension ``out_dim`` indexes the output channels
            (0 for Linear and Conv, 1 for ConvTranspose with one group).
        bias: the layer's bias, or None (treated as zero).
        running_mean: the BN layer's population mean, (C,).
        running_var: the BN layer's population variance, (C,).
        eps: the BN layer's epsilon.
        gamma: the BN layer's scale, or None (1).
        beta: the BN layer's shift, or None (0).
        out_dim: which dimension of ``weight`` holds the output channels.
    """
    c = running_mean.shape[0]
    if weight.dim() < 2 or out_dim not in (0, 1) or weight.shape[out_dim] != c:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} has no dimension {out_dim} of size {c} "
            "(the BN layer's num_features) to fold into"
        )
    for name, t in (("running_var", running_var), ("bias", bias), ("gamma", gamma), ("beta", beta)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    d = torch.float64
    scale = torch.rsqrt(running_var.to(d) + eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(d)
    shift = -running_mean.to(d) * scale
    if bias is not None:
        shift = shift + bias.detach().to(d) * scale
    if beta is not None:
        shift = shift + beta.detach().to(d)
    shape = [1] * weight.dim()
    shape[out_dim] = c
    new_weight = (weight.detach().to(d) * scale.view(shape)).to(weight.dtype)
    return new_weight, shift.to(weight.dtype if bias is None else bias.dtype)


def _check_bn(bn: nn.Module, channels: int) -> None:
    if not is_batch_norm(bn):
        raise ValueError(f"expected a BatchNorm layer, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("folding uses the running statistics: call .eval() on the BN layer (or the model) first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the BN layer keeps no running statistics (track_running_stats=False): nothing to fold")
    if bn.num_features != channels:
        raise ValueError(f"BN layer has {bn.num_features} features but the layer before it outputs {channels}")


def _replace(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    fused.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return fused


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new convolution computing ``bn(conv(x))`` for an eval-mode ``bn``.

    Conv1d/2d/3d (any groups) and ConvTranspose1d/2d/3d with one group.

    Args:
        conv: the convolution whose output ``bn`` normalizes.
        bn: a batch-norm layer in eval mode with running statistics.
    """
    if isinstance(conv, _CONV_T):
        if conv.groups != 1:
            raise ValueError("folding into a transposed convolution needs groups=1")
        out_dim, channels = 1, conv.out_channels
    elif isinstance(conv, _CONV):
        out_dim, channels = 0, conv.out_channels
    else:
        raise ValueError(f"expected a convolution layer, got {type(conv).__name__}")
    _check_bn(bn, channels)
    w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, out_dim)
    return _replace(conv, w, b)


def fuse_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Module:
    """A new ``nn.Linear`` computing ``bn(linear(x))`` of the eval-mode ``bn`` (BatchNorm1d on (N, C) features).

    Args:
        linear: the linear layer whose output ``bn`` normalizes.
        bn: a batch-norm layer in eval mode with running statistics.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"expected nn.Linear, got {type(linear).__name__}")
    _check_bn(bn, linear.out_features)
    w, b = fold_weights(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return _replace(linear, w, b)


def fuse_model(model: nn.Module) -> nn.Module:
    """A folded copy of an eval-mode model: every BN layer that directly follows a conv/linear layer
    inside an ``nn.Sequential`` (at any depth) is folded into it and removed.

    BN layers in other positions are left as they are. The copy is returned in eval mode; the
    original model is not changed.

    Args:
        model: a model in eval mode.
    """
    if any(m.training for m in model.modules() if is_batch_norm(m)):
        raise ValueError("folding uses the running statistics: call model.eval() first")
    folded = copy.deepcopy(model).eval()
    _fuse_in_place(folded)
    return folded


def _fuse_in_place(module: nn.Module) -> None:
    for child in module.children():
        _fuse_in_place(child)
    if not isinstance(module, nn.Sequential):
        return
    layers = list(module)
    out: list[nn.Module] = []
    for layer in layers:
        prev = out[-1] if out else None
        if is_batch_norm(layer) and layer.track_running_stats and isinstance(prev, (nn.Linear, *_CONV, *_CONV_T)):
            if isinstance(prev, nn.Linear):
                out[-1] = fuse_linear_bn(prev, layer)
            elif not (isinstance(prev, _CONV_T) and prev.groups != 1):
                out[-1] = fuse_conv_bn(prev, layer)
            else:
                out.append(layer)
            continue
        out.append(layer)
    if len(out) != len(layers):
        for name, _ in list(module.named_children()):
            delattr(module, name)
        for i, layer in enumerate(out):
            module.add_module(str(i), layer)
