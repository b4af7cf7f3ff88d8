"""Training without batch normalization: the experiments behind the alternatives chapter.

The task is the limitations chapter's small-batch comparison (MNIST digits, SGD batches of 32,
momentum 0.9, weight decay, a cosine learning rate; :func:`bnlib.lab.experiments.small_batches.fit`'s
recipe), on a *residual* fully connected network, because Fixup and normalizer-free networks are
schemes for residual networks:

- :class:`ResidualMLP` (built by :func:`residual_mlp`): a stem Linear, ``depth`` pre-activation
  residual blocks of two Linear layers each, a classifier; :data:`METHODS` names its variants
  (batch / ghost-batch / group normalization, weight standardization with group normalization,
  normalizer-free, Fixup, and none);
- :func:`unit_variance_stem_` scales a normalizer-free network's stem to unit output variance;
- :func:`fit` trains it with the recipe, optionally with adaptive gradient clipping, and
  :func:`run` returns the test error and the model;
- :func:`stream_variances` measures the variance of the residual stream block by block (a
  signal-propagation plot, Brock, De & Smith 2021).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlib import norm
from bnlib.lab.data import Split, index_batches
from bnlib.lab.experiments import small_batches
from bnlib.lab.measure import evaluate
from bnlib.lab.models import he_init_
from bnlib.norm.normalizer_free import (
    RELU_GAIN,
    NFResidual,
    ScalarBias,
    ScalarScale,
    WSLinear,
    adaptive_clip_grad_,
    fixup_init_,
    nf_betas,
)

__all__ = [
    "METHODS",
    "STEM_PROBE",
    "Residual",
    "ResidualMLP",
    "residual_mlp",
    "unit_variance_stem_",
    "fit",
    "run",
    "stream_variances",
]

#: training inputs on which :func:`run` scales a normalizer-free stem to unit output variance
STEM_PROBE = 1000

#: the variants of :func:`residual_mlp`, by name, with what each puts in the residual branches
METHODS: dict[str, str] = {
    "batch": "batch normalization before each ReLU",
    "ghost": "batch normalization over ghost batches of ghost_size examples",
    "group": "group normalization (8 groups) before each ReLU",
    "ws_group": "weight-standardized Linear layers and group normalization",
    "nf": "normalizer-free: x + alpha * f(x / beta), scaled weight standardization",
    "fixup": "Fixup: zero-initialized last layers, scaled He initialization, scalar biases",
    "none": "no normalization, He initialization",
}


class Residual(nn.Module):
    """A plain residual block, ``x + branch(x)``.

    Args:
        branch: the residual branch (shape-preserving).

    Shape:
        Input: ``(N, width)``. Output: the same.
    """

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, input: Tensor) -> Tensor:
        return input + self.branch(input)


class ResidualMLP(nn.Module):
    """Stem, residual blocks, head: ``head(blocks(stem(x)))``.

    Args:
        stem: maps the input to the residual stream.
        blocks: the residual blocks, applied in order.
        head: maps the stream to the logits.

    Shape:
        Input: ``(N, in_features)``. Output: ``(N, classes)``.
    """

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def stream(self, x: Tensor) -> list[Tensor]:
        """The residual stream entering each block and leaving the last (``depth + 1`` tensors).

        Args:
            x: a batch of inputs.
        """
        out = [self.stem(x)]
        for block in self.blocks:
            out.append(block(out[-1]))
        return out

    def forward(self, input: Tensor) -> Tensor:
        return self.head(self.stream(input)[-1])


def _branch(method: str, width: int, norm_layer) -> list[nn.Module]:
    """The layers of one pre-activation branch: [norm, ReLU, Linear] twice (Fixup: scalar biases)."""
    if method == "nf":
        ws = [WSLinear(width, width, gain=RELU_GAIN, learnable_gain=True) for _ in range(2)]
        return [nn.ReLU(), ws[0], nn.ReLU(), ws[1]]
    if method == "fixup":
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [ScalarBias(), nn.ReLU(), ScalarBias(), nn.Linear(width, width, bias=False)]
        return layers + [ScalarScale(), ScalarBias()]
    linear = WSLinear if method == "ws_group" else nn.Linear
    layers = []
    for _ in range(2):
        layers += [norm_layer(width)] if norm_layer else []
        layers += [nn.ReLU(), linear(width, width, bias=norm_layer is None)]
    return layers


def residual_mlp(
    method: str,
    *,
    sizes: tuple[int, int, int] = (784, 256, 10),
    depth: int = 4,
    alpha: float = 0.2,
    ghost_size: int = 2,
    generator: torch.Generator | None = None,
) -> ResidualMLP:
    """A residual MLP whose branches follow ``method`` (a key of :data:`METHODS`).

    Every variant: ``Linear(in, width)`` stem, ``depth`` pre-activation blocks ``x + f(x)`` with
    ``f = [norm] -> ReLU -> Linear -> [norm] -> ReLU -> Linear`` (width to width), then
    ``[norm] -> ReLU -> Linear(width, classes)``. "batch", "ghost", "group" and "ws_group" keep
    torch's default initialization; "none" uses He initialization (variance-preserving for a plain
    ReLU network); "nf" uses :class:`~bnlib.norm.normalizer_free.NFResidual` blocks with betas from
    :func:`~bnlib.norm.normalizer_free.nf_betas` and scaled weight-standardized layers with a
    learned gain per unit (starting at 1) and zero-initialized biases (the stem with gain 1 and no
    learned gain: :func:`unit_variance_stem_` rescales it on data); "fixup" applies
    :func:`~bnlib.norm.normalizer_free.fixup_init_`.

    Args:
        method: a key of :data:`METHODS`.
        sizes: input size, width of the residual stream, classes.
        depth: number of residual blocks (at least 1).
        alpha: the normalizer-free branch scale (only for "nf").
        ghost_size: examples per normalization batch (only for "ghost").
        generator: random generator for the initialization.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    n_in, width, classes = sizes
    norm_layer = {
        "batch": norm.factory("batch"),
        "ghost": norm.factory("ghost", ghost_size=ghost_size),
        "group": norm.factory("group"),
        "ws_group": norm.factory("group"),
    }.get(method)
    stem = WSLinear(n_in, width, gain=1.0) if method == "nf" else nn.Linear(n_in, width)
    if method == "nf":
        betas = nf_betas(depth + 1, alpha)
        blocks = [NFResidual(nn.Sequential(*_branch(method, width, None)), alpha, b) for b in betas[:-1]]
        head = nn.Sequential(nn.ReLU(), nn.Linear(width, classes))
    else:
        blocks = [Residual(nn.Sequential(*_branch(method, width, norm_layer))) for _ in range(depth)]
        pre = [norm_layer(width)] if norm_layer else ([ScalarBias()] if method == "fixup" else [])
        head = nn.Sequential(*pre, nn.ReLU(), nn.Linear(width, classes))
    model = ResidualMLP(stem, blocks, head)
    _initialize(model, method, generator)
    return model


def _initialize(model: ResidualMLP, method: str, generator: torch.Generator | None) -> None:
    """torch's default initialization from ``generator``; He for "none"; Fixup for "fixup"."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            if generator is None:
                layer.reset_parameters()
            else:
                _default_init(layer, generator)
    if method == "none":
        he_init_(model, generator)
    if method == "nf":  # zero biases, as in NF-ResNets: the branches start bias-free
        for layer in [model.stem, *(m for b in model.blocks for m in b.branch)]:
            if isinstance(layer, WSLinear):
                nn.init.zeros_(layer.bias)
    if method == "fixup":
        branches = [[m for m in block.branch if isinstance(m, nn.Linear)] for block in model.blocks]
        fixup_init_(branches, model.head[-1], generator)


@torch.no_grad()
def _default_init(layer: nn.Linear, generator: torch.Generator) -> None:
    """What ``nn.Linear.reset_parameters`` does, drawn from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=generator)
    if layer.bias is not None:
        bound = 1 / layer.in_features**0.5
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


@torch.no_grad()
def unit_variance_stem_(model: ResidualMLP, x: Tensor) -> float:
    """Rescale a normalizer-free network's stem (scaled weight standardization, fixed gain) so that
    its output has unit average variance on ``x``: the betas of
    :func:`~bnlib.norm.normalizer_free.nf_betas` assume a unit-variance stream entering the first
    block. A data-dependent initialization; the stem's output is linear in its gain.

    Args:
        model: a "nf" :class:`ResidualMLP`.
        x: a batch of training inputs (at least two examples).

    Returns:
        The stem's average output variance on ``x`` before rescaling.
    """
    stem = model.stem
    if not isinstance(stem, WSLinear) or stem.gain is None:
        raise ValueError("the stem must be a scaled weight-standardized layer (a 'nf' network)")
    if len(x) < 2:
        raise ValueError("need at least two examples to measure a variance")
    before = float(stem(x).double().var(dim=0, correction=0).mean())
    stem.gain = stem.gain / before**0.5
    return before


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Sequence[Tensor],
    lr: float,
    clipping: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> tuple[Tensor, float]:
    """The limitations chapter's recipe (SGD with momentum and weight decay, a cosine learning
    rate from ``lr`` to 0 over ``batches``), optionally with adaptive gradient clipping of every
    parameter but the classifier's (``model.head``).

    Args:
        model: the network.
        x, y: training inputs and class indices, on the model's device.
        batches: index batches, one update each.
        lr: the initial learning rate.
        clipping: AGC's threshold lambda (None: no clipping).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.

    Returns:
        The training losses (one per step, on the CPU) and the fraction of (unit, step) pairs that
        AGC clipped (0 without clipping).
    """
    clipped = [0]
    head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    body = [p for p in model.parameters() if id(p) not in head]
    units = sum(p.shape[0] if p.dim() > 1 else 1 for p in body)

    def clip(_: nn.Module) -> None:
        clipped[0] += adaptive_clip_grad_(body, clipping)

    losses = small_batches.fit(
        model, x, y, batches, lr, momentum=momentum, weight_decay=weight_decay,
        before_step=clip if clipping is not None else None,
    )  # fmt: skip
    return losses, clipped[0] / (units * len(batches))


def run(
    data: Split,
    method: str,
    *,
    seed: int = 0,
    batch_size: int = 32,
    epochs: int = 1,
    lr: float = 0.05,
    clipping: float | None = None,
    **model_kwargs,
) -> dict:
    """Train :func:`residual_mlp` (``method``) on ``data`` with :func:`fit`.

    The initialization depends on ``seed`` and the batch order on ``seed + 1`` only (as in
    :func:`bnlib.lab.experiments.small_batches.run`), so the methods see the same batches.

    Args:
        data: training and test set (flat inputs, on the device to train on).
        method: a key of :data:`METHODS`.
        seed: seed of the initialization and (plus 1) of the batch order.
        batch_size: examples per SGD step.
        epochs: passes over the training set.
        lr: initial learning rate.
        clipping: AGC's lambda (None: none).
        **model_kwargs: further arguments of :func:`residual_mlp`.

    A normalizer-free network's stem is rescaled to unit output variance on the first
    :data:`STEM_PROBE` training inputs (:func:`unit_variance_stem_`).

    Returns:
        A dict with the test error ``err`` (1 if training diverged), ``final_loss`` (the mean
        training loss over the last 10% of steps, nan if it diverged), ``clipped`` (the fraction
        of clipped units, :func:`fit`) and the trained ``model``.
    """
    model = residual_mlp(method, generator=torch.Generator().manual_seed(seed), **model_kwargs)
    model = model.to(data.x_train.device)
    if method == "nf":
        unit_variance_stem_(model, data.x_train[:STEM_PROBE])
    g = torch.Generator().manual_seed(seed + 1)
    batches = list(index_batches(len(data.x_train), batch_size, g, epochs=epochs, device=data.x_train.device))
    losses, clipped = fit(model, data.x_train, data.y_train, batches, lr, clipping)
    tail = losses[-max(1, len(losses) // 10) :]
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    diverged = not bool(torch.isfinite(tail).all())
    return {
        "err": 1.0 if diverged else 1.0 - accuracy,
        "final_loss": float(tail.mean()),
        "clipped": clipped,
        "model": model,
    }


@torch.no_grad()
def stream_variances(model: ResidualMLP, x: Tensor) -> list[float]:
    """The variance of the residual stream entering each block and leaving the last: each unit's
    variance over the batch, averaged over the units (Brock, De & Smith 2021's "average channel
    variance"), in training mode (batch statistics where there are any).

    Args:
        model: a :class:`ResidualMLP`.
        x: a batch of inputs (at least two examples).
    """
    if len(x) < 2:
        raise ValueError("need at least two examples to measure a variance")
    probe = copy.deepcopy(model).train()  # batch statistics, without touching the model's running ones
    return [float(h.double().var(dim=0, correction=0).mean()) for h in probe.stream(x)]
