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
the score of the model's series rule and that rule's series threshold. The
default rule is chosen per model by ``python -m build_engines series`` (nested
cross-validation; it must also flag the held-out CQ500 bleed) and recorded in
its weights sidecar with every servable rule's threshold, so a site may choose
another (:func:`client.registry.get_model`). A rule is a fixed one
(:data:`SERIES_RULES`: the neighbour pair, or the maximum slice over slices
that show enough head), or
:data:`SERIES_MODEL_RULE`, the model's series model (``<base>_series``, a small
sequence model over the slices' logits, head fractions and positions), which a
:class:`SeriesRefiner` runs: in-process for ``--local``, on Triton otherwise.
It also refines every slice's probability with its neighbours' context.

    decision = decide_series(spec, probabilities, head_fractions, classifier)
    decision.flagged, decision.score, decision.threshold, decision.key_index
    decision.refined                    # per-slice, when the series model decided

A series still arriving (a thin series of 250+ slices takes a while) may be
flagged before its last slice: :func:`early_flag` raises the flag only when no
slice still to come can clear it, which holds for the maximum-slice rule
(:data:`EARLY_FLAG_RULES`) and not for the neighbour pair, whose pair a slice
arriving between two neighbours can split, nor for the series model, which
reads the whole series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from client.errors import HemoTriageError
from client.registry import ModelSpec

logger = logging.getLogger(__name__)

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
    scored = _scored_indices(head)
    sp = p[scored]
    max_index = int(scored[np.argmax(sp)])
    if sp.size == 1:
        return SeriesScore(float(sp[0]), max_index, float(sp[0]), 1)
    pair = np.minimum(sp[:-1], sp[1:])
    best = int(np.argmax(pair))
    key = int(scored[best] if sp[best] >= sp[best + 1] else scored[best + 1])
    return SeriesScore(float(pair[best]), key, float(sp.max()), int(sp.size))


def _scored_indices(head: np.ndarray) -> np.ndarray:
    """Slices that show enough head to be scored; every slice when none does (all blanks)."""
    scored = np.flatnonzero(head >= MIN_HEAD_FRACTION)
    return scored if scored.size else np.arange(head.size)


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


#: The fixed series rules, by name: they need nothing but the slice probabilities.
SERIES_RULES = ("neighbour_pair", "max_slice")
#: The rule that asks the model's series model (``<base>_series``) for the series score.
SERIES_MODEL_RULE = "series_model"
#: How a series under :data:`SERIES_MODEL_RULE` is decided while its series model cannot
#: be reached: its highest slice that shows enough head against the slice threshold (the
#: lone-image operating point, meant to be paid in false alarms rather than missed bleeds;
#: the model card gives its out-of-fold cost), so no study waits for the series model.
SERIES_MODEL_FALLBACK = "max_slice_at_slice_threshold"
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
        scored = _scored_indices(head)
        key = int(scored[np.argmax(p[scored])])
        return float(p[key]), key
    raise ValueError(f"unknown series rule {rule!r}; choose one of {', '.join(SERIES_RULES)}")


class SeriesRefiner(Protocol):
    """Runs a model's series model: in-process (``LocalClassifier``) or on Triton."""

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """(T, F) :func:`series_features` to (T,) refined slice probabilities and P(series)."""
        ...


@dataclass(frozen=True)
class SeriesDecision:
    """The triage decision on one study.

    Attributes:
        score: The score compared with ``threshold``.
        threshold: The slice threshold for a lone image, else the series threshold.
        flagged: ``score >= threshold``.
        key_index: Index (in the given order) of the slice that carries the score.
        method: ``single_slice``, a fixed rule (:data:`SERIES_RULES`),
            :data:`SERIES_MODEL_RULE` or :data:`SERIES_MODEL_FALLBACK`.
        scored_slices: How many slices counted (enough head in view).
        refined: Each slice's probability refined by the series model, in the
            given order, when the series model decided; else None.
    """

    score: float
    threshold: float
    flagged: bool
    key_index: int
    method: str
    scored_slices: int
    refined: tuple[float, ...] | None = None


def decide_series(
    spec: ModelSpec,
    probabilities: Sequence[float],
    head_fractions: Sequence[float],
    refiner: SeriesRefiner | None = None,
) -> SeriesDecision:
    """Flag or clear one study from its classified slices, in anatomical order.

    A series under :data:`SERIES_MODEL_RULE` is scored by ``refiner``, whose
    key slice is the scored slice (enough head) with the highest refined
    probability. Without a ``refiner``, or when it fails (the server is down),
    the series is decided by :data:`SERIES_MODEL_FALLBACK` and the log says why.

    Raises:
        ValueError: no slices, or the two sequences differ in length.
    """
    result = series_score(probabilities, head_fractions)
    refined = None
    if len(probabilities) == 1:
        method, threshold = "single_slice", spec.threshold
        score, key = result.score, result.key_index
    elif spec.series_rule == SERIES_MODEL_RULE:
        features = series_features(probabilities, head_fractions)
        try:
            if refiner is None:
                raise HemoTriageError("no series model was given")
            slices, score = refiner.refine_series(features)
        except HemoTriageError as e:
            logger.warning(
                "%s: series model unavailable (%s); deciding by %s",
                spec.name,
                e,
                SERIES_MODEL_FALLBACK,
            )
            method, threshold = SERIES_MODEL_FALLBACK, spec.threshold
            score, key = rule_score("max_slice", probabilities, head_fractions)
        else:
            method, threshold = SERIES_MODEL_RULE, spec.series_threshold
            refined = tuple(float(p) for p in slices)
            scored = _scored_indices(np.asarray(head_fractions, dtype=np.float64))
            key = int(scored[np.argmax(np.asarray(refined)[scored])])
    else:
        method, threshold = spec.series_rule, spec.series_threshold
        score, key = rule_score(method, probabilities, head_fractions)
    return SeriesDecision(
        score, threshold, score >= threshold, key, method, result.scored_slices, refined
    )


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
