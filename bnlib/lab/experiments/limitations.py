r"""The limitations chapter's own probes, beside :mod:`~bnlib.lab.experiments.small_batches` and
:mod:`~bnlib.lab.experiments.recurrent`.

- :func:`ghost_batch_error`: the test error of a network whose batch-norm layers normalize each
  group of ``n`` test examples with that group's own statistics, as in training with ghost
  batches of ``n``: it separates what training did to a network from the mismatch between
  training-mode and inference-mode normalization (Wu & Johnson 2021).
- :class:`DetachedRenorm` and :func:`run_mlp`: the ablation of batch renormalization on
  class-sorted batches. :class:`DetachedRenorm` computes exactly what
  :class:`~bnlib.norm.renorm.BatchRenorm` computes in the forward pass but passes no gradient
  through the batch mean and variance, so the direction shared by the whole batch (on one-class
  batches, the class mean) is no longer projected out of the gradient; :func:`batch_mean_gradient`
  measures that direction's share of the cross-entropy gradient.
- :func:`batch_statistics_error`: how far the mean and variance of ghost batches of ``n`` examples
  sit from the population's, the accuracy of batch statistics as ``n`` shrinks.
- :func:`rnn_states` and :func:`readout_error`: a shared-statistics
  :class:`~bnlib.lab.experiments.recurrent.NormRNN` unrolled by hand, with batch statistics for
  its first steps and running statistics after them, to find which steps its evaluation-mode
  error comes from.
- :func:`normalized_values`: what a normalization layer hands on in training (before its affine
  map), for the explorer that moves the normalization batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlib.lab.data import Split, index_batches
from bnlib.lab.experiments.recurrent import NormRNN
from bnlib.lab.experiments.small_batches import fit
from bnlib.lab.measure import evaluate, preserved
from bnlib.lab.models import mlp
from bnlib.norm.channels import affine, in_compute_precision, to_input_precision, update_running_stats
from bnlib.norm.renorm import BatchRenorm
from bnlib.norm.taxonomy import mean_var

__all__ = [
    "DetachedRenorm",
    "batch_mean_gradient",
    "batch_statistics_error",
    "ghost_batch_error",
    "normalized_values",
    "readout_error",
    "rnn_states",
    "run_mlp",
]


@torch.no_grad()
def ghost_batch_error(model: nn.Module, x: Tensor, y: Tensor, ghost_size: int, seed: int = 0) -> float:
    """Test error with every batch-norm layer normalizing groups of ``ghost_size`` test examples by
    their own statistics (training-mode normalization), the running statistics left untouched.

    The examples are put in a random order first (so a group is a random sample), and the last
    ``len(x) % ghost_size`` examples are left out. The model's ghost-batch layers
    (:class:`~bnlib.norm.renorm.GhostBatchNorm`) must have been built with this ``ghost_size``;
    a layer without ghost batches would normalize the whole test set at once.

    Args:
        model: the trained network.
        x, y: test inputs and class indices.
        ghost_size: examples per normalization group.
        seed: seed of the random order.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    order = order[: len(x) - len(x) % ghost_size]
    with preserved(model, train=True):
        wrong = (model(x[order]).argmax(1) != y[order]).sum()
    return int(wrong) / len(order)


class DetachedRenorm(BatchRenorm):
    r"""Batch renormalization without gradient through the batch statistics: an ablation.

    The forward pass, the running averages and the clipping schedule are those of
    :class:`~bnlib.norm.renorm.BatchRenorm`. In the backward pass :math:`\mu_B` and
    :math:`\sigma_B` are constants too, so the input gradient is :math:`\gamma r / \sigma_B` times
    the output gradient, with nothing projected out: where r and d are not clipped, training
    then computes and differentiates :math:`(x - \mu)/\sigma`, normalization by the running
    averages. Evaluation is unchanged.

    Args:
        num_features: number of channels C.
        **kwargs: the other arguments of :class:`~bnlib.norm.renorm.BatchRenorm`.

    Shape:
        Input: ``(N, C, *)``, N a multiple of ``ghost_size`` when it is given. Output: same shape.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.numel() == 0 or input.dim() < 2:
            return super().forward(input)  # evaluation, and the errors, as BatchRenorm
        n, c = input.shape[:2]
        g = self.ghost_size or n
        if n % g or c != self.num_features or g * input[0, 0].numel() < 2:
            return super().forward(input)  # raises the same error
        x = in_compute_precision(input).reshape(n // g, g, c, -1)  # (groups, samples, C, positions)
        mean, var = (s.detach() for s in mean_var(x, (1, 3)))
        std_b = torch.sqrt(var + self.eps)
        scale, shift = 1.0 / std_b, -mean / std_b
        rmax, dmax = self.limits()
        if rmax > 1.0 or dmax > 0.0:
            std = torch.sqrt(self.running_var + self.eps).view(1, 1, c, 1)
            r = (std_b / std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean.view(1, 1, c, 1)) / std).clamp(-dmax, dmax)
            scale, shift = scale * r, shift * r + d
        x_hat = x * scale + shift  # linear in x: the statistics are constants
        update_running_stats(
            self.running_mean, self.running_var, mean.mean((0, 1, 3)), var.mean((0, 1, 3)), g * x.shape[3],
            self.momentum,
        )  # fmt: skip
        self.num_batches_tracked.add_(1)
        return to_input_precision(affine(x_hat.reshape(input.shape), self.weight, self.bias), input)


def batch_mean_gradient(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """How much of the cross-entropy gradient at the first normalization layer's input lies along
    the batch-mean direction, relative to its size: ``|sum_i g_i| / sum_i |g_i|`` (norms per
    example, the numerator's over the channels), for the loss of ``model`` on the batch ``(x, y)``
    in training mode (buffers restored afterwards).

    On a one-class batch the per-example gradients largely agree, so a layer with constant
    statistics passes on a large share along that direction (the one that moves the whole class).
    Batch normalization's backward pass removes the gradient's mean over the batch, so its share is
    0 up to rounding whatever the loss.

    Args:
        model: an MLP from :func:`bnlib.lab.models.mlp`: a ``Linear`` first, then the
            normalization layer.
        x: a batch of inputs (N, D).
        y: its class indices (N,).
    """
    first, captured = next(iter(model)), []

    def keep(module: nn.Module, inputs: tuple, out: Tensor) -> None:
        captured.append(out)

    hook = first.register_forward_hook(keep)
    try:
        with torch.enable_grad(), preserved(model, train=True):
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, captured[0])
    finally:
        hook.remove()
    return float(grad.sum(0).norm() / grad.norm(dim=1).sum())


@torch.no_grad()
def batch_statistics_error(activations: Tensor, ghost_size: int, seed: int = 0) -> tuple[float, float]:
    """How far the statistics of ghost batches of ``ghost_size`` examples sit from the population's.

    The rows of ``activations`` (a normalization layer's input over a data set, the population)
    are put in a random order and split into consecutive groups of ``ghost_size`` (the last
    ``N % ghost_size`` rows are left out). For every group and channel, the batch mean's distance
    from the population mean in population standard deviations, ``|mu_B - mu| / sigma``, and the
    batch variance's relative error, ``|sigma_B^2 / sigma^2 - 1|`` (biased variances, as batch
    normalization uses in training), each averaged over the groups and channels. For Gaussian
    features the first is about ``sqrt(2 / (pi n))``.

    Args:
        activations: values (N, C), N at least ``ghost_size``.
        ghost_size: examples per group, at least 2.
        seed: seed of the random order.

    Returns:
        ``(mean error, variance error)``.

    Raises:
        ValueError: ``ghost_size`` below 2 or above N, or ``activations`` not 2-D.
    """
    if activations.dim() != 2:
        raise ValueError(f"expected activations of shape (N, C), got {tuple(activations.shape)}")
    n = activations.shape[0]
    if not 2 <= ghost_size <= n:
        raise ValueError(f"ghost_size must lie in [2, {n}], got {ghost_size}")
    x = activations.double()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    groups = x[order[: n - n % ghost_size]].reshape(-1, ghost_size, x.shape[1])
    mean, var = x.mean(0), x.var(0, unbiased=False)
    mean_err = ((groups.mean(1) - mean).abs() / var.sqrt()).mean()
    var_err = (groups.var(1, unbiased=False) / var - 1).abs().mean()
    return float(mean_err), float(var_err)


def run_mlp(
    data: Split,
    layer: Callable[[int], nn.Module],
    *,
    sizes: Sequence[int],
    epochs: int,
    lr: float,
    order: str = "iid",
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[float, nn.Module]:
    """:func:`bnlib.lab.experiments.small_batches.run` with any normalization layer: the same
    initialization, batches and recipe for a seed; returns ``(test error, trained model)``.

    Args:
        data: training and test set (on the device to train on).
        layer: normalization factory, called with a channel count.
        sizes: layer sizes of the MLP.
        epochs: passes over the training set.
        lr: initial learning rate of :func:`~bnlib.lab.experiments.small_batches.fit`.
        order: "iid" or "sorted" (every batch holds one class).
        seed: seed of the initialization (``seed``) and of the batch order (``seed + 1``).
        batch_size: examples per SGD step.
    """
    if order not in ("iid", "sorted"):
        raise ValueError(f"order must be 'iid' or 'sorted', got {order!r}")
    model = mlp(list(sizes), "relu", layer, generator=torch.Generator().manual_seed(seed))
    model = model.to(data.x_train.device)
    labels = data.y_train.cpu() if order == "sorted" else None
    batches = list(
        index_batches(len(data.x_train), batch_size, torch.Generator().manual_seed(seed + 1), epochs=epochs,
                      labels=labels, device=data.x_train.device)
    )  # fmt: skip
    fit(model, data.x_train, data.y_train, batches, lr)
    return 1.0 - evaluate(model, data.x_test, data.y_test)[1], model


@torch.no_grad()
def rnn_states(rnn: NormRNN, x: Tensor, batch_steps: int = 0, batch_size: int = 100) -> Tensor:
    """The hidden states of a shared-statistics RNN (``norm="batch"``), step by step, with its
    first ``batch_steps`` steps normalized by the statistics of each batch of ``batch_size``
    sequences (as in training) and the later ones by the running statistics (as in evaluation).

    ``batch_steps=0`` is evaluation mode; ``batch_steps >= T`` is training-mode normalization
    throughout. The running statistics are not changed.

    Args:
        rnn: a trained :class:`~bnlib.lab.experiments.recurrent.NormRNN` with one shared BN layer.
        x: sequences (N, T, D).
        batch_steps: how many steps, from the first, use batch statistics.
        batch_size: sequences per batch.

    Returns:
        The hidden states, (N, T, H).
    """
    if rnn.norm_kind != "batch":
        raise ValueError(f"expected a shared-statistics RNN (norm='batch'), got {rnn.norm_kind!r}")
    bn = rnn.norms[0]
    states = []
    for xb in x.split(batch_size):
        h = xb.new_zeros(xb.shape[0], rnn.w_h.in_features)
        inputs, per_step = rnn.w_x(xb), []
        for t in range(xb.shape[1]):
            a = inputs[:, t] + rnn.w_h(h)
            mean, var = (a.mean(0), a.var(0, unbiased=False)) if t < batch_steps else (bn.running_mean, bn.running_var)
            h = torch.tanh((a - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
            per_step.append(h)
        states.append(torch.stack(per_step, 1))
    return torch.cat(states)


@torch.no_grad()
def readout_error(rnn: NormRNN, states: Tensor, y: Tensor) -> float:
    """The test error of ``rnn``'s read-out of the last of the hidden ``states`` (N, T, H).

    Args:
        rnn: the network whose read-out is used.
        states: hidden states, e.g. from :func:`rnn_states`.
        y: class indices (N,).
    """
    return float((rnn.readout(states[:, -1]).argmax(1) != y).float().mean())


@torch.no_grad()
def normalized_values(model: nn.Module, x: Tensor, layer_index: int = 0) -> Tensor:
    """What the ``layer_index``-th normalization layer of an MLP computes in training mode on the
    batch ``x``, before its affine map: (its output - beta) / gamma, one row per example.

    Args:
        model: an MLP from :func:`bnlib.lab.models.mlp` with normalization layers (modules with
            ``weight`` and ``bias`` right after a ``Linear``).
        x: the batch, in the order the layer groups it (ghost batches: consecutive examples).
        layer_index: which normalization layer (0: the first).
    """
    layers = list(model)
    norms = [m for prev, m in zip(layers, layers[1:]) if isinstance(prev, nn.Linear)]
    layer, captured = norms[layer_index], []
    hook = layer.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        with preserved(model, train=True):
            model(x)
    finally:
        hook.remove()
    return (captured[0] - layer.bias) / layer.weight
