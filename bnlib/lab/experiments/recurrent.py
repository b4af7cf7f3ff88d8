r"""Normalization inside a recurrent network: where batch normalization fits badly and layer normalization does not.

A tanh RNN reads an image row by row (a sequence of T rows of W pixels) and classifies it from its
last hidden state. The pre-activation is normalized at every step,

.. math:: h_t = \tanh\big(\mathrm{norm}_t(W_x x_t + W_h h_{t-1})\big),

with ``norm`` one of (Ba et al. 2016 normalize the same summed inputs):

- ``"none"``: an ordinary bias;
- ``"batch"``: one BatchNorm1d shared by all steps (the naive code): in training each step is
  normalized with its own batch statistics, but the running averages mix every step;
- ``"batch_per_step"``: one BatchNorm1d per step (Cooijmans et al. 2017); steps beyond the longest
  training sequence reuse the last step's layer and statistics;
- ``"layer"``: LayerNorm over the hidden units, the same at every step and for any length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bnlib.lab.data import index_batches
from bnlib.lab.measure import preserved
from bnlib.lab.training import train
from bnlib.norm import LayerNorm
from bnlib.norm.modules import BatchNorm1d

__all__ = ["NORMS", "rows_as_sequences", "prepend_blank", "NormRNN", "train_rnn", "error_rate", "real_per_step"]

#: the values of :class:`NormRNN`'s ``norm`` argument
NORMS = ("none", "batch", "batch_per_step", "layer")


def rows_as_sequences(images: Tensor, pool: int = 1) -> Tensor:
    """(N, 1, H, W) images -> (N, T, W') sequences of rows, after ``pool`` x ``pool`` average pooling.

    Args:
        images: (N, 1, H, W) images.
        pool: the side of the average-pooling window (1: no pooling).
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W) images, got shape {tuple(images.shape)}")
    if pool > 1:
        images = nn.functional.avg_pool2d(images, pool)
    return images[:, 0]


def prepend_blank(x: Tensor, steps: int, value: float = 0.0) -> Tensor:
    """Sequences (N, T, D) with ``steps`` constant rows (blank image rows) put in front: length T + steps.

    Args:
        x: sequences (N, T, D).
        steps: how many rows to put in front.
        value: the value of every entry of those rows.
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    return torch.cat([x.new_full((x.shape[0], steps, x.shape[2]), value), x], dim=1)


class NormRNN(nn.Module):
    """A one-layer tanh RNN with a normalized pre-activation and a linear read-out of the last state.

    Args:
        input_size: features per step D.
        hidden_size: hidden units H.
        num_classes: outputs of the read-out.
        norm: one of :data:`NORMS`.
        max_steps: number of per-step layers for ``"batch_per_step"`` (the training length).
        generator: random generator for the initialization.
        batch_norm: the batch-normalization layer for ``"batch"`` and ``"batch_per_step"``, called with
            the number of hidden units (default ``bnlib.BatchNorm1d``; ``torch.nn.BatchNorm1d``
            computes the same to float rounding and costs less per call at small sizes).
        layer_norm: the layer-normalization layer for ``"layer"``, likewise (default
            ``bnlib.norm.LayerNorm``; or ``torch.nn.LayerNorm``).

    Shape:
        Input: (N, T, D) sequences of T steps of D features. Output: (N, num_classes) logits.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        norm: str = "none",
        max_steps: int = 28,
        generator: torch.Generator | None = None,
        batch_norm: Callable[[int], nn.Module] = BatchNorm1d,
        layer_norm: Callable[[int], nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        self.norm_kind = norm
        self.w_x = nn.Linear(input_size, hidden_size, bias=norm == "none")
        self.w_h = nn.Linear(hidden_size, hidden_size, bias=False)
        self.readout = nn.Linear(hidden_size, num_classes)
        with torch.no_grad():
            for layer in (self.w_x, self.w_h, self.readout):
                bound = layer.in_features**-0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
        if norm == "batch":
            self.norms = nn.ModuleList([batch_norm(hidden_size)])
        elif norm == "batch_per_step":
            self.norms = nn.ModuleList([batch_norm(hidden_size) for _ in range(max_steps)])
        elif norm == "layer":
            self.norms = nn.ModuleList([layer_norm(hidden_size)])
        else:
            self.norms = nn.ModuleList()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected (N, T, D) sequences, got shape {tuple(x.shape)}")
        h = x.new_zeros(x.shape[0], self.w_h.in_features)
        inputs = self.w_x(x)  # (N, T, H): the input part of every step in one product
        for t in range(x.shape[1]):
            a = inputs[:, t] + self.w_h(h)
            if self.norms:
                a = self.norms[min(t, len(self.norms) - 1)](a)
            h = torch.tanh(a)
        return self.readout(h)


def train_rnn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    clip: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """The chapter's recipe on :func:`bnlib.lab.training.train`: Adam with gradient-norm clipping on
    shuffled batches (:func:`bnlib.lab.data.index_batches`, the last partial batch of an epoch dropped).

    Args:
        model: the network, on the device of ``x``.
        x, y: sequences (N, T, D) and class indices.
        epochs: passes over the data.
        batch_size: sequences per step.
        lr: Adam's learning rate.
        clip: largest gradient norm (over all parameters together).
        seed: seed of the batch order.

    Returns:
        The training losses, one per step (on the CPU).
    """
    order = index_batches(len(x), batch_size, torch.Generator().manual_seed(seed), epochs=epochs, device=x.device)
    history = train(
        model, x, y, batches=order, optimizer=lambda p: torch.optim.Adam(p, lr=lr),
        before_step=lambda m: nn.utils.clip_grad_norm_(m.parameters(), clip),
    )  # fmt: skip
    return torch.from_numpy(history.train_loss)


@torch.no_grad()
def error_rate(model: nn.Module, x: Tensor, y: Tensor, batch_statistics: bool = False, batch_size: int = 100) -> float:
    """Test error in eval mode, or (``batch_statistics``) with every BN layer normalizing by the
    statistics of the test batch (training-mode normalization), running statistics left untouched.

    Args:
        model: the network.
        x, y: test sequences and class indices.
        batch_statistics: evaluate in training mode, each batch of ``batch_size`` normalized by itself.
        batch_size: sequences per forward pass.
    """
    with preserved(model, train=batch_statistics):
        wrong = sum(int((model(xb).argmax(1) != yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return wrong / len(x)


def real_per_step(lengths: Tensor, steps: int) -> Tensor:
    """How many sequences of a batch with these ``lengths`` are still running at each step 0..steps-1:
    the number of real (unpadded) values a per-step batch statistic at that step could use.

    Args:
        lengths: the length of each sequence of the batch, (N,).
        steps: the number of steps to count.
    """
    return (lengths.view(-1, 1) > torch.arange(steps).view(1, -1)).sum(0)
