"""Benchmarks of batch normalization: time, memory kept for backward, and time in units of a copy.

Five implementations of the same layer, timed in the same run so that their ratios are fair:

``native``
    ``torch.nn.functional.batch_norm``: PyTorch's fused kernel (C++ on a CPU, CUDA on a GPU).
``bnlib``
    :func:`bnlib.norm.functional.batch_norm`: a custom autograd Function with the compact backward.
``compiled``
    the same formulas through ``torch.compile`` (``backend="compiled"``, :mod:`bnlib.norm.compiled`).
``from ops``
    batch norm written with plain tensor operations, differentiated by autograd node by node
    (the from-scratch version of d2l's chapter, :func:`batch_norm_from_ops`).
``numpy``
    :mod:`bnlib.norm.reference` (NumPy forward and backward, on the CPU only).

Batch norm does a few operations per element, so its time is set by how many bytes it moves, not by
arithmetic. A training step (forward and backward) must read the input at least twice (statistics,
then normalize) and write the output, then read the input and the upstream gradient for the two
per-channel sums, and read both again to write dx: at least :data:`TRAIN_PASSES` input-sized
transfers. Evaluation reads the input once and writes the output once (:data:`EVAL_PASSES`).
Divided by the measured copy bandwidth, that gives an estimate of the time (:func:`bandwidth_bound`),
not a lower bound: a copy is not the fastest way through memory, and a fused evaluation kernel can
beat it. :mod:`bnlib.bench.roofline` measures the machine's limits properly; here each time is also
reported in units of one copy of the input timed in the same rounds (:attr:`Result.copy_ratio`).

Timings use ``torch.utils.benchmark.Timer`` and are interleaved: ``Timer.blocked_autorange`` sizes
each implementation's timed block once, then every round times one block of each implementation in
turn, and the median over rounds is reported, so a machine whose load changes during the run slows
all implementations alike and the ratios stay meaningful.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark

from bnlib.norm import compiled, reference
from bnlib.norm import functional as F
from bnlib.norm.channels import channel_shape, reduce_dims

__all__ = [
    "CONV_SHAPES",
    "EVAL_PASSES",
    "IMPLEMENTATIONS",
    "MLP_SHAPES",
    "TRAIN_PASSES",
    "Result",
    "bandwidth_bound",
    "batch_norm_from_ops",
    "block_size",
    "compile_cost",
    "copy_bandwidth",
    "fold_pair",
    "fold_speedup",
    "make_step",
    "running_statistics_checks",
    "run",
    "saved_for_backward",
    "statistics_steps",
    "time_interleaved",
    "two_pass_var_mean",
    "without_tf32",
]

#: the five implementations compared, by the name :func:`make_step` and :func:`run` take
IMPLEMENTATIONS = ("native", "bnlib", "compiled", "from ops", "numpy")
#: the (N, C) shapes :func:`run` times by default (a fully connected layer's input)
MLP_SHAPES: tuple[tuple[int, ...], ...] = ((256, 1024),)
#: the (N, C, H, W) shapes :func:`run` times by default (convolutional feature maps)
CONV_SHAPES: tuple[tuple[int, ...], ...] = ((64, 64, 32, 32), (32, 256, 14, 14), (8, 64, 112, 112))
#: the input-sized transfers of a training step, forward 1 + 2 (statistics; normalize) and backward 2 + 3 (sums; dx)
TRAIN_PASSES = 8
#: the input-sized transfers in evaluation, a read of x and a write of y
EVAL_PASSES = 2


def batch_norm_from_ops(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Training-mode batch norm from plain tensor operations; autograd builds the backward.

    ``x_hat = (x - mean) / sqrt(var + eps)``, ``y = weight * x_hat + bias``, as in d2l's from-scratch
    chapter: every intermediate the graph needs is kept for backward.

    Args:
        x: input (N, C, ...), normalized per channel over every other dimension.
        weight: per-channel scale gamma, (C,).
        bias: per-channel shift beta, (C,).
        eps: added to the variance.
    """
    dims, shape = reduce_dims(x), channel_shape(x)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    return weight.view(shape) * x_hat + bias.view(shape)


def two_pass_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased variance and mean in two passes: the mean, then the mean of the squared
    deviations (one temporary, squared in place).

    The same two-pass scheme as bnlib's eager forward, but not its code: that forward also corrects
    the mean for the digits a float32 mean loses, keeps the centred input for backward and writes
    the output (its passes are counted by :func:`bnlib.bench.roofline.count_passes`). This is the
    statistics alone, to time against ``torch.var_mean`` (:func:`statistics_steps`).

    Args:
        x: input (N, C, ...), reduced over every dimension but the channels.

    Returns:
        ``(var, mean)``, each (C,), in the order of ``torch.var_mean``.
    """
    dims = reduce_dims(x)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square_().mean(dim=dims)
    return var, mean.view(-1)


def statistics_steps(shape: Sequence[int], device: torch.device | str = "cpu") -> dict[str, Callable[[], object]]:
    """The per-channel statistics of one input of ``shape`` two ways, by name: ``"torch.var_mean"``
    (one pass, Welford's update) and ``"two-pass"`` (:func:`two_pass_var_mean`), for timing side by side.

    Args:
        shape: the input shape (N, C, ...).
        device: where the input is.
    """
    x = _inputs(shape, torch.device(device))[0]
    dims = reduce_dims(x)
    return {
        "torch.var_mean": lambda: torch.var_mean(x, dim=dims, correction=0),
        "two-pass": lambda: two_pass_var_mean(x),
    }


def _eval_from_ops(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    shape = channel_shape(x)
    return weight.view(shape) * (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) + bias.view(shape)


def _inputs(shape: Sequence[int], device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(*shape, generator=g) * 2 + 1).to(device)
    dy = torch.randn(*shape, generator=g).to(device)
    weight = (torch.rand(c, generator=g) + 0.5).to(device)
    bias = torch.randn(c, generator=g).to(device)
    mean, var = torch.randn(c, generator=g).to(device), (torch.rand(c, generator=g) + 0.5).to(device)
    return x, dy, weight, bias, mean, var


def make_step(impl: str, mode: str, shape: Sequence[int], device: torch.device | str = "cpu") -> Callable[[], object]:
    """A no-argument function running one step of ``impl``: forward and backward (``mode="train"``)
    or the forward in evaluation mode (``mode="eval"``), on fixed inputs of ``shape``.

    Args:
        impl: one of :data:`IMPLEMENTATIONS` (``"compiled"`` and ``"numpy"`` are not in every mode).
        mode: ``"train"`` or ``"eval"``.
        shape: the input shape (N, C, ...).
        device: where the inputs are (``"numpy"``: the CPU only).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if len(shape) < 2:
        raise ValueError(f"expected a shape (N, C, ...), got {tuple(shape)}")
    device = torch.device(device)
    x, dy, weight, bias, mean, var = _inputs(shape, device)
    if impl == "numpy":
        if device.type != "cpu":
            raise ValueError("the NumPy reference runs on the CPU only")
        return _numpy_step(mode, x.numpy(), dy.numpy(), weight.numpy(), bias.numpy(), mean.numpy(), var.numpy())
    if mode == "eval":
        fns = {
            "native": lambda: torch.nn.functional.batch_norm(x, mean, var, weight, bias, False),
            "bnlib": lambda: F.batch_norm(x, mean, var, weight, bias, False),
            "from ops": lambda: _eval_from_ops(x, mean, var, weight, bias),
        }
        if impl not in fns:
            raise ValueError("evaluation is one multiply-add per element: bnlib runs it eagerly in every backend")
        return fns[impl]
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    fwd = _train_forward(impl)

    def step():
        out = fwd(x, weight, bias)
        return torch.autograd.grad(out, (x, weight, bias), dy)

    return step


def _train_forward(impl: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return {
        "native": lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True),
        "bnlib": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        "compiled": lambda x, w, b: F.batch_norm(x, None, None, w, b, True, backend="compiled"),
        "from ops": batch_norm_from_ops,
    }[impl]


def _numpy_step(mode, x, dy, gamma, beta, mean, var):
    if mode == "eval":
        if x.ndim != 2:
            raise ValueError("bnlib.norm.reference has evaluation mode for (N, D) input only")
        return lambda: reference.batchnorm_inference(x, mean, var, gamma, beta)
    if x.ndim == 4:
        forward, backward = reference.spatial_batchnorm_forward, reference.spatial_batchnorm_backward
    elif x.ndim == 2:
        forward, backward = reference.batchnorm_forward, reference.batchnorm_backward
    else:
        raise ValueError(f"bnlib.norm.reference handles (N, D) and (N, C, H, W) input, got {x.ndim}D")

    def step():
        _, cache = forward(x, gamma, beta)
        return backward(dy, cache)

    return step


def block_size(timer: benchmark.Timer, min_block_s: float) -> int:
    """Calls per timed block of ``timer``'s statement: as many as fill ``min_block_s``, and at least the block
    ``Timer.blocked_autorange`` picks (one whose timer overhead is negligible).

    The time per call is the median of ``blocked_autorange`` over about ``min_block_s``, which also warms the
    statement up.

    Args:
        timer: the timer of one statement.
        min_block_s: the shortest block, in seconds.
    """
    probe = timer.blocked_autorange(min_run_time=min_block_s)
    return max(probe.number_per_run, math.ceil(min_block_s / max(probe.median, 1e-9)))


def time_interleaved(
    steps: dict[str, Callable[[], object]], rounds: int = 10, min_block_s: float = 0.02, threads: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each step, one sample per round, the steps interleaved within a round.

    Every step runs twice first (warm-up; a compile happens there), then gets its block size
    (:func:`block_size`, once, before the rounds). Each round then times one block of each step in
    turn (``Timer.timeit``; the timer synchronizes CUDA): a sample is the block's time per call.

    Args:
        steps: the no-argument functions to time, by name.
        rounds: samples per step (at least 1).
        min_block_s: the shortest timed block, in seconds (:func:`block_size`).
        threads: torch threads while timing.

    Returns:
        The samples (seconds per call) of each step, by name, one per round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    timers, blocks = {}, {}
    for name, step in steps.items():
        step(), step()
        timers[name] = benchmark.Timer("step()", globals={"step": step}, num_threads=threads, label=name)
        blocks[name] = block_size(timers[name], min_block_s)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name in steps:
            samples[name].append(timers[name].timeit(blocks[name]).median)
    return samples


def saved_for_backward(impl: str, shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[float, float]:
    """What a training step keeps for backward, in units of the input's size: ``(total, new)``.

    ``total`` counts every distinct storage the autograd graph saves (for NumPy: the arrays in the
    cache); ``new`` leaves out the input itself, which the caller holds anyway.

    Args:
        impl: one of :data:`IMPLEMENTATIONS`.
        shape: the input shape (N, C, ...).
        device: where the inputs are.
    """
    x, _, weight, bias, _, _ = _inputs(shape, torch.device(device))
    if impl == "numpy":
        xn = x.cpu().numpy()
        forward = reference.spatial_batchnorm_forward if xn.ndim == 4 else reference.batchnorm_forward
        _, cache = forward(xn, weight.cpu().numpy(), beta=bias.cpu().numpy())
        arrays = [a for a in cache if isinstance(a, np.ndarray)]
        total = sum(a.nbytes for a in arrays)
        new = sum(a.nbytes for a in arrays if not np.shares_memory(a, xn))
        return total / xn.nbytes, new / xn.nbytes
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _train_forward(impl)(x, weight, bias)
    nbytes = x.numel() * x.element_size()
    total = sum(saved.values())
    new = total - saved.get(x.untyped_storage().data_ptr(), 0)
    return total / nbytes, new / nbytes


def copy_bandwidth(shape: Sequence[int], device: torch.device | str = "cpu", rounds: int = 10) -> float:
    """Bytes per second of a tensor copy of ``shape`` (read plus write), median over rounds.

    Args:
        shape: the shape of the float32 tensor copied.
        device: where it is.
        rounds: timed rounds.
    """
    src = torch.randn(*shape, device=device)
    dst = torch.empty_like(src)
    seconds = statistics.median(time_interleaved({"copy": lambda: dst.copy_(src)}, rounds=rounds)["copy"])
    return 2 * src.numel() * src.element_size() / seconds


def bandwidth_bound(shape: Sequence[int], mode: str, bandwidth: float, element_size: int = 4) -> float:
    """Seconds to move the bytes a step must move (:data:`TRAIN_PASSES` or :data:`EVAL_PASSES`
    input-sized transfers) at ``bandwidth``: a lower bound only if ``bandwidth`` is the machine's
    limit, which a copy's is not (:mod:`bnlib.bench.roofline` measures the limit).

    Args:
        shape: the input shape.
        mode: ``"train"`` or ``"eval"``.
        bandwidth: bytes per second, e.g. from :func:`copy_bandwidth`.
        element_size: bytes per element of the input.
    """
    passes = {"train": TRAIN_PASSES, "eval": EVAL_PASSES}[mode]
    return passes * int(np.prod(shape)) * element_size / bandwidth


def compile_cost(shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[float, bool]:
    """Seconds of the first compiled training step (forward and backward) of a new ``shape``, minus a
    warm one: the one-time compile. Also whether the compiled path is in use (not the eager fallback).

    Args:
        shape: the input shape (N, C, ...).
        device: where the inputs are.

    Returns:
        ``(seconds, compiled)``.
    """
    step = make_step("compiled", "train", shape, device)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    warm = time.perf_counter() - start
    return max(first - warm, 0.0), compiled.available()[0]


@dataclass
class Result:
    """One row of the benchmark: an implementation on a shape in a mode.

    Args:
        mode: ``"train"`` or ``"eval"``.
        shape: the input shape.
        impl: the implementation, one of :data:`IMPLEMENTATIONS`.
        median_s: median seconds per step.
        ratio: ``median_s`` over native's, same run.
        saved: ``(total, new)`` of :func:`saved_for_backward`, in input sizes; None in evaluation.
        copy_s: median seconds of a plain copy of the input, timed in the same rounds.
    """

    mode: str
    shape: tuple[int, ...]
    impl: str
    median_s: float
    ratio: float  # median time / native's median time, same run
    saved: tuple[float, float] | None  # (total, new) input sizes kept for backward; None in eval
    copy_s: float  # median time of a plain copy of the input, timed in the same rounds

    @property
    def copy_ratio(self) -> float:
        """``median_s`` in units of the same-run copy of the input: how many copies' time the step took."""
        return self.median_s / self.copy_s

    @property
    def bound_s(self) -> float:
        """The step's input-sized transfers at the speed of the same-run copy (a copy is two
        transfers, a read and a write), in seconds: an estimate, not a bound (a fused kernel can
        beat a copy; see :mod:`bnlib.bench.roofline`)."""
        return {"train": TRAIN_PASSES, "eval": EVAL_PASSES}[self.mode] / 2 * self.copy_s

    @property
    def bandwidth(self) -> float:
        """Bytes per second of the same-run copy (read plus write), float32 input."""
        return 2 * 4 * int(np.prod(self.shape)) / self.copy_s


def run(
    shapes: Sequence[Sequence[int]] = MLP_SHAPES + CONV_SHAPES,
    modes: Sequence[str] = ("train", "eval"),
    impls: Sequence[str] = IMPLEMENTATIONS,
    device: torch.device | str = "cpu",
    rounds: int = 10,
    threads: int = 1,
) -> list[Result]:
    """Time every implementation on every shape and mode (interleaved); ratios against native.

    A plain copy of the input is timed in the same rounds, the unit of each row's time in copies.

    Args:
        shapes: the input shapes.
        modes: ``"train"`` and/or ``"eval"``.
        impls: the implementations, ``"native"`` among them; each runs where it applies.
        device: where to run.
        rounds: timed rounds.
        threads: torch threads while timing.

    Returns:
        One :class:`Result` per implementation, shape and mode.
    """
    if "native" not in impls:
        raise ValueError("ratios are taken against 'native': include it in impls")
    device = torch.device(device)
    results = []
    for mode in modes:
        for shape in shapes:
            names = [i for i in impls if _applies(i, mode, shape, device)]
            steps = {i: make_step(i, mode, shape, device) for i in names}
            src = torch.randn(*shape, device=device)
            dst = torch.empty_like(src)
            steps[" copy"] = lambda src=src, dst=dst: dst.copy_(src)
            samples = time_interleaved(steps, rounds=rounds, threads=threads)
            medians = {i: statistics.median(samples[i]) for i in steps}
            for i in names:
                saved = saved_for_backward(i, shape, device) if mode == "train" else None
                ratio = medians[i] / medians["native"]
                results.append(Result(mode, tuple(shape), i, medians[i], ratio, saved, medians[" copy"]))
    return results


def _applies(impl: str, mode: str, shape: Sequence[int], device: torch.device) -> bool:
    if impl == "compiled":
        return mode == "train"
    if impl != "numpy":
        return True
    return device.type == "cpu" and (len(shape) in (2, 4) if mode == "train" else len(shape) == 2)


@contextlib.contextmanager
def without_tf32() -> Iterator[None]:
    """Run the block with TF32 off for cuDNN convolutions and CUDA matrix products, then restore
    both flags as they were.

    On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default (10-bit
    mantissa), which changes outputs by about 1e-3 relative: a comparison of two float32
    computations at float32 rounding needs it off. On a CPU the flags change nothing.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def running_statistics_checks(bn: nn.Module, x: Tensor) -> dict[str, bool]:
    """The bookkeeping running statistics bring to inference, checked on the BN layer ``bn``
    and an input ``x``; ``bn`` is left as it was.

    Args:
        bn: a batch-norm layer.
        x: an input of ``bn``.

    Returns:
        ``"stored"``: its running mean and variance are in its ``state_dict`` (saved with the
        model); ``"mode matters"``: its evaluation output differs from its training output;
        ``"eval uses them"``: its evaluation output changes when the running mean does.
    """
    state = bn.state_dict()
    stored = "running_mean" in state and "running_var" in state
    was_training = bn.training
    saved = {k: v.clone() for k, v in state.items()}
    try:
        with torch.no_grad():
            bn.eval()
            eval_out = bn(x)
            bn.train()
            train_out = bn(x)
            bn.eval()
            mean = getattr(bn, "running_mean", None)
            if mean is not None:
                mean.add_(1.0)
            uses = mean is not None and not torch.equal(bn(x), eval_out)
    finally:
        bn.load_state_dict(saved)
        bn.train(was_training)
    return {"stored": stored, "mode matters": not torch.equal(eval_out, train_out), "eval uses them": uses}


def fold_pair(
    channels: int = 64, batch: int = 8, size: int = 32, groups: int = 1, device: torch.device | str = "cpu"
) -> tuple[nn.Module, nn.Module, Tensor]:
    """An evaluation-mode 3x3 convolution followed by BN (random running statistics, gamma, beta),
    the same convolution with BN folded into it (:func:`bnlib.norm.fusion.fuse_conv_bn`), and an input.

    Args:
        channels: input and output channels of the convolution.
        batch: examples per input.
        size: height and width of the input.
        groups: convolution groups (``channels``: a depthwise convolution).
        device: where the modules and the input are.

    Returns:
        ``(conv_then_bn, folded, x)``.
    """
    from bnlib.norm.fusion import fuse_conv_bn

    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
    pair = nn.Sequential(conv, bn).eval().to(device)
    folded = fuse_conv_bn(conv, bn).eval().to(device)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    return pair, folded, x


def fold_speedup(
    channels: int = 64,
    batch: int = 8,
    size: int = 32,
    groups: int = 1,
    device: torch.device | str = "cpu",
    rounds: int = 10,
    threads: int = 1,
) -> dict[str, float]:
    """Evaluation-mode conv followed by BN against the conv with BN folded into it (:func:`fold_pair`).

    ``groups=channels`` gives a depthwise convolution, whose cost is of the same order as BN's pass
    over memory.

    Args:
        channels: input and output channels of the 3x3 convolution.
        batch: examples per input.
        size: height and width of the input.
        groups: convolution groups.
        device: where to run.
        rounds: timed rounds.
        threads: torch threads while timing.

    Returns:
        Median seconds of ``"conv+bn"`` and ``"folded"`` (at the backend's default precision),
        their ratio ``"speedup"``, ``"max_diff"``, the largest difference of the two outputs
        computed in float32 (:func:`without_tf32`), and ``"max_diff_default"``, the same at the
        default precision (TF32 convolutions on recent GPUs).
    """
    pair, folded, x = fold_pair(channels, batch, size, groups, device)
    with torch.no_grad():
        max_diff_default = (pair(x) - folded(x)).abs().max().item()
        with without_tf32():
            max_diff = (pair(x) - folded(x)).abs().max().item()

    def no_grad(module):
        def step():
            with torch.no_grad():
                return module(x)

        return step

    samples = time_interleaved({"conv+bn": no_grad(pair), "folded": no_grad(folded)}, rounds=rounds, threads=threads)
    t_pair, t_folded = statistics.median(samples["conv+bn"]), statistics.median(samples["folded"])
    return {
        "conv+bn": t_pair,
        "folded": t_folded,
        "speedup": t_pair / t_folded,
        "max_diff": max_diff,
        "max_diff_default": max_diff_default,
    }
