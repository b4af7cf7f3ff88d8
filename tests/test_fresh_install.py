"""A fresh install, as Binder makes one: a clean virtual environment, ``pip install -r requirements.txt``,
then a chapter's own first cells (the setup cell installs bnlib from the repository) and a short
experiment on real data.

Unlike ``tests/test_colab_setup.py`` (which borrows the test environment's packages to stay fast),
nothing here is shared: every dependency is installed by pip from the package index into an empty
environment (about a minute and a half, plus the download on a machine that has never fetched them).
So it runs only when asked: ``make fresh-install`` (``BNBOOK_FRESH_INSTALL=1``).

The exact versions of ``requirements-lock.txt`` are passed as constraints: Binder resolves the ranges
of requirements.txt to the newest releases, and the stored outputs are computed with the locked ones.
Set ``BNBOOK_FRESH_UNPINNED=1`` to install the ranges alone, as Binder does (then torch is the newest
release the index offers, which can be a large download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "formulas.ipynb"

pytestmark = pytest.mark.skipif(
    os.environ.get("BNBOOK_FRESH_INSTALL") != "1",
    reason="slow (installs every dependency afresh): run with `make fresh-install` (BNBOOK_FRESH_INSTALL=1)",
)

EXPERIMENT = """
import json
import torch
import bnlib, bnlib.lab.data, bnlib.lab.models

# a few steps of an MLP with bnlib's BN on real digits, and the same steps with torch.nn's BN
data = bnlib.lab.data.digits_8x8(standardize=True)
x, y = data.x_train[:256].to(device), data.y_train[:256].to(device)
losses = {}
for name, norm in [("bnlib", bnlib.BatchNorm1d), ("torch", torch.nn.BatchNorm1d)]:
    net = bnlib.lab.models.mlp([64, 32, 32, 10], "relu", norm, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    losses[name] = [loss.item(), torch.nn.functional.cross_entropy(net(x), y).item()]
print(json.dumps({"bnlib": bnlib.__file__, "device": str(device), "torch": torch.__version__, "losses": losses}))
"""


def chapter_cells(path: Path, count: int) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"][:count]


def test_fresh_environment_runs_a_chapter(tmp_path, checkout_copy):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BNBOOK_"))}
    env |= {"PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(args, timeout=900):
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    pins = [] if os.environ.get("BNBOOK_FRESH_UNPINNED") == "1" else ["-c", str(ROOT / "requirements-lock.txt")]
    start = time.perf_counter()
    done = run([str(python), "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements.txt"), *pins])
    install_s = time.perf_counter() - start
    assert done.returncode == 0, f"pip install -r requirements.txt failed:\n{done.stdout}\n{done.stderr}"
    missing = run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('bnlib'))"])
    assert missing.stdout.strip() == "None", "bnlib must not be installed before the setup cell runs"

    # the chapter's own first two cells: the setup cell installs bnlib[book] from BNLIB_SOURCE
    # (on Binder and Colab the repository's git URL; here a copy of the working tree)
    setup, second = chapter_cells(CHAPTER, 2)
    assert "BNLIB_SOURCE" in setup and "bnlib.setup" in second
    env["BNLIB_SOURCE"] = checkout_copy.as_uri()
    start = time.perf_counter()
    result = run([str(python), "-c", "\n".join([setup, second, EXPERIMENT])])
    experiment_s = time.perf_counter() - start
    assert result.returncode == 0, f"the chapter's cells failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["bnlib"]).resolve().is_relative_to(env_dir.resolve()), report["bnlib"]
    (bn_train, bn_eval), (t_train, t_eval) = report["losses"]["bnlib"], report["losses"]["torch"]
    assert abs(bn_train - t_train) < 1e-4 and abs(bn_eval - t_eval) < 1e-4, report["losses"]
    assert bn_train < 1.5, f"20 steps should bring the loss well below log(10) = 2.30, got {bn_train:.3f}"

    check = run([str(python), "-m", "pip", "check"])
    assert check.returncode == 0, f"inconsistent dependencies:\n{check.stdout}"
    print(
        f"\nfresh install: pip install -r requirements.txt {install_s:.0f} s, setup cell + experiment "
        f"{experiment_s:.0f} s (torch {report['torch']}, device {report['device']}; machine under load)"
    )


def test_python_is_supported():
    assert sys.version_info >= (3, 10), "the book needs Python 3.10 or newer (pyproject.toml)"
