"""bnlib.present.setup: what a chapter's second cell fixes before anything runs."""

import pytest
import torch

import bnlib
from bnlib.present import setup


def test_setup_fixes_threads_seeds_and_float32_on_gpus():
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults for convolutions; setup turns both off
    torch.backends.cuda.matmul.allow_tf32 = True
    threads = torch.get_num_threads()
    try:
        device = setup.setup(seed=3, prefer="cpu")
        assert device == torch.device("cpu") and torch.get_num_threads() == 1
        first = torch.rand(3)
        setup.setup(seed=3, prefer="cpu")
        assert torch.equal(first, torch.rand(3)), "the seed makes runs repeatable"
        # TF32 would compute convolutions and products on a GPU with a 10-bit mantissa
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="threads"):
        setup.setup(threads=0)
    assert bnlib.setup is setup.setup
