import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.errors import UnknownModelError
from client.registry import get_model
from client.series import (
    EARLY_FLAG_RULES,
    MIN_HEAD_FRACTION,
    SERIES_MODEL_FALLBACK,
    SERIES_MODEL_RULE,
    SERIES_RULES,
    decide_series,
    early_flag,
    rule_score,
    series_features,
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


#: A series whose middle slices look like a bleed, the first and last show little head.
_BUMP = ([0.02, 0.1, 0.55, 0.8, 0.6, 0.2, 0.05], [0.05, 0.3, 0.45, 0.5, 0.45, 0.3, 0.08])


def test_a_series_model_decides_its_series_and_refines_every_slice():
    from client.classify import LocalSeriesModel

    spec = get_model("resnet18", series_rule=SERIES_MODEL_RULE)
    assert spec.series_threshold == spec.series_thresholds[SERIES_MODEL_RULE]
    p, head = _BUMP
    series_model = LocalSeriesModel(spec)
    refined, probability = series_model.refine_series(series_features(p, head))
    decision = decide_series(spec, p, head, series_model)
    assert (decision.method, decision.threshold) == (SERIES_MODEL_RULE, spec.series_threshold)
    assert decision.score == pytest.approx(probability)
    assert decision.flagged == (probability >= spec.series_threshold)
    assert decision.refined == pytest.approx(list(refined))
    assert len(decision.refined) == len(p)
    # The key slice is the most suspicious refined slice among those that show enough head.
    shown = [i for i, h in enumerate(head) if h >= MIN_HEAD_FRACTION]
    assert decision.key_index == max(shown, key=lambda i: refined[i])
    # A lone image is still the slice model's call.
    assert decide_series(spec, [p[3]], [head[3]], series_model).method == "single_slice"
    # The series model reads the whole series: it never flags one early.
    assert early_flag(spec, p[:4], head[:4]) is None


def test_without_its_series_model_a_series_is_decided_at_the_slice_threshold():
    """The series model's server is away: a false alarm rather than a missed bleed."""
    spec = get_model("resnet18", series_rule=SERIES_MODEL_RULE)
    p, head = _BUMP
    decision = decide_series(spec, p, head, refiner=None)
    assert (decision.method, decision.threshold) == (SERIES_MODEL_FALLBACK, spec.threshold)
    assert (decision.score, decision.key_index) == rule_score("max_slice", p, head)
    assert decision.refined is None


def test_a_site_may_choose_any_recorded_series_rule_at_its_own_threshold():
    default = get_model("mobilenet_v2")
    assert set(default.series_thresholds) == {*SERIES_RULES, SERIES_MODEL_RULE}
    assert default.series_threshold == default.series_thresholds[default.series_rule]
    for rule, threshold in default.series_thresholds.items():
        chosen = get_model("mobilenet_v2", series_rule=rule)
        assert (chosen.series_rule, chosen.series_threshold) == (rule, threshold)
        assert (chosen.name, chosen.threshold) == (default.name, default.threshold)
    with pytest.raises(UnknownModelError, match="no threshold for series rule 'mean'"):
        get_model("mobilenet_v2", series_rule="mean")


def test_a_site_may_set_the_series_threshold_it_validated_and_nothing_outside_0_to_1():
    recorded = get_model("mobilenet_v2", series_rule="neighbour_pair")
    site = get_model("mobilenet_v2", series_rule="neighbour_pair", series_threshold=0.62)
    assert (site.series_rule, site.series_threshold) == ("neighbour_pair", 0.62)
    assert site.threshold == recorded.threshold  # lone images keep the slice threshold
    probabilities, head = [0.1, 0.6, 0.61, 0.1], [0.5] * 4
    assert recorded.series_threshold <= 0.6  # the pair (0.6, 0.61) flags at the recorded one
    assert decide_series(recorded, probabilities, head).flagged
    assert not decide_series(site, probabilities, head).flagged
    assert get_model("mobilenet_v2", series_threshold="").series_threshold == (
        get_model("mobilenet_v2").series_threshold
    )
    for wrong in (0, 1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match=r"a series threshold is a number in \(0, 1\]"):
            get_model("mobilenet_v2", series_threshold=wrong)
