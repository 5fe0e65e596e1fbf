import pytest

from console.accuracy import Proportion, parse_window, wilson_interval
from console.errors import InvalidRequestError


def test_wilson_interval_matches_its_closed_forms():
    # 0 of n: the upper bound is z^2 / (n + z^2) (Brown, Cai & DasGupta 2001).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.841459 / 13.841459), abs=1e-6)
    # p = 1/2 is symmetric about 1/2.
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((1 - 3.841459 / 13.841459, 1.0), abs=1e-6)
    low, high = wilson_interval(81, 263)
    assert low < 81 / 263 < high and high - low < 0.12


@pytest.mark.parametrize(("successes", "total"), [(0, 0), (3, 2), (-1, 4)])
def test_wilson_interval_refuses_impossible_counts(successes, total):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(successes, total)


def test_a_proportion_of_nothing_has_no_estimate():
    assert Proportion.of(0, 0) == Proportion(0, 0, None, None, None)
    assert Proportion.of(3, 4).estimate == 0.75


def test_window_is_7_30_or_all_and_defaults_to_30():
    assert [parse_window(v) for v in ("7", "30", "all", " ALL ", None)] == [7, 30, None, None, 30]
    with pytest.raises(InvalidRequestError, match="days must be one of 7, 30, all"):
        parse_window("14")
