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
(:func:`coupling_rank`).

**A piece that ends with its only BN layer** (``[ReLU, Linear, BN]``, the pieces of
``split_at(model, nn.ReLU)``) has more structure: ``J = P J_f`` exactly, where P acts on each
output unit's m values with the matrix of the batch-norm Jacobian theorem::

    P_k = I - 1 1^T / m - x_hat_k x_hat_k^T / m    (x_hat_k: the unit's m normalized values)

(:func:`statistics_projector`). P is symmetric with eigenvalues 1 (m - 2 per unit), 0 and
eps / (var + eps): a projection up to eps. Hence ``sigma_k(J) <= sigma_k(J_f)`` for every k (no
singular value of J exceeds the corresponding one of J_f), and the Frobenius norm of J, so the
root mean square of its singular values, follows from J_f and x_hat without forming J
(:func:`batch_jacobian_norm`)::

    ||J||_F^2 = sum_{i,k} ||J_f[i, k, :]||^2 (1 - 1/m - (2 - c_k) x_hat_ik^2 / m),
    c_k = mean_i x_hat_ik^2 = var_k / (var_k + eps).

Nothing bounds ``sigma_k(J)`` from below by ``sigma_k(J_f)``: the spectra can differ (at m = 8
markedly). J_f costs m small SVDs; the SVD of J, an (m d) x (m d) matrix, takes minutes for a
batch of 60 with 100 units, so the large measurements use J_f and the exact norm of J.

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
    "statistics_projector",
    "batch_jacobian_norm",
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
        h: the batch, ``(m, d_in)`` (or ``(m, C, ...)``).
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


def _output_x_hat(work: nn.Module, h: Tensor) -> Tensor | None:
    """x_hat (m, d_out) of the piece's last module, its only BN layer; None if it has no BN layer."""
    bns = [mod for mod in work.modules() if is_batch_norm(mod)]
    if not bns:
        return None
    if not (isinstance(work, nn.Sequential) and len(bns) == 1 and work[-1] is bns[0]):
        raise ValueError("the structure J = P J_f needs a sequential piece whose only BN layer is its last module")
    captured: list[Tensor] = []
    hook = bns[0].register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach()))
    try:
        with torch.no_grad():
            work.train()(h)
    finally:
        hook.remove()
    z = captured[0]
    if z.dim() != 2:
        raise ValueError(f"expected an (m, d) input of the BN layer, got {tuple(z.shape)}")
    var = z.var(0, unbiased=False)  # the biased variance normalizes in training
    return (z - z.mean(0)) / torch.sqrt(var + bns[0].eps)


def statistics_projector(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """P with ``batch_jacobian(piece, h) = P @ block_diag(*example_jacobians(piece, h))``.

    For a piece whose only BN layer is its last module. Per output unit k, P acts on the unit's m
    values with ``I - 1 1^T / m - x_hat_k x_hat_k^T / m`` (the bracket of the batch-norm Jacobian
    theorem) and leaves other units alone: symmetric, eigenvalues 1 (m - 2 per unit), 0 (along 1)
    and eps / (var_k + eps) (along x_hat_k). Without a BN layer P is the identity. For small
    batches: P has (m d_out)^2 entries.

    Args:
        piece: a sequential module whose last module is its only BN layer (or that has none).
        h: the batch, (m, d_in).
        dtype: compute in this dtype (None: ``h``'s).

    Returns:
        ``(m * d_out, m * d_out)``, rows and columns ordered example by example.
    """
    work, h = _working_copy(piece, h, dtype)
    x_hat = _output_x_hat(work, h)
    with torch.no_grad():
        m, d = h.shape[0], work(h).shape[1]
        eye = torch.eye(m * d, dtype=h.dtype, device=h.device)
        if x_hat is None:
            return eye
        per_unit = torch.eye(m, dtype=h.dtype, device=h.device) - 1 / m  # (m, m)
        per_unit = per_unit - x_hat.T[:, :, None] * x_hat.T[:, None, :] / m  # (d, m, m): unit k
        blocks = per_unit.permute(1, 0, 2)[:, :, :, None]  # [i, k, j, 1]
        same_unit = torch.eye(d, dtype=h.dtype, device=h.device)[None, :, None, :]  # [1, k, 1, l]
        return (blocks * same_unit).reshape(m * d, m * d)


def batch_jacobian_norm(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """The Frobenius norm of :func:`batch_jacobian`, exactly, from J_f and x_hat without forming J.

    For a piece whose only BN layer is its last module, ``J = P J_f`` (:func:`statistics_projector`),
    and P's blocks act on rows of J_f that have no column in common, so
    ``||J||_F^2 = sum_{i,k} ||J_f[i, k, :]||^2 (1 - 1/m - (2 - c_k) x_hat_ik^2 / m)`` with
    ``c_k = mean_i x_hat_ik^2``. ``||J||_F / sqrt(m d_out)`` is the root mean square of J's
    singular values (zeros included). Without a BN layer J = J_f.

    Args:
        piece: a sequential module whose last module is its only BN layer (or that has none).
        h: the batch, (m, d_in).
        dtype: compute in this dtype (None: ``h``'s).

    Returns:
        A 0-d tensor.
    """
    rows = example_jacobians(piece, h, dtype).pow(2).sum(-1)  # (m, d_out): ||J_f[i, k, :]||^2
    work, h = _working_copy(piece, h, dtype)
    x_hat = _output_x_hat(work, h)
    if x_hat is None:
        return rows.sum().sqrt()
    m = h.shape[0]
    c = x_hat.pow(2).mean(0)
    weights = 1 - 1 / m - (2 - c) * x_hat.pow(2) / m
    return (rows * weights.to(rows.device)).sum().sqrt()


def batch_singular_values(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Singular values of :func:`batch_jacobian`, in decreasing order (1-D).

    Args:
        piece: the module.
        h: the batch.
        dtype: compute in this dtype (None: ``h``'s).
    """
    # on the CPU: the same LAPACK result on every device (cuSOLVER may fall back, with a warning)
    return torch.linalg.svdvals(batch_jacobian(piece, h, dtype).cpu())


def example_singular_values(piece: nn.Module, h: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Singular values of every example's Jacobian (:func:`example_jacobians`), all together, decreasing (1-D).

    They are the singular values of the block-diagonal J_f. For a piece that ends with its only BN
    layer, the k-th singular value of the whole-batch Jacobian is at most the k-th of these (see
    the module docstring); it can be much smaller.

    Args:
        piece: the module.
        h: the batch, (m, d_in).
        dtype: compute in this dtype (None: ``h``'s).
    """
    values = torch.linalg.svdvals(example_jacobians(piece, h, dtype).cpu()).reshape(-1)  # as above
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
