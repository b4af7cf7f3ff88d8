"""bnlib.lab.seeds: the multi-seed runner and the spread chapters report."""

import math

import pytest

from bnlib.lab.seeds import Spread, default_seeds, over_seeds


def test_over_seeds_runs_each_seed_once_in_order_and_keeps_every_result():
    calls = []
    runs = over_seeds(lambda seed: calls.append(seed) or {"x": seed * 2.0}, [3, 1, 2])
    assert calls == [3, 1, 2] and runs.seeds == (3, 1, 2)
    assert runs[1] == {"x": 2.0}
    assert list(runs.spread("x")) == [6.0, 2.0, 4.0]
    assert list(runs.spread(lambda r: r["x"] + 1)) == [7.0, 3.0, 5.0]
    assert runs.stack(lambda r: [r["x"], 0.0]).shape == (3, 2)


def test_over_seeds_defaults_to_three_seeds_and_five_at_full_scale(monkeypatch):
    monkeypatch.delenv("BNBOOK_SCALE", raising=False)
    monkeypatch.delenv("BNBOOK_FIRST_SEED", raising=False)
    assert over_seeds(lambda s: s).seeds == (0, 1, 2)
    monkeypatch.setenv("BNBOOK_SCALE", "full")
    assert default_seeds() == [0, 1, 2, 3, 4]


def test_first_seed_moves_every_default_seed_at_both_scales(monkeypatch):
    monkeypatch.delenv("BNBOOK_SCALE", raising=False)
    monkeypatch.setenv("BNBOOK_FIRST_SEED", "3")
    assert default_seeds() == [3, 4, 5]
    assert over_seeds(lambda s: s).seeds == (3, 4, 5)
    monkeypatch.setenv("BNBOOK_SCALE", "full")
    assert default_seeds() == [3, 4, 5, 6, 7]
    monkeypatch.setenv("BNBOOK_FIRST_SEED", "")
    assert default_seeds() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("value", ["-1", "three", "1.5"])
def test_first_seed_rejects_what_is_not_a_non_negative_integer(monkeypatch, value):
    monkeypatch.setenv("BNBOOK_FIRST_SEED", value)
    with pytest.raises(ValueError, match="BNBOOK_FIRST_SEED must be a non-negative integer"):
        default_seeds()


@pytest.mark.parametrize("seeds, match", [([], "at least one"), ([1, 1], "distinct")])
def test_over_seeds_rejects_bad_seed_lists(seeds, match):
    with pytest.raises(ValueError, match=match):
        over_seeds(lambda s: s, seeds)


def test_missing_seed_is_a_key_error_that_names_the_seeds():
    with pytest.raises(KeyError, match=r"seed 7 was not run \(seeds: \[0, 1\]\)"):
        over_seeds(lambda s: s, [0, 1])[7]


def test_spread_of_a_non_scalar_quantity_fails():
    with pytest.raises(ValueError, match="scalar"):
        over_seeds(lambda s: [s, s], [0, 1]).spread(lambda r: r)


def test_spread_summaries_and_text():
    s = Spread.of([0.9, 0.93, 0.92], seeds=[0, 1, 2])
    assert math.isclose(s.mean, 0.9166666, rel_tol=1e-6) and s.min == 0.9 and s.max == 0.93
    assert math.isclose(s.range, 0.03)
    assert f"{s:.3f}" == "0.917 (0.900-0.930)"
    assert f"{Spread.of([0.5]):.2f}" == "0.50"
    assert s.count(lambda v: v > 0.91) == 2
    assert list(s.map(lambda v: 2 * v)) == [1.8, 1.86, 1.84]


def test_spread_needs_values_matching_seeds():
    with pytest.raises(ValueError, match="at least one"):
        Spread.of([])
    with pytest.raises(ValueError, match="2 values for 3 seeds"):
        Spread((1.0, 2.0), (0, 1, 2))


def test_geometric_mean_averages_ratios_symmetrically_and_rejects_non_positive_values():
    assert Spread.of([2.0, 0.5]).geometric_mean == pytest.approx(1.0)
    assert Spread.of([1.0, 4.0, 16.0]).geometric_mean == pytest.approx(4.0)
    with pytest.raises(ValueError, match="positive values"):
        _ = Spread.of([1.0, 0.0]).geometric_mean
