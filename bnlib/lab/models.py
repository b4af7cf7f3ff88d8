"""Small networks the chapters train, each with a switch for the normalization layer.

``norm`` is a factory: called with a feature count it returns the layer to put between a
linear/conv layer and its activation (Ioffe & Szegedy's placement), e.g. ``bnlib.BatchNorm1d``,
``torch.nn.BatchNorm1d``, or None for no normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["mlp", "small_cnn", "he_init_", "ACTIVATIONS"]

NormFactory = Callable[[int], nn.Module]
#: the activations :func:`mlp` and :func:`small_cnn` take, by name: each maps to its ``nn.Module`` class
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    norm: NormFactory | None = None,
    init_std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A fully connected network, e.g. ``mlp([784, 100, 100, 100, 10], "sigmoid", bnlib.BatchNorm1d)``.

    Hidden layers are Linear -> norm -> activation; the last layer is a plain Linear (logits).
    With a norm layer the hidden Linear layers have no bias (BN's beta replaces it).

    Args:
        sizes: input size, hidden sizes..., output size (at least two entries).
        activation: "sigmoid", "relu", "tanh" or "identity".
        norm: normalization factory (None: no normalization).
        init_std: if given, every weight is drawn from N(0, init_std^2) and biases start at 0
            (the Gaussian initialization of Ioffe & Szegedy's MNIST network); otherwise torch's default.
        generator: random generator for the initialization (reproducible without global seeding).
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes needs an input and an output size, all positive, got {list(sizes)}")
    _activation(activation)  # reject an unknown name even when there is no hidden layer
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        linear = nn.Linear(fan_in, fan_out, bias=last or norm is None)
        _init(linear, init_std, generator)
        layers.append(linear)
        if not last:
            if norm is not None:
                layers.append(norm(fan_out))
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32),
    image_size: int = 28,
    norm: NormFactory | None = None,
    activation: str = "relu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Conv(3x3) -> norm -> activation -> MaxPool(2) per stage, then global average pooling and a Linear.

    With a norm layer the convolutions have no bias (it would be cancelled by the mean subtraction).

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the last layer (logits).
        channels: output channels of each stage.
        image_size: height and width of the input (at least 2 ** number of stages).
        norm: normalization factory, called with the channel count, e.g. ``bnlib.BatchNorm2d``
            (None: no normalization).
        activation: "sigmoid", "relu", "tanh" or "identity".
        generator: random generator for the initialization (torch's default distributions).
    """
    if image_size < 2 ** len(channels):
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling stages")
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in channels:
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=norm is None)
        _init(conv, None, generator)
        layers += [conv] + ([norm(c_out)] if norm is not None else []) + [_activation(activation), nn.MaxPool2d(2)]
        c_in = c_out
    head = nn.Linear(c_in, num_classes)
    _init(head, None, generator)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), head]
    return nn.Sequential(*layers)


@torch.no_grad()
def he_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """He (Kaiming) initialization in place: every Linear/Conv weight from N(0, 2 / fan_in), biases 0.

    The variance that keeps the scale of ReLU activations constant from layer to layer (He et al.
    2015); fan_in counts the inputs of one output unit. Returns the model.

    Args:
        model: the model whose Linear and Conv1d/2d/3d layers are initialized.
        generator: random generator for the weights.
    """
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return model


def _init(layer: nn.Linear | nn.Conv2d, std: float | None, generator: torch.Generator | None) -> None:
    """Gaussian N(0, std^2) weights and zero bias, or (std None) torch's default initialization."""
    if std is not None:
        nn.init.normal_(layer.weight, 0.0, std, generator=generator)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    else:  # what torch's reset_parameters does, from the given generator
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
