"""Run a function in several local processes joined by a gloo process group.

Built on ``torch.multiprocessing.start_processes``. The processes meet through a file in a fresh
temporary directory (``init_method="file://..."``) rather than a TCP port, so there is no race for
a free port between choosing one and binding it.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["default_start_method", "launch", "run_several"]


def _worker(rank: int, world_size: int, store: str, fn: Callable, args: tuple, results, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    results.put((rank, pickle.dumps(result)))  # bytes: tensors copied, not shared with a dying process


def default_start_method() -> str:
    """How :func:`launch` starts its processes unless told: "fork" on Linux while this process has
    not used CUDA, else "spawn".

    Forking is unsafe on macOS, and after CUDA work (autograd's device threads, the CUDA context)
    a forked child fails at its first backward pass.
    """
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout_s: float = 120.0,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined by a gloo process
    group, and return their results in rank order.

    Args:
        fn: the function each process runs; with ``"spawn"`` it must be importable from a module.
        world_size: the number of processes.
        args: further arguments of ``fn`` (picklable).
        timeout_s: give up (RuntimeError) when the processes have not finished by then.
        start_method: by default :func:`default_start_method`: "fork" on Linux (children start in
            about a second, sharing what the parent has imported) unless CUDA is in use, else
            "spawn", which starts fresh interpreters.

    Raises:
        RuntimeError: a process failed (its traceback is in the message) or ran out of time.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if start_method is None:
        start_method = default_start_method()
    if start_method == "fork":  # the first optimizer imports torch._dynamo (seconds): do it once, here
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    results = mp.get_context(start_method).SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        with warnings.catch_warnings():  # Python >= 3.12 warns about forking a multi-threaded kernel
            warnings.simplefilter("ignore", DeprecationWarning)
            context = mp.start_processes(
                _worker,
                args=(world_size, store, fn, args, results, timeout_s),
                nprocs=world_size,
                join=False,
                start_method=start_method,
            )
        deadline = time.monotonic() + timeout_s
        answers: dict[int, bytes] = {}

        def collect() -> None:  # read results as they come: a large one fills the pipe until read
            while not results.empty():
                rank, payload = results.get()
                answers[rank] = payload

        try:
            while not context.join(timeout=0.1):  # raises ProcessRaisedException with the traceback
                collect()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no result within {timeout_s} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            raise RuntimeError(f"a launched process failed:\n{error}") from None
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        collect()
    return [pickle.loads(answers[rank]) for rank in range(world_size)]


def run_several(rank: int, world_size: int, calls: Sequence[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` for every ``(fn, args)`` in ``calls``, one after the other
    in the same process group, and return their results in order: one :func:`launch` (starting
    processes costs more than most experiments) for several.

    Args:
        rank: this process (given by :func:`launch`).
        world_size: the number of processes (likewise).
        calls: ``(fn, args)`` pairs, e.g. ``launch(run_several, 2, ([(f, ()), (g, (x,))],))``.
    """
    return [fn(rank, world_size, *args) for fn, args in calls]
