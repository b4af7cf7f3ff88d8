r"""The experiments of the chapter on training vs inference.

- :func:`running_averages`: the running value after every batch, for several momenta in PyTorch's
  convention (the momentum weighs the *new* batch; ``None`` is the cumulative average).
- :func:`running_mean_rms`: the RMS error of such a running mean after every batch, as predicted
  for batch means of a fixed population (bias of the start value and batch noise).
- :class:`GradModeBatchNorm`: a from-scratch BN layer that chooses between batch and population
  statistics by ``torch.is_grad_enabled()`` instead of ``self.training`` (the pattern of some
  tutorials), kept to show what goes wrong; :func:`with_grad_mode_switch` puts it into a network.
- :func:`normalization_error`: how far one model's population statistics are from another's,
  measured on the normalized activations.
- :func:`ema_vs_precise`: train a network and, at checkpoints, compare the running averages (EMA)
  with statistics recomputed on the frozen model (PreciseBN) over a long and a short window.
- :func:`normalization_batch_runs`: train an MLP whose BN layers normalize over groups of ``n``
  examples (ghost batches) for several ``n``, and evaluate it with running averages, PreciseBN and
  batch statistics; measure the train-test inconsistency.
- :func:`forward_profile`: what a forward pass runs (leaf modules, BN values, multiply-adds), to
  count what folding BN removes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlib import norm
from bnlib.lab.data import Split, batches
from bnlib.lab.experiments.small_batches import as_batch_norm
from bnlib.lab.measure import evaluate
from bnlib.lab.models import mlp
from bnlib.lab.training import History, TrainState, every, train
from bnlib.norm import population as pop
from bnlib.norm.modules import is_batch_norm

__all__ = [
    "GradModeBatchNorm",
    "ema_vs_precise",
    "forward_profile",
    "grad_mode_effects",
    "normalization_batch_runs",
    "normalization_error",
    "running_averages",
    "running_mean_rms",
    "with_grad_mode_switch",
]


def running_averages(
    batch_values: Sequence[Tensor], momenta: Mapping[str, float | None], start: float = 0.0
) -> dict[str, Tensor]:
    """The running value after every batch, for each momentum (PyTorch's convention).

    ``r <- (1 - momentum) * r + momentum * v``: the momentum weighs the new batch value ``v``;
    ``None`` is the cumulative average of the values so far (``momentum=None`` in PyTorch).

    Args:
        batch_values: the batch statistics, in order, all of one shape.
        momenta: by name, a momentum in [0, 1] or None.
        start: the running value before the first batch (not used by the cumulative average).

    Returns:
        By name, a tensor of shape ``(len(batch_values), *shape)``: row k is the value after batch k + 1.
    """
    values = torch.stack(list(batch_values))
    out = {}
    for name, momentum in momenta.items():
        if momentum is None:
            counts = torch.arange(1, len(values) + 1, dtype=values.dtype).view(-1, *[1] * (values.dim() - 1))
            out[name] = values.cumsum(0) / counts
            continue
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        r, rows = torch.full_like(values[0], start), []
        for v in values:
            r = (1.0 - momentum) * r + momentum * v
            rows.append(r)
        out[name] = torch.stack(rows)
    return out


def running_mean_rms(
    momentum: float | None, steps: int, mean: float, std: float, batch_size: int, start: float = 0.0
) -> Tensor:
    r"""The predicted RMS error of a running mean after each of ``steps`` batches (PyTorch's convention).

    Batch means of ``batch_size`` independent values from a population with mean ``mean`` and
    standard deviation ``std``, averaged by ``r <- (1 - a) r + a * batch_mean`` from ``start``:
    after ``k`` batches the error has the bias :math:`(\text{start} - \text{mean})(1 - a)^k` and the
    noise :math:`\frac{\text{std}}{\sqrt{m}}\sqrt{\frac{a}{2 - a}(1 - (1 - a)^{2k})}`; the RMS
    error is the root of the sum of their squares. ``momentum=None`` (the cumulative average) has
    no bias and the noise :math:`\text{std}/\sqrt{mk}`.

    Args:
        momentum: the weight of the new batch, in [0, 1], or None for the cumulative average.
        steps: the number of batches.
        mean: the population mean.
        std: the population standard deviation.
        batch_size: the examples per batch, ``m``.
        start: the running value before the first batch.

    Returns:
        A float64 tensor of shape ``(steps,)``: entry k is the RMS error after batch k + 1.
    """
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    sampling = std / batch_size**0.5
    if momentum is None:
        return sampling / k.sqrt()
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    kept = (1.0 - momentum) ** k  # the start value's weight after k batches
    noise_var = sampling**2 * momentum / (2.0 - momentum) * (1.0 - kept**2)
    return (noise_var + ((start - mean) * kept) ** 2).sqrt()


class GradModeBatchNorm(nn.Module):
    r"""Batch normalization that asks ``torch.is_grad_enabled()`` whether it is training (a mistake).

    With gradients enabled it normalizes by the batch statistics and updates its running averages
    (momentum on the new batch, unbiased variance, as PyTorch); with gradients disabled it uses the
    running averages. ``model.train()`` and ``model.eval()`` change nothing. Some from-scratch
    implementations in tutorials switch this way; this layer exists to show what goes wrong: under
    ``torch.no_grad()`` a network in training mode uses population statistics, and after
    ``model.eval()`` a forward pass with gradients (a saliency map, an adversarial example) still
    uses batch statistics and moves the running averages.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch in the running averages. Default: 0.1.

    Shape:
        Input: ``(N, C)`` or ``(N, C, H, W)``. Output: same shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if torch.is_grad_enabled():  # the mistake: the mode is read from autograd, not from self.training
            mean, var = x.mean(dims), x.var(dims, correction=0)
            m = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * m / max(m - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)


def with_grad_mode_switch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BN layer replaced by a :class:`GradModeBatchNorm` holding the same
    parameters and running statistics.

    Args:
        model: the network; it is not changed.
    """
    model = copy.deepcopy(model)

    def convert(module: nn.Module) -> nn.Module:
        for name, child in module.named_children():
            if is_batch_norm(child) and child.running_mean is not None:
                layer = GradModeBatchNorm(child.num_features, child.eps, child.momentum or 0.1)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        if getattr(child, key) is not None:
                            getattr(layer, key).copy_(getattr(child, key))
                setattr(module, name, layer.to(child.running_mean.device))
            else:
                convert(child)
        return module

    return convert(model)


def grad_mode_effects(model: nn.Module, x: Tensor) -> dict[str, float]:
    """What :class:`GradModeBatchNorm` does to ``model`` in eval mode, with and without gradients.

    ``model`` (eval mode, BN layers that read ``self.training``) is the reference; a copy with
    :class:`GradModeBatchNorm` layers (:func:`with_grad_mode_switch`), also in eval mode, is run on
    ``x`` under ``torch.no_grad()`` and then with input gradients, on the whole of ``x`` and on
    its two halves. Returns relative differences (largest absolute difference over the largest
    reference logit): ``"no_grad gap"`` (copy under no_grad vs reference), ``"vs eval"`` (copy
    with gradients vs reference), ``"batch dependence"`` (halves vs whole, with gradients),
    ``"reference gap"`` (the reference with gradients vs without); and ``"moved"``, the largest
    change of the first BN layer's running mean during the passes with gradients.

    Args:
        model: a network in eval mode with BN layers; it is not changed.
        x: a batch of inputs, of even length.
    """
    if len(x) % 2:
        raise ValueError(f"x needs an even number of examples, got {len(x)}")

    def gap(a: Tensor, b: Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    mistake = with_grad_mode_switch(model).eval()  # eval(): ignored by these layers
    first = next(m for m in mistake.modules() if isinstance(m, GradModeBatchNorm))
    x = x.detach().clone().requires_grad_(True)  # e.g. a saliency map needs d logits / d x
    with torch.no_grad():
        reference, no_grad_out = model(x), mistake(x)
    before = first.running_mean.clone()
    whole = mistake(x).detach()
    halves = torch.cat([mistake(part) for part in x.chunk(2)]).detach()
    return {
        "no_grad gap": gap(no_grad_out, reference),
        "vs eval": gap(whole, reference),
        "batch dependence": gap(halves, whole),
        "moved": (first.running_mean - before).abs().max().item(),
        "reference gap": gap(model(x).detach(), reference),
    }


def normalization_error(model: nn.Module, reference: nn.Module) -> float:
    r"""RMS error of the normalized activations when ``model``'s population statistics replace
    ``reference``'s, over every channel of every BN layer.

    For a channel whose inputs have the reference mean :math:`\mu` and variance :math:`\sigma^2`,
    normalizing with :math:`(\mu', \sigma'^2)` instead gives :math:`\hat x' = (x - \mu')/\sigma'`
    rather than :math:`\hat x = (x - \mu)/\sigma`, with mean squared difference
    :math:`((\mu - \mu')/\sigma')^2 + (\sigma/\sigma' - 1)^2` (``eps`` included in both sigmas).
    The result is the square root of its mean over all channels.

    Args:
        model: the network whose running statistics are judged.
        reference: the same architecture, holding the statistics taken as true.
    """
    ours, theirs = pop.batch_norm_layers(model), pop.batch_norm_layers(reference)
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need the same BN layers in both models, got {len(ours)} and {len(theirs)}")
    squares = []
    for a, b in zip(ours, theirs):
        sd_a = torch.sqrt(a.running_var.double() + a.eps)
        sd_b = torch.sqrt(b.running_var.double() + b.eps)
        shift = (b.running_mean.double() - a.running_mean.double()) / sd_a
        squares.append(shift**2 + (sd_b / sd_a - 1.0) ** 2)
    return torch.cat(squares).mean().sqrt().item()


def ema_vs_precise(
    model: nn.Module,
    data: Split,
    *,
    lr: float,
    steps: int,
    interval: int,
    seed: int,
    windows: Sequence[int] = (32, 10),
    batch_size: int = 32,
    frozen_ema: int = 40,
) -> History:
    """Train ``model`` (SGD with momentum 0.9) and compare its running averages with PreciseBN.

    At every ``interval`` steps, the test set is classified with the running averages (``"ema"``)
    and with population statistics recomputed on the frozen model from ``w`` training batches for
    each ``w`` in ``windows`` (``"precise-w"``, :func:`bnlib.norm.population.recompute_statistics`).
    ``"lag"`` is the :func:`normalization_error` of the running averages against the first window's
    statistics, ``"sampling"`` that of each further window's (``"sampling-w"``): what a shorter
    recomputation costs without any lag. ``"frozen-ema"`` is the error of the running averages
    after ``frozen_ema`` more batches through a copy whose weights stay frozen (BN layers in
    training mode with their own momentum, no parameter update): the direct test of lag, which
    should vanish once the averaged batches all come from the same weights.

    Args:
        model: the network (trained in place).
        data: training and test set, on the model's device.
        lr: learning rate.
        steps: parameter updates.
        interval: steps between two checkpoints (the first is at ``interval``).
        seed: the order of the training batches and of the recomputation's batches.
        windows: numbers of batches to recompute the statistics from; the first is the reference.
        batch_size: examples per training and recomputation batch.
        frozen_ema: batches of running averages on the frozen copy (0: not measured).
    """
    order = torch.Generator().manual_seed(seed)

    def compare(state: TrainState) -> dict[str, float]:
        out = {"ema": evaluate(state.model, data.x_test, data.y_test)[1]}
        recomputed = {}
        for w in windows:
            recomputed[w] = copy.deepcopy(state.model)
            source = batches(data.x_train, data.y_train, batch_size, order, epochs=None)
            pop.recompute_statistics(recomputed[w], source, num_batches=w)
            out[f"precise-{w}"] = evaluate(recomputed[w], data.x_test, data.y_test)[1]
        reference = recomputed[windows[0]]
        out["lag"] = normalization_error(state.model, reference)
        out.update({f"sampling-{w}": normalization_error(recomputed[w], reference) for w in windows[1:]})
        if frozen_ema:
            frozen = copy.deepcopy(state.model).train()
            source = batches(data.x_train, data.y_train, batch_size, order, epochs=None)
            with torch.no_grad():
                for _, (xb, _yb) in zip(range(frozen_ema), source):
                    frozen(xb)  # the running averages move; the weights do not
            out["frozen-ema"] = normalization_error(frozen, reference)
        return out

    return train(model, data.x_train, data.y_train, steps=steps, batch_size=batch_size,
                 optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9), seed=seed,
                 record_at=every(interval, steps, start=interval), recorders=[compare])  # fmt: skip


def _relative_gap(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def normalization_batch_runs(
    data: Split,
    sizes: Sequence[int],
    *,
    epochs: int,
    seed: int,
    lr: float = 0.05,
    hidden: Sequence[int] = (128, 128),
    batch_size: int = 32,
    precise_batches: int = 32,
    test_size: int = 288,
    probe_size: int = 512,
    make_norm: Callable[[int, int], nn.Module] | None = None,
) -> dict[int, dict[str, float]]:
    """Train an MLP (ReLU, BN after every hidden layer) whose BN layers normalize over groups of ``n``
    examples (:class:`bnlib.norm.renorm.GhostBatchNorm`) for every ``n`` in ``sizes``, and evaluate it.

    Every ``n`` starts from the same weights and sees the same SGD batches of ``batch_size`` (both
    from ``seed``): only the normalization batch differs, so results are paired across ``n``. For
    each ``n`` (keys of the result):

    - ``"running averages"``, ``"PreciseBN"``, ``"batch statistics"``: test accuracy with the
      running averages, with statistics recomputed on ``precise_batches`` training batches, and
      with every group of ``n`` test examples normalized by its own statistics; ``"... loss"``:
      the test cross-entropy of each;
    - ``"train loss, PreciseBN"``, ``"train loss, batch statistics"`` (and ``"train accuracy,
      ..."``): the loss on the training set (its first multiple of ``batch_size`` examples) with
      the PreciseBN statistics and with every group of ``n`` training examples normalized by its
      own statistics, as in training;
    - ``"PreciseBN, groups of n"``: test accuracy when the statistics are recomputed with the
      BN layers normalizing groups of ``n`` (as in training) instead of batches of ``batch_size``
      (a control for ``"PreciseBN"``, whose deeper layers see inputs normalized over
      ``batch_size`` examples while the statistics are collected);
    - ``"inconsistency"``: the train-test inconsistency, the relative difference between the logits
      of ``probe_size`` training examples under batch statistics (groups of ``n``) and under the
      PreciseBN statistics;
    - ``"inconsistency, trained at max"``: the same for the network trained with the largest ``n``,
      evaluated with groups of ``n``: what sampling ``n`` examples costs a network not trained on it.

    The test examples are the first ``test_size`` (a multiple of every ``n``), the same for every ``n``.

    Args:
        data: flat inputs (N, features) and labels, on the device to train on.
        sizes: normalization batch sizes, each dividing ``batch_size``, ``test_size`` and ``probe_size``.
        epochs: passes over the training set.
        seed: initial weights, batch order, test grouping and recomputation batches.
        lr: SGD learning rate (momentum 0.9).
        hidden: widths of the hidden layers.
        batch_size: examples per SGD step.
        precise_batches: batches of ``batch_size`` for PreciseBN.
        test_size: test examples evaluated.
        probe_size: training examples on which the inconsistency is measured.
        make_norm: ``make_norm(channels, n)`` builds a BN layer with groups of ``n`` (default:
            :class:`bnlib.norm.renorm.GhostBatchNorm`).
    """
    if any(batch_size % n or test_size % n or probe_size % n for n in sizes):
        raise ValueError(f"every size must divide {batch_size}, {test_size} and {probe_size}; got {list(sizes)}")
    make_norm = make_norm or (lambda c, n: norm.GhostBatchNorm(c, ghost_size=n))
    widths = [data.x_train.shape[1], *hidden, data.num_classes]
    device = data.x_train.device
    steps = epochs * (len(data.x_train) // batch_size)
    x_test, y_test = data.x_test[:test_size], data.y_test[:test_size]
    group_order = torch.randperm(test_size, generator=torch.Generator().manual_seed(seed)).to(device)
    probe = data.x_train[:probe_size]
    fit = len(data.x_train) // batch_size * batch_size
    x_fit, y_fit = data.x_train[:fit], data.y_train[:fit]
    precise_nets, out = {}, {}
    for n in sizes:
        net = mlp(widths, "relu", norm=lambda c, n=n: make_norm(c, n),
                  generator=torch.Generator().manual_seed(seed)).to(device)  # fmt: skip
        train(net, data.x_train, data.y_train, steps=steps, batch_size=batch_size,
              optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9), seed=seed)  # fmt: skip
        ema = as_batch_norm(net).eval()
        precise = copy.deepcopy(ema)
        g = torch.Generator().manual_seed(seed)
        pop.recompute_statistics(precise, batches(data.x_train, data.y_train, batch_size, g), precise_batches)
        grouped = pop.evaluate_with_batch_statistics(precise, x_test[group_order], n)
        r = {}
        for name, model in (("running averages", ema), ("PreciseBN", precise)):
            r[f"{name} loss"], r[name] = evaluate(model, x_test, y_test)
        r["batch statistics loss"] = F.cross_entropy(grouped, y_test[group_order]).item()
        r["batch statistics"] = (grouped.argmax(1) == y_test[group_order]).float().mean().item()
        r["train loss, PreciseBN"], r["train accuracy, PreciseBN"] = evaluate(precise, x_fit, y_fit)
        with torch.no_grad():
            fit_logits = pop.evaluate_with_batch_statistics(precise, x_fit, n)
        r["train loss, batch statistics"] = F.cross_entropy(fit_logits, y_fit).item()
        r["train accuracy, batch statistics"] = (fit_logits.argmax(1) == y_fit).float().mean().item()
        grouped_stats = copy.deepcopy(ema)
        g = torch.Generator().manual_seed(seed)
        pop.recompute_statistics(grouped_stats, batches(data.x_train, data.y_train, n, g),
                                 precise_batches * batch_size // n)  # fmt: skip
        r["PreciseBN, groups of n"] = evaluate(grouped_stats, x_test, y_test)[1]
        with torch.no_grad():
            r["inconsistency"] = _relative_gap(pop.evaluate_with_batch_statistics(precise, probe, n), precise(probe))
        precise_nets[n], out[n] = precise, r
    largest = precise_nets[max(sizes)]
    with torch.no_grad():
        reference = largest(probe)
        for n in sizes:
            out[n]["inconsistency, trained at max"] = _relative_gap(
                pop.evaluate_with_batch_statistics(largest, probe, n), reference
            )
    return out


def forward_profile(model: nn.Module, x: Tensor) -> dict[str, int]:
    """What one forward pass of ``model`` on ``x`` runs, per example.

    Returns ``{"passes": leaf modules called, "bn passes": BN layers called, "bn values": values the
    BN layers normalize, "multiply-adds": of the convolution and linear layers}``, the last two per
    example (counted with forward hooks; grouped convolutions included).

    Args:
        model: the network (run in its current mode, without gradients).
        x: a batch of inputs.
    """
    counts = {"passes": 0, "bn passes": 0, "bn values": 0, "multiply-adds": 0}
    bn_layers = set(pop.batch_norm_layers(model))

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        counts["passes"] += 1
        per_example = output[0].numel()
        if module in bn_layers:
            counts["bn passes"] += 1
            counts["bn values"] += per_example
        elif isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            fan_in = module.in_channels // module.groups * module.weight[0, 0].numel()
            counts["multiply-adds"] += per_example * fan_in
        elif isinstance(module, nn.Linear):
            counts["multiply-adds"] += per_example * module.in_features

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts
