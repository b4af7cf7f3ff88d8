"""bnlib.present.report: rounding helpers and tables."""

import math

import pytest

from bnlib.present.report import Table, bound, upper_decade


@pytest.mark.parametrize("x, expected", [(2.4e-7, 1e-6), (1e-6, 1e-6), (0.99, 1.0), (-3e-3, 1e-2), (0.0, 0.0)])
def test_upper_decade(x, expected):
    assert math.isclose(upper_decade(x), expected)


def test_upper_decade_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        upper_decade(float("nan"))


def test_bound_text_depends_only_on_the_bound():
    assert bound(0.0, below=1e-12) == bound(9.9e-13, below=1e-12) == bound(-3e-16, below=1e-12) == "< 1e-12"


@pytest.mark.parametrize("x", [1e-12, 2e-3, float("nan"), float("inf")])
def test_bound_fails_loudly_when_the_value_is_not_below_it(x):
    with pytest.raises(ValueError, match="not below"):
        bound(x, below=1e-12)


def test_bound_needs_a_positive_bound():
    with pytest.raises(ValueError, match="positive"):
        bound(0.0, below=0.0)


def test_table_renders_text_and_html_and_checks_rows():
    t = Table(["a", "b"], [[1, "<x>"]], caption="cap")
    assert repr(t).splitlines() == ["cap", "a  b", "-  ---", "1  <x>"]
    assert "<td>&lt;x&gt;</td>" in t._repr_html_()
    with pytest.raises(ValueError, match="2 cells"):
        Table(["a", "b"], [[1]])


def test_glue_stores_plain_python_numbers(monkeypatch):
    import numpy as np
    import torch

    import bnlib.present.report

    stored = {}
    monkeypatch.setattr("myst_nb.glue", lambda name, value, display=False: stored.__setitem__(name, value))
    bnlib.present.report.glue("a", np.float64(0.25))
    bnlib.present.report.glue("b", torch.tensor(3))
    bnlib.present.report.glue("c", 0.1234567891)
    bnlib.present.report.glue("d", float("inf"))
    assert repr(stored["a"]) == "0.25" and repr(stored["b"]) == "3"
    assert stored["c"] == 0.123457 and stored["d"] == float("inf")


class _Display:
    """Captures what bnlib.present.report.glue sends to IPython's display for a value with a tolerance."""

    def __init__(self, monkeypatch):
        import IPython.display

        self.records = []
        def display(data, raw, metadata):
            self.records.append((data, metadata))

        monkeypatch.setattr(IPython.display, "display", display)

    def by_name(self) -> dict:
        return {m["scrapbook"]["name"]: (d, m) for d, m in self.records}


def test_glue_with_a_tolerance_stores_it_beside_the_value(monkeypatch):
    import bnlib.present.report

    shown = _Display(monkeypatch)
    bnlib.present.report.glue("acc", 0.91234567, tol=0.02)
    data, meta = shown.by_name()["acc"]
    assert data == {"application/papermill.record/text/plain": "0.912346"}
    assert meta["bnbook"] == {"tolerance": 0.02} and meta["scrapbook"]["mime_prefix"] == "application/papermill.record/"


def test_glue_of_a_spread_stores_mean_and_range_with_the_range_as_tolerance(monkeypatch):
    import bnlib.present.report
    from bnlib.lab.seeds import Spread

    shown = _Display(monkeypatch)
    bnlib.present.report.glue("acc", Spread.of([0.90, 0.93, 0.92]))
    bnlib.present.report.glue("steps", Spread.of([200, 200, 200]), resolution=20)
    got = shown.by_name()
    assert got["acc"][0]["application/papermill.record/text/plain"] == "0.916667"
    assert got["acc-min"][0]["application/papermill.record/text/plain"] == "0.9"
    assert got["acc-max"][0]["application/papermill.record/text/plain"] == "0.93"
    assert all(abs(got[k][1]["bnbook"]["tolerance"] - 0.03) < 1e-12 for k in ("acc", "acc-min", "acc-max"))
    assert got["steps"][1]["bnbook"]["tolerance"] == 20  # the recording interval, not 0


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf")])
def test_glue_rejects_a_bad_tolerance(tol):
    import bnlib.present.report

    with pytest.raises(ValueError, match="tol"):
        bnlib.present.report.glue("x", 1.0, tol=tol)
