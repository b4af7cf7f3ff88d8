"""Notebook outputs are compared portably (tests/portable_outputs.py) wherever nbval runs."""

from tests.portable_outputs import install

install()
