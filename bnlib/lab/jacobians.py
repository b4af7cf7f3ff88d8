r"""Layer-to-layer Jacobians of a network and their singular values: how gradients pass from layer to layer.

A network is cut into pieces, ``h_{l+1} = piece_l(h_l)`` (:func:`split_at`: before every module of
a given type, e.g. before every ReLU, so that ``h_l`` are the pre-activations, the normalized
values in a batch-normalized network). Backpropagation multiplies the gradient at ``h_{l+1}`` by
the transposed Jacobian of the piece. Which Jacobian that is depends on batch normalization.

**The whole batch.** In training mode a BN layer normalizes every example with the mean and
variance of the whole mini-batch, so each example's output depends on every example's input. The
derivative that carries the gradient back is then the Jacobian of the whole batch's output with
respect to the whole batch's input (:func:`batch_jacobian`)::

    J = d vec(H_{l+1}) / d vec(H_l),   (m d_{l+1}) x (m d_l),   dL/dH_l = J^T dL/dH_{l+1}

for a batch ``H_l`` of m examples (rows ordered example by example). This is the one that
propagates gradients during training, and the one to measure.

**One example at a time.** Without batch statistics (no BN, or BN in evaluation mode) J is block
diagonal, one ``d_{l+1} x d_l`` block per example (:func:`example_jacobians`). With BN in training
mode, holding each BN layer's statistics at this batch's values gives the same kind of
block-diagonal matrix J_f. The difference J - J_f is the path through the statistics: per
normalized channel, a rank-one term along the direction 1 (the mean) and one along x_hat (the
variance), so ``rank(J - J_f) <= r``, r = 2 x (channels normalized with batch statistics)
(:func:`coupling_rank`). By the interlacing inequalities for a perturbation of rank r,

    sigma_{k+r}(J_f) <= sigma_k(J) <= sigma_{k-r}(J_f)    (singular values in decreasing order)

the two spectra agree up to a shift of r places: r = 200 of m d = 6,000 for 100 units and a batch
of 60. J_f costs m small SVDs; J is one SVD of an (m d) x (m d) matrix, minutes for such a batch,
so the large measurements use J_f and the whole-batch J checks the bound on smaller batches.

All computations run on a float64 copy of the piece by default, in training mode (batch
statistics), and never change the model (running statistics included).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib.lab.measure import device_of
from bnlib.norm.modules import is_batch_norm

__all__ = [
    "split_at",
    "piece_inputs",
    "batch_jacobian",
    "example_jacobians",
    "coupling_rank",
    "batch_singular_values",
    "example_singular_values",
    "gradient_norms",
]

Boundary = type[nn.Module] | tuple[type[nn.Module], ...]


def split_at(model: nn.Sequential, boundary: Boundary = nn.Linear) -> list[nn.Sequential]:
    """Cut ``model`` before every module of type ``boundary``: the pieces, in order, rebuild it.

    ``mlp([784, 100, 100, 10], "relu", BatchNorm1d)`` cut at ``nn.ReLU`` gives ``[Linear, BN]``,
    ``[ReLU, Linear, BN]``, ``[ReLU, Linear]``: piece l maps the pre-activations of hidden layer l
    (the input, for l = 0) to those of layer l + 1 (the logits, for the last). Cut at ``nn.Linear``
    it gives ``[Linear, BN, ReLU]``, ``[Linear, BN, ReLU]``, ``[Linear]`` (activations to activations).
    The pieces share the model's modules (no copy).

    Args:
        model: a sequential network.
        boundary: the module type (or types) before which to cut.
    """
    modules = list(model)
    starts = [i for i, mod in enumerate(modules) if isinstance(mod, boundary) and i > 0]
    if not starts and not any(isinstance(mod, boundary) for mod in modules):
        raise ValueError(f"the model has no module of type {boundary}")
    edges = [0, *starts, len(modules)]
    return [nn.Sequential(*modules[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def piece_inputs(pieces: Sequence[nn.Module], x: Tensor, train: bool = True) -> list[Tensor]:
    """The input of every piece (``x`` first), from one forward pass of the batch ``x``.

    Runs on copies of the pieces, so running statistics stay where they were.

    Args:
        pieces: the pieces of a network, in order (:func:`split_at`).
        x: the batch.
        train: training mode (batch statistics) or evaluation mode (running statistics).
    """
    h, inputs = x, []
    for piece in pieces:
        inputs.append(h)
        h = copy.deepcopy(piece).train(train)(h)
    return inputs


def _working_copy(piece: nn.Module, h: Tensor, dtype: torch.dtype | None) -> tuple[nn.Module, Tensor]:
    work = copy.deepcopy(piece).train()
    dtype = dtype or h.dtype
    return work.to(dtype), h.detach().to(device_of(piece), dtype)


def batch_jacobian(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """The Jacobian of ``piece`` over the whole batch, in training mode: ``d vec(out) / d vec(h)``.

    Batch statistics are functions of every example, as in a training step, so BN's coupling of
    the examples is in it. One reverse-mode pass per output value: for (m d_out) x (m d_in)
    matrices of a few thousand rows at most.

    Args:
        piece: the module (its copy runs in training mode; the module is not changed).
        h: the batch, (m, d_in) (or (m, C, *)).
        dtype: compute in this dtype (None: ``h``'s).

    Returns:
        ``(m * d_out, m * d_in)``, rows and columns ordered example by example.
    """
    work, h = _working_copy(piece, h, dtype)
    h.requires_grad_(True)
    out = work(h)
    n_out = out.numel()
    rows = []
    for k in range(n_out):  # one vjp per row; is_grads_batched needs vmap rules custom layers lack
        cotangent = torch.zeros(n_out, dtype=out.dtype, device=out.device)
        cotangent[k] = 1.0
        (g,) = torch.autograd.grad(out, h, cotangent.view_as(out), retain_graph=k < n_out - 1)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


def _frozen(work: nn.Module, h: Tensor) -> nn.Module:
    """``work`` in evaluation mode with every BN layer's running statistics set to this batch's."""
    captured: dict[int, Tensor] = {}
    bns = [mod for mod in work.modules() if is_batch_norm(mod)]
    hooks = [
        bn.register_forward_pre_hook(lambda mod, inp, i=i: captured.__setitem__(i, inp[0].detach()))
        for i, bn in enumerate(bns)
    ]
    try:
        with torch.no_grad():
            work.train()(h)
    finally:
        for hook in hooks:
            hook.remove()
    for i, bn in enumerate(bns):
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("example_jacobians needs BN layers with running statistics (track_running_stats=True)")
        z = captured[i].transpose(0, 1).reshape(captured[i].shape[1], -1)  # (C, values per channel)
        with torch.no_grad():
            bn.running_mean.copy_(z.mean(1))
            bn.running_var.copy_(z.var(1, unbiased=False))  # the biased variance normalizes in training
    return work.eval()


def example_jacobians(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Each example's Jacobian ``d out_i / d h_i`` with BN's statistics held at this batch's values.

    The block-diagonal part J_f of the whole-batch Jacobian without the path through the batch
    statistics (see the module docstring): the layers run in evaluation mode with their running
    statistics replaced by the batch mean and biased variance of their inputs, so each output is
    the training-mode output (to rounding), and each example is a function of its own input only.
    Modules other than batch norm are assumed to treat examples separately (Linear,
    activations, layer or group norm do).

    Args:
        piece: the module (copied; the module is not changed).
        h: the batch, (m, d_in).
        dtype: compute in this dtype (None: ``h``'s).

    Returns:
        ``(m, d_out, d_in)``.
    """
    work, h = _working_copy(piece, h, dtype)
    work = _frozen(work, h)
    h.requires_grad_(True)
    out = work(h)
    if out.dim() != 2 or h.dim() != 2:
        raise ValueError(f"expected (m, d) input and output, got {tuple(h.shape)} -> {tuple(out.shape)}")
    d_out = out.shape[1]
    rows = []
    for j in range(d_out):  # output unit j of every example at once: the examples are independent
        cotangent = torch.zeros_like(out)
        cotangent[:, j] = 1.0
        (g,) = torch.autograd.grad(out, h, cotangent, retain_graph=j < d_out - 1)
        rows.append(g)
    return torch.stack(rows, dim=1)


def coupling_rank(piece: nn.Module) -> int:
    """r: an upper bound on the rank of ``J - J_f``, two per channel normalized with batch statistics.

    Every batch-norm layer normalizes with batch statistics in training mode; each of its channels
    adds one direction through the mean and one through the variance.

    Args:
        piece: the module.
    """
    return 2 * sum(int(mod.num_features) for mod in piece.modules() if is_batch_norm(mod))


def batch_singular_values(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Singular values of :func:`batch_jacobian`, in decreasing order (1-D).

    Args:
        piece: the module.
        h: the batch.
        dtype: compute in this dtype (None: ``h``'s).
    """
    return torch.linalg.svdvals(batch_jacobian(piece, h, dtype))


def example_singular_values(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Singular values of every example's Jacobian (:func:`example_jacobians`), all together, decreasing (1-D).

    They are the singular values of the block-diagonal J_f, so the whole-batch Jacobian's lie
    within :func:`coupling_rank` places of them.

    Args:
        piece: the module.
        h: the batch, (m, d_in).
        dtype: compute in this dtype (None: ``h``'s).
    """
    values = torch.linalg.svdvals(example_jacobians(piece, h, dtype)).reshape(-1)
    return values.sort(descending=True).values


def gradient_norms(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    boundary: Boundary = nn.Linear,
) -> Tensor:
    """``||dL/dh_l||`` at the input of every piece (:func:`split_at`), from one training-mode backward pass.

    The gradient that reaches each cut during a training step on ``(x, y)``: BN's coupling of the
    examples included. On a copy: the model and its running statistics are not changed.

    Args:
        model: a sequential network.
        x: the batch's inputs.
        y: its targets.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar loss.
        boundary: where to cut, as in :func:`split_at`.

    Returns:
        One norm per piece, in forward order (the first is the gradient w.r.t. ``x``).
    """
    work = copy.deepcopy(model).train()
    dev = device_of(work)
    h = x.to(dev).detach().requires_grad_(True)
    inputs = []
    for piece in split_at(work, boundary):
        inputs.append(h)
        h = piece(h)
    grads = torch.autograd.grad(loss_fn(h, y.to(dev)), inputs)
    return torch.stack([g.norm() for g in grads]).detach()
