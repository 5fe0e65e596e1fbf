"""Study-level triage score from slice scores, robust to one busy slice.

A whole head series from skull base to vertex has many slices with no bleed,
and skull-base slices are bright and busy, so the maximum slice score turns a
single bone-artefact slice into a false alarm. The series score therefore asks
for agreement between neighbouring slices: it is the highest value of
``min(p[i], p[i+1])`` over adjacent pairs of slices that show enough head (a
bleed 5 mm thick or more spans two 5 mm slices; an artefact rarely repeats).
Near-blank slices (vertex caps, table-only frames) are ignored. A single-slice
"series" scores its only slice.

    result = series_score([0.1, 0.8, 0.9, 0.2], [0.4, 0.5, 0.5, 0.4])
    result.score, result.key_index          # 0.8, 2

Whether a study is flagged is decided in one place, :func:`decide_series`, for
the console worker and ``python -m client classify --series`` alike: a lone
image keeps the slice model's probability and slice threshold, a series gets
the score of the model's series rule and the series threshold. The rule
(:data:`SERIES_RULES`: the neighbour pair, or the maximum slice over slices that
show enough head) is chosen per model by nested cross-validation
(``python -m build_engines series``) and recorded in its weights sidecar.

    decision = decide_series(spec, probabilities, head_fractions)
    decision.flagged, decision.score, decision.threshold, decision.key_index

A series still arriving (a thin series of 250+ slices takes a while) may be
flagged before its last slice: :func:`early_flag` raises the flag only when no
slice still to come can clear it, which holds for the maximum-slice rule
(:data:`EARLY_FLAG_RULES`) and not for the neighbour pair, whose pair a slice
arriving between two neighbours can split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.registry import ModelSpec

#: Slices whose head covers less of the model view than this are not scored.
MIN_HEAD_FRACTION = 0.12
#: Slice logits are clipped to this magnitude before the series model reads them.
MAX_LOGIT = 8.0


@dataclass(frozen=True)
class SeriesScore:
    """Aggregated score of one series.

    Attributes:
        score: Series-level score in [0, 1], compared with the series threshold.
        key_index: Index (in the given order) of the slice that carries the score.
        max_slice: The plain maximum over scored slices, for display.
        scored_slices: How many slices counted (enough head in view).
    """

    score: float
    key_index: int
    max_slice: float
    scored_slices: int


def series_score(probabilities: Sequence[float], head_fractions: Sequence[float]) -> SeriesScore:
    """Aggregate slice probabilities of one series, ordered along the body axis.

    Args:
        probabilities: P(hemorrhage) per slice, in anatomical order.
        head_fractions: Share of each slice's model view covered by head.

    Returns:
        The series score and its key slice.

    Raises:
        ValueError: no slices, or the two sequences differ in length.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    head = np.asarray(head_fractions, dtype=np.float64)
    if p.size == 0 or p.shape != head.shape:
        raise ValueError("series_score needs one head fraction per slice, and at least one slice")
    scored = np.flatnonzero(head >= MIN_HEAD_FRACTION)
    if scored.size == 0:  # nothing but blanks: fall back to every slice
        scored = np.arange(p.size)
    sp = p[scored]
    max_index = int(scored[np.argmax(sp)])
    if sp.size == 1:
        return SeriesScore(float(sp[0]), max_index, float(sp[0]), 1)
    pair = np.minimum(sp[:-1], sp[1:])
    best = int(np.argmax(pair))
    key = int(scored[best] if sp[best] >= sp[best + 1] else scored[best + 1])
    return SeriesScore(float(pair[best]), key, float(sp.max()), int(sp.size))


def series_features(
    probabilities: Sequence[float],
    head_fractions: Sequence[float],
    embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """The series model's input: one row per slice, in anatomical order.

    Columns: the slice logit (clipped to +-8), the head fraction, the position
    along the series (0 at the first slice, 1 at the last), then the slice
    embedding when the series model reads one.

    Returns:
        float32 array (T, 3) or (T, 3 + D).
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    logit = np.clip(np.log(p / (1 - p)), -MAX_LOGIT, MAX_LOGIT)
    head = np.asarray(head_fractions, dtype=np.float64)
    position = np.linspace(0.0, 1.0, p.size) if p.size > 1 else np.zeros(1)
    columns = [np.stack([logit, head, position], axis=1)]
    if embeddings is not None:
        columns.append(np.asarray(embeddings, dtype=np.float64).reshape(p.size, -1))
    return np.concatenate(columns, axis=1).astype(np.float32)


#: The series rules a model can be served with, by name.
SERIES_RULES = ("neighbour_pair", "max_slice")
#: Rules whose score never falls as slices are added, so a partial series may be flagged.
EARLY_FLAG_RULES = ("max_slice",)


def rule_score(rule: str, probabilities: Sequence[float], head_fractions: Sequence[float]):
    """``(score, key_index)`` of one series under ``rule`` (one of :data:`SERIES_RULES`).

    Raises:
        ValueError: an unknown rule, no slices, or mismatched sequences.
    """
    result = series_score(probabilities, head_fractions)
    if rule == "neighbour_pair":
        return result.score, result.key_index
    if rule == "max_slice":
        p = np.asarray(probabilities, dtype=np.float64)
        head = np.asarray(head_fractions, dtype=np.float64)
        scored = np.flatnonzero(head >= MIN_HEAD_FRACTION)
        if scored.size == 0:
            scored = np.arange(p.size)
        key = int(scored[np.argmax(p[scored])])
        return float(p[key]), key
    raise ValueError(f"unknown series rule {rule!r}; choose one of {', '.join(SERIES_RULES)}")


@dataclass(frozen=True)
class SeriesDecision:
    """The triage decision on one study.

    Attributes:
        score: The score compared with ``threshold``.
        threshold: The slice threshold for a lone image, else the series threshold.
        flagged: ``score >= threshold``.
        key_index: Index (in the given order) of the slice that carries the score.
        method: ``single_slice``, or the series rule (:data:`SERIES_RULES`).
        scored_slices: How many slices counted (enough head in view).
    """

    score: float
    threshold: float
    flagged: bool
    key_index: int
    method: str
    scored_slices: int


def decide_series(
    spec: ModelSpec, probabilities: Sequence[float], head_fractions: Sequence[float]
) -> SeriesDecision:
    """Flag or clear one study from its classified slices, in anatomical order.

    Raises:
        ValueError: no slices, or the two sequences differ in length.
    """
    result = series_score(probabilities, head_fractions)
    if len(probabilities) == 1:
        method, threshold = "single_slice", spec.threshold
        score, key = result.score, result.key_index
    else:
        method, threshold = spec.series_rule, spec.series_threshold
        score, key = rule_score(method, probabilities, head_fractions)
    return SeriesDecision(score, threshold, score >= threshold, key, method, result.scored_slices)


def early_flag(
    spec: ModelSpec, probabilities: Sequence[float], head_fractions: Sequence[float]
) -> SeriesDecision | None:
    """The flag of a series whose other slices are still to come, if none of them can clear it.

    Under a rule of :data:`EARLY_FLAG_RULES` the score of the whole series is
    at least the score of any part of it, provided the key slice shows enough
    head to be scored (slices that do not are counted only while no slice
    does). Two slices at least: the whole series is then a series, decided by
    the series rule and threshold, never the lone-image one.

    Returns:
        The decision on the slices so far when it flags and cannot be undone, else None.
    """
    if spec.series_rule not in EARLY_FLAG_RULES or len(probabilities) < 2:
        return None
    decision = decide_series(spec, probabilities, head_fractions)
    if decision.flagged and head_fractions[decision.key_index] >= MIN_HEAD_FRACTION:
        return decision
    return None
