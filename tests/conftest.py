"""Shared test fixtures."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "bnlib")  # what pip needs to build bnlib


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """The package as pip would get it from the repository: a copy of its files (no build litter)."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in PACKAGE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, copy / name)
    return copy


@pytest.fixture(autouse=True)
def seeded_global_rng() -> None:
    """Every test starts from the same global torch RNG state, whichever worker runs it and in what order."""
    import torch

    torch.manual_seed(0)
