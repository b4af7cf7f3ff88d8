"""The first cell of every chapter: on Colab (or Binder) it installs bnlib, locally it does nothing.

The Colab path is tested for real: a fresh virtual environment in which ``import bnlib`` fails runs the
chapters' first cell, which pip-installs ``bnlib[book]`` from a ``file://`` URL (``BNLIB_SOURCE``; on
Colab it is the git URL), and then a short experiment imports the installed copy and checks it against
torch.

To stay fast, the fresh environment does not download numpy, torch & co. again: a ``.pth`` file makes
it see a folder of links to the packages of the test suite's own environment, minus every trace of
bnlib (its package, its ``.dist-info`` and its editable-install hook). So pip finds the dependencies
already satisfied, but bnlib itself is absent until the setup cell installs it, exactly as on Colab,
where numpy and torch come preinstalled and bnlib does not. (``venv --system-site-packages`` would not
do: the environment it shares already contains bnlib.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def setup_cell() -> str:
    """The first cell as CONTRIBUTING.md prescribes it (the fenced block after 'First cell')."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    after = text.split("First cell", 1)[1]
    block = re.search(r"```python\n(.*?)```", after, flags=re.DOTALL).group(1)
    lines = block.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines).strip()


def first_code_cell(notebook: Path) -> str:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            return "".join(cell["source"]).strip()
    return ""


CHAPTERS = sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", CHAPTERS)
def test_chapter_starts_with_the_setup_cell(notebook):
    assert first_code_cell(ROOT / "book" / notebook) == setup_cell(), (
        f"{notebook}: the first code cell must be CONTRIBUTING.md's setup cell, verbatim"
    )


def test_setup_cell_does_nothing_where_bnlib_is_installed(tmp_path):
    """Locally bnlib is installed: the cell must not call pip (an unusable source proves it does not)."""
    env = {**os.environ, "BNLIB_SOURCE": "file:///nonexistent/bnlib"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", setup_cell()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
    assert time.perf_counter() - start < 20


# --------------------------------------------------------------------------------------------------
# a fresh environment without bnlib


def _is_bnlib(name: str) -> bool:
    lowered = name.lower()
    return lowered == "bnlib" or lowered.startswith(("bnlib-", "__editable__", "__editable___bnlib"))


def _shadow_of_site_packages(folder: Path) -> Path:
    """Links to every package of this environment except bnlib's files."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if _is_bnlib(entry.name) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return folder


def _fresh_python(tmp_path: Path) -> Path:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shadow = _shadow_of_site_packages(tmp_path / "shared-packages")
    (Path(purelib) / "shared_packages.pth").write_text(f"{shadow}\n")
    return python


EXPERIMENT = """
import json, sys
import torch
import bnlib
import bnlib.present.plots

device = bnlib.setup(seed=0)
bnlib.present.plots.use_book_style()
x = (3 * torch.randn(64, 8) + 1).to(device)
ours, theirs = bnlib.BatchNorm1d(8).to(device), torch.nn.BatchNorm1d(8).to(device)
for _ in range(3):
    y_ours, y_theirs = ours(x), theirs(x)
ours.eval(); theirs.eval()
print(json.dumps({
    "bnlib": bnlib.__file__,
    "device": str(device),
    "train": (y_ours - y_theirs).abs().max().item(),
    "running_var": (ours.running_var - theirs.running_var).abs().max().item(),
    "eval": (ours(x) - theirs(x)).abs().max().item(),
}))
"""


@pytest.mark.slow
def test_setup_cell_installs_bnlib_in_a_fresh_environment(tmp_path, checkout_copy):
    python = _fresh_python(tmp_path)
    source = checkout_copy
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"))
    }
    env |= {"BNLIB_SOURCE": source.as_uri(), "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(code: str, timeout: int = 300):
        return subprocess.run(
            [str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )

    before = run("import importlib.util; print(importlib.util.find_spec('bnlib'))")
    assert before.returncode == 0, before.stderr
    assert before.stdout.strip() == "None", f"bnlib is already importable in the fresh environment: {before.stdout}"
    assert run("import torch, numpy, matplotlib, ipywidgets").returncode == 0, "the shared packages are not visible"

    installed = run(setup_cell())
    assert installed.returncode == 0, f"the setup cell failed:\n{installed.stdout}\n{installed.stderr}"

    result = run(EXPERIMENT, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["bnlib"]).resolve().is_relative_to((tmp_path / "venv").resolve()), (
        f"bnlib was imported from {report['bnlib']}, not from the fresh environment"
    )
    assert report["train"] < 1e-5 and report["eval"] < 1e-5 and report["running_var"] < 1e-5, report

    again = run(setup_cell(), timeout=60)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == "", "second run was not a no-op"
