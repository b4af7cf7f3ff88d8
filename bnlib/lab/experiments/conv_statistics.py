"""Per-channel statistics in conv nets: the experiments behind the chapter of that name.

- :class:`PerPositionBatchNorm2d` normalizes every channel *and position* of an ``(N, C, H, W)``
  tensor over the batch only (``N`` values per statistic, as a fully connected BN on the flattened
  feature map would), with the same per-channel ``gamma`` and ``beta`` as ``BatchNorm2d``: the two
  differ only in which values share a mean and a variance.
- :func:`small_cnn` builds ``bnlib.lab.models.small_cnn`` with either kind of statistics from the
  same initial weights; :func:`train_cnn` trains it on :func:`half_size_digits` (the chapter's recipe)
  and :func:`recompute_statistics` replaces its running averages by population statistics.
- :func:`effective_fraction` computes, in closed form, how many independent values the ``N * H * W``
  values behind a channel's batch mean are worth, :func:`effective_sizes` for every layer of a network;
  :func:`norm_inputs` collects what the normalization layers see, and :func:`drawn_batch_statistics`
  draws random batches from it and returns their per-channel statistics against the population's.
- :func:`shift_images` and :func:`shifted_accuracy` evaluate on translated digits,
  :func:`with_variance_floor` removes the amplification at positions that never vary;
  :func:`equivariance_error` compares "shift, then map" with "map, then shift".
- :func:`with_conv_bias` and :func:`conv_bias_runs` train a network beside a copy whose
  convolutions have random biases (the bias before BN is dead weight).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from bnlib.lab import models
from bnlib.lab.data import Split
from bnlib.lab.training import train
from bnlib.norm import functional as F
from bnlib.norm.channels import affine
from bnlib.norm.modules import BatchNorm2d

__all__ = [
    "PerPositionBatchNorm2d",
    "STATISTICS",
    "small_cnn",
    "half_size_digits",
    "train_cnn",
    "recompute_statistics",
    "norm_inputs",
    "effective_fraction",
    "effective_sizes",
    "drawn_batch_statistics",
    "with_variance_floor",
    "shift_images",
    "shifted_accuracy",
    "equivariance_error",
    "with_conv_bias",
    "conv_bias_runs",
]

#: the kinds of statistics :func:`small_cnn` builds: per channel (``BatchNorm2d``) or per channel and position
STATISTICS = ("per channel", "per position")


class PerPositionBatchNorm2d(nn.Module):
    r"""Batch normalization with one mean and variance per channel *and position*, over the batch only.

    .. math::  y_{n,c,h,w} = \gamma_c \frac{x_{n,c,h,w} - \mu_{c,h,w}}{\sqrt{\sigma^2_{c,h,w} + \epsilon}} + \beta_c,
               \qquad \mu_{c,h,w} = \frac{1}{N}\sum_n x_{n,c,h,w}

    (:math:`\sigma^2` the biased variance over the same ``N`` values). It is ``BatchNorm1d`` on the
    ``(N, C*H*W)`` flattened input followed by a per-channel affine map, so training and evaluation
    follow ``bnlib.BatchNorm1d``: running averages with ``momentum`` (``None``: cumulative average)
    of the mean and the unbiased variance, used in evaluation mode.

    Args:
        num_features: number of channels C.
        height: height H of the input.
        width: width W of the input.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch in the running averages; ``None`` for a cumulative average.
            Default: 0.1.

    Shape:
        - Input: :math:`(N, C, H, W)`, ``N >= 2`` in training.
        - Output: :math:`(N, C, H, W)`, same shape as the input.
        - Buffers ``running_mean``, ``running_var``: :math:`(C, H, W)`; parameters ``weight``, ``bias``: :math:`(C,)`.
    """

    def __init__(
        self, num_features: int, height: int, width: int, eps: float = 1e-5, momentum: float | None = 0.1
    ) -> None:
        super().__init__()
        if min(num_features, height, width) < 1:
            raise ValueError(f"need positive sizes, got C={num_features}, H={height}, W={width}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features, height, width))
        self.register_buffer("running_var", torch.ones(num_features, height, width))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != self.running_mean.shape:
            raise ValueError(f"expected (N, {', '.join(map(str, self.running_mean.shape))}), got {tuple(x.shape)}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        flat = F.batch_norm(
            x.flatten(1), self.running_mean.view(-1), self.running_var.view(-1),
            training=self.training, momentum=momentum, eps=self.eps,
        )  # fmt: skip
        return affine(flat.view_as(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        c, h, w = self.running_mean.shape
        return f"{c}, height={h}, width={w}, eps={self.eps}, momentum={self.momentum}"


def small_cnn(
    statistics: str, seed: int, channels: Sequence[int] = (8, 16, 32), image_size: int = 28
) -> nn.Sequential:
    """``bnlib.lab.models.small_cnn`` with per-channel BN (``bnlib.BatchNorm2d``) or per-position BN
    (:class:`PerPositionBatchNorm2d`) after every convolution; the same ``seed`` gives the same weights.

    Args:
        statistics: ``"per channel"`` or ``"per position"``.
        seed: seed of the initialization.
        channels: output channels of each stage (each stage halves the height and width).
        image_size: height and width of the input images.
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    net = models.small_cnn(
        channels=channels, image_size=image_size, norm=BatchNorm2d,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    if statistics == "per position":
        stage = 0
        for i, layer in enumerate(net):
            if isinstance(layer, BatchNorm2d):
                size = image_size // 2**stage
                net[i] = PerPositionBatchNorm2d(layer.num_features, size, size)
                stage += 1
    return net


def half_size_digits(digits: Split) -> Split:
    """28x28 digits average-pooled to 14x14 and padded with one row and column of 0 on every side: 16x16.

    Sixteen halves evenly through the three pooling stages of :func:`small_cnn` (16, 8, 4, 2), so no
    pooling window drops a border row; the quarter-size images make training four times cheaper.

    Args:
        digits: images ``(N, 1, 28, 28)`` with a background of 0, e.g. ``mnist_5k(images=True)``.
    """

    def half(x: Tensor) -> Tensor:
        return tnf.pad(tnf.avg_pool2d(x, 2), (1, 1, 1, 1))

    return Split(half(digits.x_train), digits.y_train, half(digits.x_test), digits.y_test)


def train_cnn(
    statistics: str, digits: Split, seed: int, steps: int, device: torch.device | str | None = None
) -> nn.Sequential:
    """:func:`small_cnn` for ``digits`` trained with the chapter's recipe: SGD, learning rate 0.1,
    momentum 0.9, batches of 32, initialization and batch order from ``seed``; then the population
    statistics are recomputed over the training images (:func:`recompute_statistics`).

    Args:
        statistics: ``"per channel"`` or ``"per position"``.
        digits: square training images and labels.
        seed: seed of the initialization and of the batch order.
        steps: SGD steps.
        device: where to train (default: the CPU).
    """
    net = small_cnn(statistics, seed, image_size=digits.x_train.shape[-1]).to(device or "cpu")
    optimizer = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    train(net, digits.x_train, digits.y_train, steps=steps, batch_size=32, optimizer=optimizer, seed=seed)
    recompute_statistics(net, digits.x_train.to(device or "cpu"), batch_size=32)
    return net.eval()


@torch.no_grad()
def recompute_statistics(model: nn.Module, x: Tensor, batch_size: int) -> None:
    """Replace the running statistics of every normalization layer by population statistics: the
    average over consecutive batches of ``x`` of the batch means and unbiased batch variances
    (Ioffe & Szegedy's Algorithm 2, with the weights frozen). Leaves the model in evaluation mode.

    The running averages of training (momentum 0.1) rest on the last few dozen batches and lag the
    weights; with per-position statistics, whose every estimate rests on ``batch_size`` values, that
    noise alone can change the test accuracy considerably. The population statistics remove it
    for both kinds of layer alike.

    Args:
        model: a network with ``bnlib.BatchNorm2d`` or :class:`PerPositionBatchNorm2d` layers.
        x: the training inputs (a last incomplete batch is left out).
        batch_size: examples per batch, as in training.
    """
    layers = [m for m in model.modules() if isinstance(m, (BatchNorm2d, PerPositionBatchNorm2d))]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.running_mean.zero_(), m.running_var.fill_(1), m.num_batches_tracked.zero_()
        m.momentum = None  # a cumulative average
    model.train()
    try:
        for start in range(0, len(x) - batch_size + 1, batch_size):
            model(x[start : start + batch_size])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


@torch.no_grad()
def norm_inputs(model: nn.Module, x: Tensor, chunk: int = 500) -> list[Tensor]:
    """What every normalization layer of ``model`` receives for the inputs ``x``, in evaluation mode.

    Evaluation mode makes each example's activations independent of the others (each layer below is
    normalized with its running statistics), so the result is a population of per-example feature
    maps to draw batches from.

    Args:
        model: a network with ``bnlib.BatchNorm2d`` or :class:`PerPositionBatchNorm2d` layers.
        x: the inputs, ``(P, ...)``.
        chunk: examples per forward pass (memory).

    Returns:
        One ``(P, C, H, W)`` tensor per normalization layer, in the order of the forward pass.
    """
    layers = [m for m in model.modules() if isinstance(m, (BatchNorm2d, PerPositionBatchNorm2d))]
    seen: list[list[Tensor]] = [[] for _ in layers]
    hooks = [m.register_forward_hook(lambda _m, inp, _out, k=k: seen[k].append(inp[0])) for k, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), chunk):
            model(x[start : start + chunk])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in seen]


def effective_fraction(features: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    r"""What a channel's batch mean over ``N * H * W`` values is worth, in closed form.

    The batch mean of channel c is the average of the N examples' own channel means :math:`m_i`,
    so over batches of N independent examples its variance is :math:`\mathrm{Var}_i(m_i) / N`
    exactly (no sampling needed). The baseline is the within-position variance
    :math:`v_c = \mathrm{mean}_{h,w} \mathrm{Var}_i(x_{i,c,h,w})`: values independent across
    positions and examples, with these variances, would give the batch mean the variance
    :math:`v_c / (N H W)`. The effective number of values is
    :math:`m'_{\text{eff}} = N v_c / \mathrm{Var}_i(m_i)`, and the fraction returned is that over
    :math:`N H W` (1 for independent positions, smaller when positions are positively correlated,
    :math:`1 / (H W)` for maps constant over positions; it does not depend on N). The pooled
    variance :math:`\sigma_c^2` over all positions is not the baseline: it also contains the
    variation of the mean map from position to position, which never enters the batch mean.

    Args:
        features: the population, ``(P, C, H, W)`` (e.g. from :func:`norm_inputs`).
        batch_size: examples per batch, N.

    Returns:
        ``(fraction, noise)``, both ``(C,)``: :math:`m'_{\text{eff}} / (N H W)`, and the standard
        deviation of the batch mean across batches in units of the pooled standard deviation
        :math:`\sigma_c` that BN divides by, :math:`\sqrt{\mathrm{Var}_i(m_i) / N} / \sigma_c`.
    """
    features = features.double()
    _, c, h, w = features.shape
    between = features.mean(dim=(2, 3)).var(dim=0, correction=0)  # (C,): Var_i(m_i)
    within = features.var(dim=0, correction=0).mean(dim=(1, 2))  # (C,): mean_pos Var_i
    pooled = features.transpose(0, 1).reshape(c, -1).var(dim=1, correction=0)  # sigma_c^2
    fraction = within / (h * w * between)
    noise = (between / batch_size / pooled).sqrt()
    return fraction.float().cpu(), noise.float().cpu()


def effective_sizes(model: nn.Module, x: Tensor, batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    r""":func:`effective_fraction` for every normalization layer of ``model``, summarized over channels.

    Args:
        model: a network with ``bnlib.BatchNorm2d`` layers.
        x: the population of inputs (batches of independent examples drawn from it).
        batch_sizes: the batch sizes N.

    Returns:
        A list with a dict for each layer, holding ``"side"`` (H = W) and, per N in ``batch_sizes``
        (keys ``(name, N)``),
        ``"values"``, N·H·W; ``"effective"``, the median over channels of :math:`m'_{\text{eff}}`;
        ``"smallest"``, the smallest over channels; ``"noise"``, the median over channels of the
        batch mean's standard deviation in units of :math:`\sigma_c`.
    """
    layers = []
    for features in norm_inputs(model, x):
        h, w = features.shape[-2:]
        layer: dict[str, Any] = {"side": h}
        for n in batch_sizes:
            fraction, noise = effective_fraction(features, n)
            layer["values", n] = n * h * w
            layer["effective", n] = fraction.median().item() * n * h * w
            layer["smallest", n] = fraction.min().item() * n * h * w
            layer["noise", n] = noise.median().item()
        layers.append(layer)
    return layers


def drawn_batch_statistics(
    features: Tensor, batch_size: int, batches: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    r"""Per-channel statistics of random batches drawn from a population, against the population's.

    Each batch is ``batch_size`` distinct examples of ``features``, drawn at random; its statistics
    are those a per-channel BN layer computes in training, over the batch's ``N * H * W`` values.
    Both are returned in units of the population's :math:`\sigma_c`, the standard deviation BN
    divides by, so they say how far a batch's normalization is off.

    Args:
        features: the population, ``(P, C, H, W)`` (e.g. from :func:`norm_inputs`), ``P >= batch_size``.
        batch_size: examples per batch, N.
        batches: how many batches to draw.
        generator: random generator of the draws.

    Returns:
        ``(mean_shift, std_ratio)``, both ``(batches, C)``: :math:`(\mu_\mathcal{B} - \mu_c)/\sigma_c`
        and :math:`\sigma_\mathcal{B}/\sigma_c`, with :math:`\mu_c, \sigma_c^2` the mean and the
        biased variance of channel c over the whole population (and :math:`\sigma_\mathcal{B}^2`
        biased too, as BN computes it).
    """
    population, c = features.shape[0], features.shape[1]
    if not 1 <= batch_size <= population:
        raise ValueError(f"batch_size must be between 1 and {population}, got {batch_size}")
    values = features.double().transpose(0, 1).reshape(c, -1)  # (C, P*H*W)
    mean = values.mean(dim=1)
    sigma = values.var(dim=1, correction=0).sqrt()
    centred = features.double() - mean.view(1, c, 1, 1)  # centred first: no cancellation below
    first, second = centred.mean(dim=(2, 3)), centred.pow(2).mean(dim=(2, 3))  # (P, C) each
    picks = torch.stack([torch.randperm(population, generator=generator)[:batch_size] for _ in range(batches)])
    shift = first[picks].mean(dim=1)  # (batches, C): the batch mean, minus the population's
    variance = (second[picks].mean(dim=1) - shift**2).clamp(min=0)
    return (shift / sigma).float().cpu(), (variance.sqrt() / sigma).float().cpu()


def with_variance_floor(model: nn.Module, floor: float) -> nn.Module:
    r"""A copy of ``model`` whose per-position running variances are raised to at least ``floor``.

    A control for evaluation: positions that never vary in training (a blank border) have running
    variances near 0, and a value moved there at test time is multiplied by about
    :math:`1/\sqrt{\epsilon}`. The floor removes that amplification and changes nothing at positions
    that do vary.

    Args:
        model: a network with :class:`PerPositionBatchNorm2d` layers.
        floor: the smallest running variance kept.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PerPositionBatchNorm2d):
                m.running_var.clamp_(min=floor)
    return model


def shift_images(x: Tensor, dy: int, dx: int) -> Tensor:
    """Images moved by ``dy`` rows down and ``dx`` columns right; what enters at the border is 0.

    Args:
        x: images ``(N, C, H, W)`` with a background of 0.
        dy: rows to move (negative: up).
        dx: columns to move (negative: left).
    """
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@torch.no_grad()
def shifted_accuracy(model: nn.Module, x: Tensor, y: Tensor, pixels: int) -> float:
    """Accuracy in evaluation mode on ``x`` moved by ``pixels`` up, down, left and right (the mean of the four).

    Args:
        model: the classifier (put in evaluation mode).
        x: test images ``(N, C, H, W)`` with a background of 0.
        y: their class indices.
        pixels: how far to move them (0: the images as they are).
    """
    model.eval()
    moves = [(0, 0)] if pixels == 0 else [(pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)]
    hits = [(model(shift_images(x, dy, dx)).argmax(1) == y).float().mean().item() for dy, dx in moves]
    return float(np.mean(hits))


@torch.no_grad()
def equivariance_error(fn: Callable[[Tensor], Tensor], x: Tensor, shift: Callable[[Tensor], Tensor]) -> float:
    r""":math:`\|f(\mathrm{shift}\,x) - \mathrm{shift}\,f(x)\| / \|\mathrm{shift}\,f(x)\|`: 0 for an equivariant ``fn``.

    Args:
        fn: the map, from images to feature maps of the same height and width.
        x: the inputs.
        shift: the translation, applied to inputs and to outputs.
    """
    after = shift(fn(x))
    return ((fn(shift(x)) - after).norm() / after.norm()).item()


def with_conv_bias(net: nn.Sequential, generator: torch.Generator) -> nn.Sequential:
    """A copy of ``net`` whose convolutions get random biases from U(-0.5, 0.5), everything else equal.

    Args:
        net: a ``bnlib.lab.models.small_cnn`` built with a normalization layer (convolutions without bias).
        generator: random generator of the biases.
    """
    net = copy.deepcopy(net)
    for i, layer in enumerate(net):
        if isinstance(layer, nn.Conv2d):
            biased = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding, bias=True
            ).to(layer.weight)
            with torch.no_grad():
                biased.weight.copy_(layer.weight)
                biased.bias.copy_(torch.rand(layer.out_channels, generator=generator) - 0.5)
            net[i] = biased
    return net


def conv_bias_runs(
    net: nn.Sequential,
    x: Tensor,
    y: Tensor,
    steps: int,
    seed: int,
    optimizer: Callable,
    momentum: float = 0.1,
) -> dict[str, float]:
    """Train ``net`` and a copy with random conv biases (:func:`with_conv_bias`) from the same weights on
    the same batches, and compare.

    Args:
        net: a ``bnlib.lab.models.small_cnn`` with BN layers (convolutions without bias), in float64
            so that the comparison rests far above round-off.
        x, y: training inputs (same dtype as ``net``) and class indices.
        steps: SGD steps of batch 64.
        seed: seed of the batch order and of the biases.
        optimizer: factory called with the parameters.
        momentum: the first BN layer's running-average momentum (bnlib's default 0.1).

    Returns:
        ``"bias moved"``: the largest change of any conv bias; ``"loss gap"``: the largest difference
        between the two training-loss curves; ``"running-mean gap"``: the largest difference between the
        running-mean shift of the BN layer after the first convolution and the prediction
        :math:`b_c (1 - (1 - momentum)^T)` (NaN when no BN layer follows it).
    """
    biased = with_conv_bias(net, torch.Generator().manual_seed(10_000 + seed))
    start = [m.bias.detach().clone() for m in _convs(biased)]
    loss = [train(m, x, y, steps=steps, batch_size=64, optimizer=optimizer, seed=seed).train_loss
            for m in (net, biased)]  # fmt: skip
    moved = max((m.bias.detach() - b0).abs().max().item() for m, b0 in zip(_convs(biased), start))
    after = next(i for i, m in enumerate(net) if isinstance(m, nn.Conv2d)) + 1  # the first conv's BN
    gap = float("nan")
    if isinstance(net[after], BatchNorm2d):
        shift = biased[after].running_mean - net[after].running_mean
        gap = (shift - start[0] * (1 - (1 - momentum) ** steps)).abs().max().item()
    return {"bias moved": moved, "loss gap": float(np.abs(loss[1] - loss[0]).max()), "running-mean gap": gap}


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]
