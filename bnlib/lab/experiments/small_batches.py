"""Batches that are small or not i.i.d.: the experiments behind the limitations chapter.

- :func:`run` trains ``bnlib.lab.models.mlp`` with one normalization method (:func:`bnlib.norm.factory`)
  on i.i.d. batches or on class-sorted batches (every batch holds one class; both from
  :func:`bnlib.lab.data.index_batches`), with :func:`fit` (SGD, momentum 0.9, weight decay and a
  cosine learning-rate schedule, on :func:`bnlib.lab.training.train`), and returns the test error.
  Small normalization batches come from ghost batches (``method="ghost"`` or ``"renorm"`` with
  ``ghost_size``): the SGD batch stays the same, so the learning rate and the number of steps do
  not change with the normalization batch size.
- :func:`as_batch_norm` turns ghost-batch or renormalization layers into ordinary BN layers with
  the same parameters and running statistics (evaluation is identical), so that
  :func:`bnlib.norm.population.recompute_statistics` can recompute their population statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlib import norm
from bnlib.lab.data import Split, index_batches
from bnlib.lab.measure import evaluate
from bnlib.lab.models import mlp
from bnlib.lab.training import train
from bnlib.norm.modules import BatchNormBase

__all__ = ["fit", "run", "as_batch_norm"]


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Sequence[Tensor],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    before_step: Callable[[nn.Module], None] | None = None,
) -> Tensor:
    """The chapter's recipe on :func:`bnlib.lab.training.train`: SGD with momentum and weight decay over
    the given index ``batches``, the learning rate following a cosine from ``lr`` to 0 over them.

    Args:
        model: the network (in training mode while it trains).
        x, y: training inputs and class indices, on the model's device.
        batches: index batches, one update each, e.g. from :func:`bnlib.lab.data.index_batches`.
        lr: the initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        before_step: called with the model after each backward pass, before the update (e.g.
            gradient clipping); None for none.

    Returns:
        The training losses, one per step (on the CPU).
    """
    history = train(
        model, x, y, batches=batches,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(len(batches), 1)),
        before_step=before_step,
    )  # fmt: skip
    return torch.from_numpy(history.train_loss)


def run(
    data: Split,
    method: str | None,
    *,
    sizes: Sequence[int] = (784, 256, 256, 256, 10),
    batch_size: int = 32,
    epochs: int = 2,
    lr: float = 0.05,
    order: str = "iid",
    seed: int = 0,
    **norm_kwargs,
) -> tuple[float, nn.Module]:
    """Train an MLP with normalization ``method`` (see :func:`bnlib.norm.factory`; None: none) and
    return ``(test error, trained model)``.

    The initialization and the batch order depend on ``seed`` only, so methods are compared on the
    same initial weights (where shapes agree) and the same batches.

    Args:
        data: training and test set (on the device to train on).
        method: a method of :func:`bnlib.norm.factory`, or None for no normalization.
        sizes: layer sizes of the MLP.
        batch_size: examples per SGD step.
        epochs: passes over the training set.
        lr: initial learning rate of :func:`fit`.
        order: "iid" (shuffled batches) or "sorted" (class-sorted: every batch holds one class,
            :func:`bnlib.lab.data.index_batches` with labels).
        seed: seed of the initialization (``seed``) and of the batch order (``seed + 1``).
        **norm_kwargs: further arguments of :func:`bnlib.norm.factory`.
    """
    if order not in ("iid", "sorted"):
        raise ValueError(f"order must be 'iid' or 'sorted', got {order!r}")
    layer = None if method is None else norm.factory(method, **norm_kwargs)
    model = mlp(list(sizes), "relu", layer, generator=torch.Generator().manual_seed(seed)).to(data.x_train.device)
    g = torch.Generator().manual_seed(seed + 1)
    labels = data.y_train.cpu() if order == "sorted" else None
    batches = list(index_batches(len(data.x_train), batch_size, g, epochs=epochs, labels=labels,
                                 device=data.x_train.device))  # fmt: skip
    fit(model, data.x_train, data.y_train, batches, lr)
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    return 1.0 - accuracy, model


def as_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every :class:`bnlib.norm.renorm.BatchRenorm` (and so every
    :class:`~bnlib.norm.renorm.GhostBatchNorm`) is replaced by a bnlib batch-norm layer with the same
    parameters and running statistics, on the same device and in the same precision: evaluation
    is unchanged, and
    :func:`bnlib.norm.population.recompute_statistics` recognizes the new layers.

    Args:
        model: the network; it is not changed.
    """
    model = copy.deepcopy(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, norm.BatchRenorm):
            bn = BatchNormBase(module.num_features, module.eps, module.momentum, module.affine)
            like = next(iter(module.state_dict().values()), None)  # on the layer's device and dtype
            if like is not None:
                bn.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
            bn.load_state_dict(module.state_dict())
            return bn.train(module.training)
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)
