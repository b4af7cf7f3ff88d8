r"""The roofline of batch normalization: the bytes each kernel must move, the arithmetic it does,
and the machine's measured limits, so that each kernel's distance from the physical limit is a
measured ratio.

Per-channel work (a few numbers per channel) is negligible; what counts is the passes over tensors
of the input's size (``x``, ``y``, ``dy``, ``dx``). For tensors larger than the cache:

``forward`` (training), 3 passes
    the statistics need all of ``x`` before the first output can be written: read ``x`` once for
    the sum and the sum of squares, then read ``x`` again and write ``y``.
``backward``, 5 passes
    ``dx`` needs the two per-channel sums of ``dy`` and ``dy * x_hat`` over the whole batch: read
    ``x`` and ``dy``, then read both again and write ``dx``.
``eval``, 2 passes
    read ``x``, write ``y`` (the statistics are fixed).

Even a cache holding every tensor leaves one pass per tensor a kernel reads or writes: 2, 3 and 2
(:data:`COMPULSORY_PASSES`), the least traffic any implementation can have.

The arithmetic, per element, with the per-channel coefficients folded in (a fused multiply-add is
2 flops), the least that fits in those passes: forward 5 (in the one read for the statistics a sum
of ``x``, 1, and a sum of ``x * x``, 2; ``y = s x + t``, 2), backward 7 (a sum of ``dy``; a sum of
``dy * x``, 2; ``dx = a dy + b x + c``, 4), eval 2. Centred sums of squares (two-pass statistics)
need the mean first, so a second read of ``x`` before the output's: four passes, not three.

The machine's limits are measured in the same interleaved rounds as the kernels
(:func:`run`): the STREAM-like kernels on tensors of the same size (:func:`stream_steps`) and a
float32 matrix product for the arithmetic peak (:func:`matmul_step`). Reading and writing move
bytes at different rates, so each kernel's floor is built from its phases (:data:`PHASES`), each
at the rate of the STREAM-like kernels with the same mix of reads and writes (:data:`MIXES`);
the optimistic floor charges every byte at the fastest rate of all (:attr:`Roofline.bandwidth`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode  # the documented home of dispatch modes

from bnlib.bench.timing import batch_norm_from_ops, make_step, time_interleaved
from bnlib.norm import functional as F

__all__ = [
    "COMPULSORY_PASSES",
    "COMPULSORY_PHASES",
    "FLOPS_PER_ELEMENT",
    "KERNELS",
    "MIN_PASSES",
    "MIXES",
    "PHASES",
    "Roofline",
    "count_passes",
    "intensity",
    "kernel_steps",
    "matmul_step",
    "min_bytes",
    "run",
    "stream_steps",
]

#: the kernels of a BN layer (the training forward and backward, and the evaluation forward)
KERNELS = ("forward", "backward", "eval")
#: input-sized passes a kernel must make when the tensors do not fit in a cache
MIN_PASSES = {"forward": 3, "backward": 5, "eval": 2}
#: input-sized passes with a cache that holds everything (every tensor read or written once)
COMPULSORY_PASSES = {"forward": 2, "backward": 3, "eval": 2}
#: floating-point operations per input element (a fused multiply-add counts 2)
FLOPS_PER_ELEMENT = {"forward": 5, "backward": 7, "eval": 2}
#: the STREAM-like kernels (:func:`stream_steps`) of each mix of input-sized reads and writes
MIXES = {"read": ("read",), "read+write": ("copy", "scale"), "2 reads+write": ("add", "triad")}
#: each kernel's least traffic (:data:`MIN_PASSES`) by phase, ``(mix, passes)``, mixes of :data:`MIXES`
PHASES = {
    "forward": (("read", 1), ("read+write", 2)),  # statistics; normalize
    "backward": (("read", 2), ("2 reads+write", 3)),  # two sums; dx
    "eval": (("read+write", 2),),
}
#: the same for a cache holding everything (:data:`COMPULSORY_PASSES`): one phase, every tensor once
COMPULSORY_PHASES = {
    "forward": (("read+write", 2),),
    "backward": (("2 reads+write", 3),),
    "eval": (("read+write", 2),),
}


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")


def min_bytes(kernel: str, shape: Sequence[int], element_size: int = 4, compulsory: bool = False) -> int:
    """The bytes ``kernel`` must move on an input of ``shape``: its passes times the input's bytes.

    Args:
        kernel: one of :data:`KERNELS`.
        shape: the input shape (N, C, ...).
        element_size: bytes per element.
        compulsory: count :data:`COMPULSORY_PASSES` (a cache holding everything) instead of
            :data:`MIN_PASSES`.
    """
    _check_kernel(kernel)
    passes = (COMPULSORY_PASSES if compulsory else MIN_PASSES)[kernel]
    numel = 1
    for n in shape:
        numel *= int(n)
    return passes * numel * element_size


def intensity(kernel: str, element_size: int = 4) -> float:
    """Arithmetic intensity of ``kernel``: flops per byte of its minimum traffic (:data:`MIN_PASSES`).

    Args:
        kernel: one of :data:`KERNELS`.
        element_size: bytes per element.
    """
    _check_kernel(kernel)
    return FLOPS_PER_ELEMENT[kernel] / (MIN_PASSES[kernel] * element_size)


def stream_steps(
    shape: Sequence[int], device: torch.device | str = "cpu"
) -> dict[str, tuple[Callable[[], object], int]]:
    """STREAM-like kernels on float32 tensors of ``shape``, by name: ``(step, bytes it moves)``.

    ``read`` (a sum: one read), ``copy`` and ``scale`` (a read and a write), ``add`` and ``triad``
    (two reads and a write), each writing into a tensor allocated once.

    Args:
        shape: the tensors' shape.
        device: where they are.
    """
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*shape, generator=g).to(device) for _ in range(2))
    out = torch.empty_like(a)
    size = a.numel() * a.element_size()
    return {
        "read": (lambda: a.sum(), size),
        "copy": (lambda: out.copy_(a), 2 * size),
        "scale": (lambda: torch.mul(a, 3.0, out=out), 2 * size),
        "add": (lambda: torch.add(a, b, out=out), 3 * size),
        "triad": (lambda: torch.add(a, b, alpha=3.0, out=out), 3 * size),
    }


def matmul_step(n: int, device: torch.device | str = "cpu") -> tuple[Callable[[], object], int]:
    """A float32 ``n x n`` matrix product into a preallocated output: ``(step, flops)``, ``2 n^3`` flops.

    Args:
        n: the matrices' size.
        device: where they are.
    """
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty_like(a)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def _forward(impl: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if impl == "from ops":
        return batch_norm_from_ops
    if impl == "native":
        return lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True)
    if impl in ("bnlib", "compiled"):
        backend = "compiled" if impl == "compiled" else "eager"
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, True, backend=backend)
    raise ValueError(f"kernel_steps times 'native', 'bnlib', 'compiled' and 'from ops', got {impl!r}")


def kernel_steps(
    impl: str, shape: Sequence[int], device: torch.device | str = "cpu"
) -> dict[str, Callable[[], object]]:
    """One step per kernel of ``impl``, by kernel: the training ``forward`` (autograd recording,
    as in training), the ``backward`` alone (of a graph built once and kept), and ``eval``.

    Args:
        impl: ``"native"``, ``"bnlib"``, ``"compiled"`` or ``"from ops"`` (evaluation is eager in
            bnlib: the compiled implementation has no ``eval`` step).
        shape: the input shape (N, C, ...).
        device: where the inputs are.
    """
    forward = _forward(impl)
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(*shape, generator=g) * 2 + 1).to(device).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(device)
    w = (torch.rand(c, generator=g) + 0.5).to(device).requires_grad_()
    b = torch.randn(c, generator=g).to(device).requires_grad_()
    out = forward(x, w, b)
    steps = {
        "forward": lambda: forward(x, w, b),
        "backward": lambda: torch.autograd.grad(out, (x, w, b), dy, retain_graph=True),
    }
    if impl != "compiled":
        steps["eval"] = make_step(impl, "eval", shape, device)
    return steps


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# in-place operations that overwrite ``self`` without reading it
_OVERWRITE = {"copy_", "fill_", "zero_"}


class _Counter(TorchDispatchMode):
    """Counts the distinct input-sized tensors each ATen operation reads and writes."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.reads, self.writes = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view moves no data
        values = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)]
        read = [not a.is_out for a in schema.arguments]  # out= is written, not read
        if func.overloadpacket.__name__ in _OVERWRITE:
            read[0] = False
        values = [v for v, r in zip(values, read) if r]
        self.reads += len(self._storages(values))
        self.writes += len(self._storages(out))
        return out

    def _storages(self, value: object) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in _tensors(value) if t.numel() == self.numel}


def count_passes(step: Callable[[], object], numel: int) -> tuple[int, int]:
    """Input-sized reads and writes of the operations ``step`` runs: ``(reads, writes)``.

    Each operation (autograd's backward operations included) counts every distinct tensor of
    ``numel`` elements it reads and every one it writes; views move nothing, and a tensor read twice
    by one operation counts once. A fused kernel (one operation) is opaque: what it does inside
    does not show.

    Args:
        step: a no-argument function running PyTorch operations.
        numel: the number of elements of an input-sized tensor.
    """
    with _Counter(numel) as counter:
        step()
    return counter.reads, counter.writes


@dataclass
class Roofline:
    """Medians of one interleaved run and the machine's limits measured in it.

    Args:
        shape: the input shape of the kernels.
        seconds: median seconds per call of every step timed, by name.
        stream_bytes: bytes moved per call by the STREAM-like steps, by name.
        matmul_flops: flops per call of the matrix product (step ``"matmul"``).
    """

    shape: tuple[int, ...]
    seconds: dict[str, float]
    stream_bytes: dict[str, int]
    matmul_flops: int

    @property
    def bandwidths(self) -> dict[str, float]:
        """Bytes per second of each STREAM-like step."""
        return {k: n / self.seconds[k] for k, n in self.stream_bytes.items()}

    @property
    def bandwidth(self) -> float:
        """The fastest STREAM-like step in bytes per second (usually the read-only sum); on a CPU
        timed on one thread, one core's rate."""
        return max(self.bandwidths.values())

    @property
    def flops_per_s(self) -> float:
        """The measured arithmetic peak, the matrix product's flops per second."""
        return self.matmul_flops / self.seconds["matmul"]

    @property
    def balance(self) -> float:
        """The machine balance in flops per byte; below it a kernel is limited by memory traffic."""
        return self.flops_per_s / self.bandwidth

    def mix_bandwidth(self, mix: str) -> float:
        """Bytes per second of the fastest STREAM-like step with the read/write ``mix``
        (a key of :data:`MIXES`)."""
        return max(self.bandwidths[k] for k in MIXES[mix])

    def floor_s(self, kernel: str, compulsory: bool = False, matched: bool = True) -> float:
        """The least time of ``kernel``: its least bytes at the measured bandwidth.

        Args:
            kernel: one of :data:`KERNELS`.
            compulsory: with :data:`COMPULSORY_PASSES` instead of :data:`MIN_PASSES`.
            matched: each phase at the rate of the STREAM-like steps with its mix of reads and
                writes (:data:`PHASES`); False: every byte at the fastest rate of all
                (:attr:`bandwidth`), an optimistic floor.
        """
        if not matched:
            return min_bytes(kernel, self.shape, compulsory=compulsory) / self.bandwidth
        _check_kernel(kernel)
        input_bytes = min_bytes("eval", self.shape) // MIN_PASSES["eval"]
        phases = (COMPULSORY_PHASES if compulsory else PHASES)[kernel]
        return sum(passes * input_bytes / self.mix_bandwidth(mix) for mix, passes in phases)

    def over_floor(self, impl: str, kernel: str, compulsory: bool = False, matched: bool = True) -> float:
        """How many times the floor ``impl``'s ``kernel`` took: its distance from the limit.

        Args:
            impl: an implementation timed by :func:`run`.
            kernel: one of :data:`KERNELS`.
            compulsory: against the compulsory-traffic floor.
            matched: against the floor of matched read/write mixes (False: the fastest rate).
        """
        return self.seconds[f"{impl} {kernel}"] / self.floor_s(kernel, compulsory, matched)


def run(
    shape: Sequence[int],
    impls: Sequence[str] = ("native", "bnlib", "compiled"),
    device: torch.device | str = "cpu",
    rounds: int = 5,
    matmul_n: int = 512,
    extra: dict[str, Callable[[], object]] | None = None,
    threads: int = 1,
) -> Roofline:
    """Time every kernel of ``impls`` (:func:`kernel_steps`, named ``"<impl> <kernel>"``), the
    STREAM-like steps, a matrix product (``"matmul"``) and ``extra`` in one interleaved run.

    Args:
        shape: the input shape (N, C, ...); the STREAM-like tensors have the same size.
        impls: implementations for :func:`kernel_steps`.
        device: where to run.
        rounds: interleaved rounds; each time is the median over them.
        matmul_n: the matrix size of the arithmetic-peak measurement.
        extra: more no-argument steps to time in the same rounds, by name.
        threads: torch threads while timing.
    """
    stream = stream_steps(shape, device)
    matmul, flops = matmul_step(matmul_n, device)
    steps = {f"{i} {k}": s for i in impls for k, s in kernel_steps(i, shape, device).items()}
    steps.update({name: step for name, (step, _) in stream.items()})
    steps["matmul"] = matmul
    steps.update(extra or {})
    samples = time_interleaved(steps, rounds=rounds, threads=threads)
    seconds = {name: statistics.median(s) for name, s in samples.items()}
    return Roofline(tuple(shape), seconds, {k: n for k, (_, n) in stream.items()}, flops)
