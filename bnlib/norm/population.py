r"""Population statistics for inference: running averages, their conventions, and PreciseBN.

- Running averages (exponential moving average, EMA). PyTorch's convention puts the momentum on
  the *new* batch, :math:`r \leftarrow (1 - m)\,r + m\,\mu_B` with :math:`m = 0.1`; Keras and
  CS231n put it on the *old* value, :math:`r \leftarrow m\,r + (1 - m)\,\mu_B` with :math:`m = 0.99`
  and :math:`0.9`. :func:`convert_momentum` translates between them; :func:`ema` runs the update.
- Ioffe & Szegedy's Algorithm 2 (steps 8-10): the population mean is the average of the batch
  means and the population variance is :math:`\frac{m}{m-1}` times the average of the (biased)
  batch variances. :func:`recompute_statistics` computes exactly that with the model frozen
  ("PreciseBN", Wu & Johnson 2021) over a chosen number of training samples.
- Helpers for the train/inference pitfalls: :func:`batch_norm_layers`, :func:`freeze_batch_norm`
  and :func:`evaluate_with_batch_statistics` (training-mode normalization over groups of a chosen
  size, the *normalization* batch size, in one pass and without touching the running statistics).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bnlib.norm.functional import batch_norm as bnlib_batch_norm
from bnlib.norm.modules import BatchNormBase, is_batch_norm

__all__ = [
    "CONVENTIONS",
    "Convention",
    "batch_norm_layers",
    "convert_momentum",
    "ema",
    "evaluate_with_batch_statistics",
    "freeze_batch_norm",
    "half_life",
    "recompute_statistics",
]


@dataclass(frozen=True)
class Convention:
    """How a library names and applies the running-average momentum.

    Args:
        library: the library and the layer or function, as the book names it.
        argument: the name of its momentum argument.
        default: the momentum's default value there.
        on: ``"new"``: the momentum weighs the new batch statistic; ``"old"``: the running value.
        eps: the library's default epsilon.
        running_var: which batch variance enters the running average: ``"unbiased"`` or ``"biased"``.
    """

    library: str
    argument: str
    default: float
    on: str
    eps: float
    running_var: str


#: the conventions compared in the book, by the name :func:`convert_momentum` and :func:`ema` take
CONVENTIONS: dict[str, Convention] = {
    "pytorch": Convention("PyTorch (torch.nn.BatchNorm*d)", "momentum", 0.1, "new", 1e-5, "unbiased"),
    "keras": Convention("Keras (layers.BatchNormalization)", "momentum", 0.99, "old", 1e-3, "not compared here"),
    "cs231n": Convention("CS231n assignment (batchnorm_forward)", "momentum", 0.9, "old", 1e-5, "biased"),
}


def _convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown convention {name!r}; choose one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


def convert_momentum(value: float, source: str, target: str) -> float:
    """Express a momentum given in ``source``'s convention in ``target``'s (e.g. Keras 0.99 -> PyTorch 0.01).

    Args:
        value: the momentum, in [0, 1].
        source: the convention it is given in (a key of :data:`CONVENTIONS`).
        target: the convention to express it in.
    """
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {value}")
    on_new = value if _convention(source).on == "new" else 1.0 - value
    return on_new if _convention(target).on == "new" else 1.0 - on_new


def ema(batch_values: Iterable[Tensor | float], momentum: float, convention: str = "pytorch", start: float = 0.0):
    """Running average of ``batch_values`` under a library's convention; returns the final value.

    PyTorch: ``r = (1 - momentum) * r + momentum * v``; Keras/CS231n: ``r = momentum * r + (1 - momentum) * v``.

    Args:
        batch_values: the batch statistics, in order.
        momentum: the momentum, in ``convention``'s meaning.
        convention: a key of :data:`CONVENTIONS`.
        start: the running value before the first batch.
    """
    w_new = convert_momentum(momentum, convention, "pytorch")
    r = start
    for v in batch_values:
        r = (1.0 - w_new) * r + w_new * v
    return r


def half_life(momentum: float, convention: str = "pytorch") -> float:
    """Number of batches after which a batch's weight in the running average has halved: ln 2 / -ln(1 - w_new).

    Args:
        momentum: the momentum, in ``convention``'s meaning.
        convention: a key of :data:`CONVENTIONS`.
    """
    w_new = convert_momentum(momentum, convention, "pytorch")
    if w_new <= 0.0:
        return math.inf
    if w_new >= 1.0:
        return 0.0
    return math.log(2.0) / -math.log1p(-w_new)


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (torch's or bnlib's) inside ``model``, in order.

    Args:
        model: any module.
    """
    return [m for m in model.modules() if is_batch_norm(m)]


def _inputs(batch: Tensor | tuple | list) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recompute_statistics(model: nn.Module, batches: Iterable[Tensor | tuple], num_batches: int | None = None) -> int:
    r"""PreciseBN: replace every BN layer's running statistics by population statistics (Algorithm 2).

    With every parameter frozen, the BN layers run in training mode (batch statistics, as while
    training) and every other module in eval mode; each layer's running mean becomes the average of
    its batch means and its running variance the average of the unbiased batch variances,
    :math:`\frac{m}{m-1}\,\mathrm{E}_B[\sigma_B^2]` (a cumulative average, ``momentum=None``).
    Batches should be drawn from the training distribution with the training batch size.

    Args:
        model: the network; its train/eval modes and the BN momenta are restored afterwards.
        batches: inputs, or ``(inputs, targets)`` pairs.
        num_batches: stop after this many batches (default: all).

    Returns:
        The number of batches used.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer")
    if any(bn.running_mean is None for bn in layers):
        raise ValueError("every BN layer needs track_running_stats=True to hold population statistics")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in layers}
    backup = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(_inputs(batch))
            used += 1
    finally:
        for bn in layers:
            bn.momentum = momenta[bn]
        for m, mode in modes.items():
            m.train(mode)
    if used == 0:
        for bn, (mean, var, count) in zip(layers, backup):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        raise ValueError("no batches given: the running statistics were left unchanged")
    return used


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Put every BN layer in eval mode and stop gradients to its gamma and beta; returns ``model``.

    ``model.train()`` switches BN layers back to training mode (and back to updating their running
    statistics): call this again after every ``model.train()``.

    Args:
        model: the model, changed in place.
    """
    for bn in batch_norm_layers(model):
        bn.eval()
        for p in bn.parameters():
            p.requires_grad_(False)
    return model


def _group_statistics_forward(bn: nn.Module, size: int):
    """A forward for ``bn`` that normalizes every consecutive group of ``size`` examples by its own
    statistics, as in training, in one pass, and leaves the running statistics alone.

    The groups are moved into the channel dimension, ``(N, C, *)`` -> (size, N/size * C, positions), and
    normalized by the layer's own functional form (bnlib's for bnlib's layers, torch's for torch's)
    in training mode without running buffers, with gamma and beta repeated for every group.
    """
    norm = bnlib_batch_norm if isinstance(bn, BatchNormBase) else F.batch_norm

    def forward(x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        groups = n // size
        z = x.reshape(groups, size, c, -1).transpose(0, 1).reshape(size, groups * c, -1)
        weight = None if bn.weight is None else bn.weight.repeat(groups)
        bias = None if bn.bias is None else bn.bias.repeat(groups)
        y = norm(z, None, None, weight, bias, training=True, eps=bn.eps)
        return y.reshape(size, groups, c, -1).transpose(0, 1).reshape(x.shape)

    return forward


@torch.no_grad()
def evaluate_with_batch_statistics(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Outputs of ``model`` on ``x`` with every BN layer normalizing by the statistics of consecutive
    groups of ``batch_size`` examples (training-mode normalization), without touching the model's
    running statistics. Every other module runs in eval mode.

    The result is what feeding the groups one at a time through a copy of the model with its BN
    layers in training mode gives (up to round-off), computed in a single pass. ``batch_size=1``
    normalizes every example by its own statistics, which a BN layer can do only where it sees more
    than one value per channel (a convolutional feature map); otherwise, as in training, it raises.

    Args:
        model: the network (not changed).
        x: the inputs, ``len(x)`` a multiple of ``batch_size``.
        batch_size: examples per normalization group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(x) % batch_size:
        raise ValueError(f"len(x)={len(x)} is not a multiple of batch_size={batch_size}")
    probe = copy.deepcopy(model).eval()
    for bn in batch_norm_layers(probe):
        bn.forward = _group_statistics_forward(bn, batch_size)
    return probe(x)
