"""bnlib.report: rounding helpers and tables."""

import math

import pytest

from bnlib.report import Table, bound, upper_decade


@pytest.mark.parametrize("x, expected", [(2.4e-7, 1e-6), (1e-6, 1e-6), (0.99, 1.0), (-3e-3, 1e-2), (0.0, 0.0)])
def test_upper_decade(x, expected):
    assert math.isclose(upper_decade(x), expected)


def test_upper_decade_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        upper_decade(float("nan"))


def test_bound_text():
    assert bound(0.0) == "0"
    assert bound(3e-9) == "< 1e-08"


def test_table_renders_text_and_html_and_checks_rows():
    t = Table(["a", "b"], [[1, "<x>"]], caption="cap")
    assert repr(t).splitlines() == ["cap", "a  b", "-  ---", "1  <x>"]
    assert "<td>&lt;x&gt;</td>" in t._repr_html_()
    with pytest.raises(ValueError, match="2 cells"):
        Table(["a", "b"], [[1]])


def test_glue_stores_plain_python_numbers(monkeypatch):
    import numpy as np
    import torch

    import bnlib.report

    stored = {}
    monkeypatch.setattr("myst_nb.glue", lambda name, value, display=False: stored.__setitem__(name, value))
    bnlib.report.glue("a", np.float64(0.25))
    bnlib.report.glue("b", torch.tensor(3))
    bnlib.report.glue("c", 0.1234567891)
    bnlib.report.glue("d", float("inf"))
    assert repr(stored["a"]) == "0.25" and repr(stored["b"]) == "3"
    assert stored["c"] == 0.123457 and stored["d"] == float("inf")
