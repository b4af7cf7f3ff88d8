"""Batch-normalization variants that test explanations of why BN works (Santurkar et al. 2018).

- :class:`NoisyBN` wraps a BN layer and, in training mode, injects noise after it that changes at
  every step: each unit gets a fresh random shift and scale, and every example its own jitter around
  them (the paper's "noisy BatchNorm", Sec. 2.1). The layer's output distribution then moves far
  more from step to step than in a network without BN, so if BN helped by keeping distributions
  still, the noisy network should train badly.
- :func:`add_noise` wraps every BN layer of a model in a :class:`NoisyBN`.
- :class:`LpBatchNorm` normalizes by the batch's mean l_p deviation (p = 1, 2 or infinity) instead
  of the standard deviation (the paper's Sec. 3.3 variants).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bnlib.norm.channels import reduce_dims, running_average_
from bnlib.norm.modules import is_batch_norm

__all__ = ["NoisyBN", "add_noise", "LpBatchNorm"]


class NoisyBN(nn.Module):
    r"""A BN layer followed by time-varying, non-zero-mean, non-unit-variance noise.

    In training mode, at every forward pass (one training step) and for every unit ``j``, a shift
    :math:`\mu_j \sim U(-\text{shift}, \text{shift})` and a scale
    :math:`c_j \sim U(\text{scale\_low}, \text{scale\_high})` are drawn; each example ``i`` then gets

    .. math::  a_{ij} \leftarrow s_{ij}\, a_{ij} + m_{ij},\quad
               s_{ij} = c_j (1 + \text{jitter}\, \xi_{ij}),\quad m_{ij} = \mu_j + \text{jitter}\, \zeta_{ij}

    with :math:`\xi, \zeta \sim N(0, 1)` independent. So the noise is i.i.d. over the batch given the
    step, its distribution has non-zero mean and non-unit variance, and it changes every step. In
    evaluation mode the wrapper is the BN layer alone. Noise is drawn from the wrapper's own
    generator (on the CPU, then moved), so it is reproducible and does not touch the global stream.

    Args:
        bn: the wrapped layer (e.g. ``bnlib.BatchNorm1d(100)``); its output is (N, C) or (N, C, ...).
        shift: half-width of the uniform distribution of the per-step shift.
        scale: ``(low, high)`` of the uniform distribution of the per-step scale (positive).
        jitter: standard deviation of the per-example noise around the step's shift and scale.
        seed: seed of the wrapper's generator.

    Shape:
        Input: what ``bn`` takes. Output: the shape of ``bn``'s output, (N, C) or (N, C, ...).
    """

    def __init__(
        self,
        bn: nn.Module,
        shift: float = 1.0,
        scale: tuple[float, float] = (0.5, 2.0),
        jitter: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        low, high = (float(s) for s in scale)
        if shift < 0 or jitter < 0:
            raise ValueError(f"shift and jitter must be non-negative, got shift={shift}, jitter={jitter}")
        if not 0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.bn = bn
        self.shift, self.scale, self.jitter = float(shift), (low, high), float(jitter)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, input: Tensor) -> Tensor:
        out = self.bn(input)
        if not self.training:
            return out
        n, c = out.shape[0], out.shape[1]
        g = self.generator
        low, high = self.scale
        mu = (torch.rand(c, generator=g) * 2 - 1) * self.shift
        center = low + (high - low) * torch.rand(c, generator=g)
        s = center * (1 + self.jitter * torch.randn(n, c, generator=g))
        m = mu + self.jitter * torch.randn(n, c, generator=g)
        shape = (n, c) + (1,) * (out.dim() - 2)
        s = s.view(shape).to(device=out.device, dtype=out.dtype)
        m = m.view(shape).to(device=out.device, dtype=out.dtype)
        return s * out + m

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}, jitter={self.jitter}"


def add_noise(
    model: nn.Module,
    shift: float = 1.0,
    scale: tuple[float, float] = (0.5, 2.0),
    jitter: float = 0.1,
    seed: int = 0,
    types: tuple[type, ...] | None = None,
) -> nn.Module:
    """Wrap every BN layer of ``model`` (in place) in a :class:`NoisyBN`; returns the model.

    Each wrapper gets its own seed (``seed``, ``seed + 1``, ... in module order).

    Args:
        model: the network; a layer already wrapped is left alone.
        shift: as in :class:`NoisyBN`.
        scale: as in :class:`NoisyBN`.
        jitter: as in :class:`NoisyBN`.
        seed: the seed of the first wrapper.
        types: the classes treated as BN (default: every batch-norm layer, bnlib's or torch.nn's,
            :func:`bnlib.norm.modules.is_batch_norm`).
    """
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in parent.named_children():
            if isinstance(child, NoisyBN):
                continue
            if is_batch_norm(child) if types is None else isinstance(child, types):
                setattr(parent, name, NoisyBN(child, shift, scale, jitter, seed + count))
                count += 1
            else:
                visit(child)

    visit(model)
    if count == 0:
        raise ValueError("the model has no batch-normalization layer to make noisy")
    return model


class LpBatchNorm(nn.Module):
    r"""Batch normalization by the mean l_p deviation instead of the standard deviation.

    Per feature over the batch (dimension 0, and spatial dimensions for (N, C, H, W)):

    .. math:: \hat x = \frac{x - \mu_B}{s_p + \epsilon},\qquad
              s_p = \Big(\frac1m \sum_i |x_i - \mu_B|^p\Big)^{1/p},\quad s_\infty = \max_i |x_i - \mu_B|

    then ``y = weight * x_hat + bias``. ``p = 2`` gives the standard deviation (BN with epsilon
    moved outside the square root). Running averages of ``mu_B`` and ``s_p`` (momentum 0.1, PyTorch's
    convention) are used in evaluation mode. Gradients come from autograd.

    Args:
        num_features: number of features (channels) C.
        p: 1, 2 or ``math.inf``.
        eps: added to ``s_p``.
        momentum: weight of the new batch in the running averages.

    Shape:
        Input: (N, C) or (N, C, ...). Output: same shape as the input.
    """

    def __init__(self, num_features: int, p: float = 2.0, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if p not in (1, 2, math.inf):
            raise ValueError(f"p must be 1, 2 or math.inf, got {p}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features, self.p, self.eps, self.momentum = num_features, p, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, ...), got {tuple(input.shape)}")
        shape = (1, self.num_features) + (1,) * (input.dim() - 2)
        if self.training:
            dims = reduce_dims(input)
            if input.numel() // self.num_features < 2:
                raise ValueError(f"expected more than 1 value per channel when training, got input size {input.shape}")
            mean = input.mean(dims, keepdim=True)
            centred = input - mean
            if self.p == math.inf:
                scale = centred.abs().amax(dims, keepdim=True)
            elif self.p == 1:
                scale = centred.abs().mean(dims, keepdim=True)
            else:
                scale = centred.pow(2).mean(dims, keepdim=True).sqrt()
            running_average_(self.running_mean, mean.detach().view(-1), self.momentum)
            running_average_(self.running_scale, scale.detach().view(-1), self.momentum)
        else:
            centred, scale = input - self.running_mean.view(shape), self.running_scale.view(shape)
        x_hat = centred / (scale + self.eps)
        return torch.addcmul(self.bias.view(shape), x_hat, self.weight.view(shape))

    def extra_repr(self) -> str:
        p = "inf" if self.p == math.inf else int(self.p)
        return f"{self.num_features}, p={p}, eps={self.eps}, momentum={self.momentum}"
