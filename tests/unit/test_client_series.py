import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.registry import get_model
from client.series import (
    EARLY_FLAG_RULES,
    MIN_HEAD_FRACTION,
    decide_series,
    early_flag,
    rule_score,
    series_score,
)


def test_single_bright_slice_does_not_flag_a_series():
    # One busy skull-base slice scores high; its neighbours do not agree.
    result = series_score([0.05, 0.95, 0.1, 0.05, 0.04], [0.5] * 5)
    assert result.score == pytest.approx(0.1)
    assert result.max_slice == pytest.approx(0.95)


def test_two_neighbouring_high_slices_flag_the_series_and_name_the_key_slice():
    result = series_score([0.1, 0.2, 0.8, 0.9, 0.1], [0.5] * 5)
    assert result.score == pytest.approx(0.8)
    assert result.key_index == 3


def test_near_blank_slices_are_ignored():
    result = series_score([0.9, 0.9, 0.1, 0.1], [0.01, 0.02, 0.5, 0.5])
    assert result.score == pytest.approx(0.1)
    assert result.scored_slices == 2


def test_single_slice_series_scores_its_slice():
    assert series_score([0.7], [0.5]).score == pytest.approx(0.7)


def test_series_score_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        series_score([0.1, 0.2], [0.5])


def test_a_lone_image_is_decided_by_the_slice_threshold_a_series_by_the_series_threshold():
    """One decision for console and CLI: a one-slice study keeps the slice model's rule."""
    spec = get_model("mobilenet_v2")
    between = (spec.threshold + spec.series_threshold) / 2
    lone = decide_series(spec, [between], [0.5])
    assert (lone.method, lone.threshold) == ("single_slice", spec.threshold)
    assert lone.flagged == (between >= spec.threshold)
    pair = decide_series(spec, [between, between], [0.5, 0.5])
    assert (pair.method, pair.threshold) == (spec.series_rule, spec.series_threshold)
    assert pair.flagged == (between >= spec.series_threshold)
    assert lone.flagged != pair.flagged  # the thresholds differ, so the rule matters


def test_series_rules_score_the_same_slices_differently():
    """One lone spike: the maximum slice takes it, the neighbour pair does not."""
    p, head = [0.1, 0.9, 0.1, 0.3, 0.35, 0.95], [0.5, 0.5, 0.5, 0.5, 0.5, 0.05]
    assert rule_score("max_slice", p, head) == (0.9, 1)  # the last slice shows no head
    assert rule_score("neighbour_pair", p, head) == (0.3, 4)
    with pytest.raises(ValueError, match="unknown series rule"):
        rule_score("mean", p, head)


def test_the_series_decision_follows_the_models_recorded_rule():
    spec = get_model("mobilenet_v2")
    p, head = [0.05, 0.6, 0.2, 0.7, 0.65, 0.1], [0.5] * 6
    decision = decide_series(spec, p, head)
    assert decision.method == spec.series_rule
    assert (decision.score, decision.key_index) == rule_score(spec.series_rule, p, head)


_slices = st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=2, max_size=30)


@given(series=_slices, arrived=st.data())
@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet18"])
def test_an_early_flag_is_never_cleared_by_the_slices_still_to_come(model, series, arrived):
    """Whatever slices arrive later, in whatever order, the whole series is flagged too."""
    spec = get_model(model)
    order = arrived.draw(st.permutations(range(len(series))))
    count = arrived.draw(st.integers(2, len(series)))
    part = [series[i] for i in sorted(order[:count])]
    early = early_flag(spec, [p for p, _ in part], [h for _, h in part])
    if early is not None:
        whole = decide_series(spec, [p for p, _ in series], [h for _, h in series])
        assert whole.flagged
        assert whole.score >= early.score


def test_a_partial_series_above_the_threshold_is_flagged_early():
    spec = get_model("mobilenet_v2")
    assert spec.series_rule in EARLY_FLAG_RULES
    high = min(1.0, spec.series_threshold + 0.05)
    early = early_flag(spec, [0.01, high, 0.02], [0.5, 0.5, 0.5])
    assert early is not None and early.flagged and early.key_index == 1
    # Not on a slice too empty to count, nor on a lone image (decided by the slice threshold).
    assert early_flag(spec, [0.01, high], [0.5, MIN_HEAD_FRACTION / 2]) is None
    assert early_flag(spec, [high], [0.5]) is None


def test_the_neighbour_pair_can_fall_as_slices_arrive_so_it_never_flags_early():
    """A slice arriving between two agreeing neighbours splits the pair."""
    head = [0.5] * 3
    assert rule_score("neighbour_pair", [0.9, 0.9], head[:2])[0] == pytest.approx(0.9)
    assert rule_score("neighbour_pair", [0.9, 0.05, 0.9], head)[0] == pytest.approx(0.05)
    assert "neighbour_pair" not in EARLY_FLAG_RULES
