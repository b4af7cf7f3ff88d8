"""Batches that are small or not i.i.d.: the experiments behind the limitations chapter.

- :func:`run` trains ``bnlib.lab.models.mlp`` with one normalization method (:func:`bnlib.norm.factory`)
  on i.i.d. batches or on class-sorted batches (:func:`class_sorted_batches`, every batch holds one
  class), with SGD, momentum 0.9, weight decay and a cosine learning-rate schedule, and returns
  the test error. Small normalization batches come from ghost batches (``method="ghost"`` or
  ``"renorm"`` with ``ghost_size``): the SGD batch stays the same, so the learning rate and the
  number of steps do not change with the normalization batch size.
- :func:`as_batch_norm` turns ghost-batch or renormalization layers into ordinary BN layers with
  the same parameters and running statistics (evaluation is identical), so that
  :func:`bnlib.norm.population.recompute_statistics` can recompute their population statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlib import norm
from bnlib.lab.data import Split
from bnlib.lab.measure import evaluate
from bnlib.lab.models import mlp
from bnlib.norm.modules import BatchNormBase

__all__ = ["iid_batches", "class_sorted_batches", "fit", "run", "as_batch_norm"]


def iid_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches for ``epochs`` passes over ``n`` examples, reshuffled every epoch (last partial batch dropped)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n}, got {batch_size}")
    out: list[Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out += list(perm[: n - n % batch_size].split(batch_size))
    return out


def class_sorted_batches(y: Tensor, batch_size: int, epochs: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches that each hold a single class (the extreme non-i.i.d. case), in shuffled order.

    Every epoch, each class's examples are shuffled and cut into batches of ``batch_size`` (a
    remainder is dropped), and the batches of all classes are shuffled together.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out: list[Tensor] = []
    for _ in range(epochs):
        epoch: list[Tensor] = []
        for c in torch.unique(y).tolist():
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)]
            epoch += list(idx[: len(idx) - len(idx) % batch_size].split(batch_size))
        out += [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
    return out


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Sequence[Tensor],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> Tensor:
    """SGD with momentum and weight decay over the given index ``batches``, the learning rate
    following a cosine from ``lr`` to 0 over them. Returns the training losses (one per step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(len(batches), 1))
    losses = []
    model.train()
    for idx in batches:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


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

    ``order``: "iid" (shuffled batches) or "sorted" (:func:`class_sorted_batches`). The
    initialization and the batch order depend on ``seed`` only, so methods are compared on the same
    initial weights (where shapes agree) and the same batches. Data must be on the model's device.
    """
    if order not in ("iid", "sorted"):
        raise ValueError(f"order must be 'iid' or 'sorted', got {order!r}")
    layer = None if method is None else norm.factory(method, **norm_kwargs)
    model = mlp(list(sizes), "relu", layer, generator=torch.Generator().manual_seed(seed)).to(data.x_train.device)
    g = torch.Generator().manual_seed(seed + 1)
    if order == "iid":
        batches = iid_batches(len(data.x_train), batch_size, epochs, g)
    else:
        batches = class_sorted_batches(data.y_train.cpu(), batch_size, epochs, g)
    batches = [b.to(data.x_train.device) for b in batches]
    fit(model, data.x_train, data.y_train, batches, lr)
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    return 1.0 - accuracy, model


def as_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every :class:`bnlib.norm.BatchRenorm` (and so every
    :class:`~bnlib.norm.GhostBatchNorm`) is replaced by a bnlib batch-norm layer with the same
    parameters and running statistics: evaluation is unchanged, and
    :func:`bnlib.norm.population.recompute_statistics` recognizes the new layers."""
    model = copy.deepcopy(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, norm.BatchRenorm):
            bn = BatchNormBase(module.num_features, module.eps, module.momentum, module.affine)
            bn.load_state_dict(module.state_dict())
            return bn.train(module.training)
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)
