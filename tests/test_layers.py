"""The architecture's rule that import-linter cannot see: the package root. Importing the library
(bnlib.norm, or bnlib itself) must not load the lab or the presentation layer."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["bnlib", "bnlib.norm", "bnlib.norm.functional"])
def test_importing_the_library_loads_neither_lab_nor_present(module):
    code = (
        f"import sys, {module}\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('bnlib.lab', 'bnlib.present', 'bnlib.bench')))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {module} also loaded {out.strip()}"


def test_the_chapter_setup_is_still_reachable_from_the_root():
    import bnlib
    from bnlib.present import setup

    assert bnlib.setup is setup.setup and bnlib.full_scale is setup.full_scale
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        bnlib.nonexistent  # noqa: B018
