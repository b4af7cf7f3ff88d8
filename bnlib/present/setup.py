"""A chapter's setup: where tensors live, how runs are made repeatable, and at which scale."""

from __future__ import annotations

import random

import numpy as np
import torch

from bnlib.lab.scale import full_scale, scale

__all__ = ["full_scale", "pick_device", "seed_everything", "setup"]


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when available (or ``prefer`` when given, e.g. "cpu"), else the CPU.

    Args:
        prefer: a device name that overrides the choice; None to choose.
    """
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices).

    Args:
        seed: the seed for all three.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, threads: int = 1, prefer: str | None = None) -> torch.device:
    """Prepare a chapter: fixed seeds, a fixed number of CPU threads, and the device to use.

    It also checks the scale switch (``BNBOOK_SCALE``; :func:`full_scale` reads it), so that a
    misspelt value fails here rather than silently running the quick scale.

    Float reductions can change with the number of threads, so the book runs with one
    thread by default: stored outputs then match wherever they are re-executed on a CPU. On a GPU
    it turns TF32 off (convolutions and matrix products in float32, not with a 10-bit mantissa),
    so that CUDA computes in the precision the stored CPU outputs were made in.

    Args:
        seed: the seed of Python's, NumPy's and torch's generators.
        threads: torch's number of CPU threads.
        prefer: a device name that overrides the choice (see :func:`pick_device`).

    Returns:
        The device the chapter's tensors go to.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    scale()
    torch.set_num_threads(threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    seed_everything(seed)
    return pick_device(prefer)
