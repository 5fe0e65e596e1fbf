"""How the model does on this site's own patients, from the readers' feedback.

Per model version (the version recorded with each verdict), over the studies
received in a window of days: the positive predictive value (confirmed flags
of reviewed flags), the false-positive rate (false flags of reviewed flags, the
share of alarms that were wrong), and the number of confirmed misses (negative
studies a reader marked as a missed hemorrhage). Only a study's last verdict
counts. Proportions carry Wilson score 95% intervals, which stay inside [0, 1]
and behave with the handful of reviews a site has in its first weeks
(Wilson 1927; Brown, Cai & DasGupta 2001, Statistical Science 16:101).

    rows = accuracy_by_version(db, days=30, now=time.time())
    rows[0].ppv.estimate, rows[0].ppv.low, rows[0].ppv.high

The series operating point (:func:`series_operating_points`) is what a new site
checks before it trusts the flag: the threshold was chosen on other hospitals'
series, so during a validation period (shadow mode, every series reviewed) the
site's own reviewed series give its sensitivity and specificity there, and the
highest threshold that would have flagged every reviewed bleed
(``HEMOTRIAGE_SERIES_THRESHOLD`` applies one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from console.db import Connection
from console.errors import InvalidRequestError

#: Windows offered on the page and in /metrics, in days (None: every study).
WINDOWS: dict[str, int | None] = {"7": 7, "30": 30, "all": None}
#: Two-sided 95%: the normal quantile at 0.975 (1.95996...).
_Z_95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``total`` with its Wilson 95% interval (all None when total is 0)."""

    successes: int
    total: int
    estimate: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, successes: int, total: int) -> Proportion:
        """The proportion and its interval; an empty denominator has neither."""
        if total == 0:
            return cls(successes, 0, None, None, None)
        low, high = wilson_interval(successes, total)
        return cls(successes, total, successes / total, low, high)


@dataclass(frozen=True)
class VersionAccuracy:
    """The reviewed results of one model version in a window.

    Attributes:
        flagged: Studies the version flagged in the window, reviewed or not.
        ppv: True positives of reviewed flags.
        false_positive_rate: False positives of reviewed flags.
        false_negatives: Confirmed misses: negative studies a reader marked as a hemorrhage.
    """

    model_name: str
    model_version: str
    flagged: int
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int
    ppv: Proportion
    false_positive_rate: Proportion


def wilson_interval(successes: int, total: int) -> tuple[float, float]:
    """Wilson score 95% interval of ``successes / total``.

    Raises:
        ValueError: ``total`` is not positive or ``successes`` is outside ``[0, total]``.
    """
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    p = successes / total
    z2 = _Z_95**2
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = _Z_95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total**2)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_window(value: str | None) -> int | None:
    """The ``days`` query parameter: ``7``, ``30`` or ``all`` (default 30).

    Raises:
        InvalidRequestError: any other value.
    """
    key = "30" if value is None else value.strip().lower()
    if key not in WINDOWS:
        raise InvalidRequestError(f"days must be one of {', '.join(WINDOWS)}, not {value!r}")
    return WINDOWS[key]


def accuracy_by_version(db: Connection, days: int | None, now: float) -> list[VersionAccuracy]:
    """Feedback statistics of each model version, for studies received in the last ``days``.

    Args:
        db: Any connection.
        days: Window length; None counts every study.
        now: End of the window (seconds since the epoch).

    Returns:
        One entry per (model name, version) that flagged or was reviewed, sorted by both.
    """
    since = -math.inf if days is None else now - days * 86400
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for row in db.execute(
        "SELECT model_name, model_version, COUNT(*) AS n FROM studies "
        "WHERE flagged_at IS NOT NULL AND received_at >= ? GROUP BY model_name, model_version",
        (since,),
    ):
        counts.setdefault((row["model_name"], row["model_version"]), {})["flagged"] = row["n"]
    for row in db.execute(
        "SELECT f.model_name, f.model_version, f.outcome, COUNT(*) AS n FROM feedback f "
        "JOIN studies s ON s.id = f.study_id "
        "WHERE f.id IN (SELECT MAX(id) FROM feedback GROUP BY study_id) AND s.received_at >= ? "
        "GROUP BY f.model_name, f.model_version, f.outcome",
        (since,),
    ):
        counts.setdefault((row["model_name"], row["model_version"]), {})[row["outcome"]] = row["n"]
    return [_version(name, version, n) for (name, version), n in sorted(counts.items())]


def _version(name: str, version: str, n: dict[str, int]) -> VersionAccuracy:
    tp, fp = n.get("true_positive", 0), n.get("false_positive", 0)
    return VersionAccuracy(
        model_name=name,
        model_version=version,
        flagged=n.get("flagged", 0),
        true_positives=tp,
        false_positives=fp,
        true_negatives=n.get("true_negative", 0),
        false_negatives=n.get("false_negative", 0),
        ppv=Proportion.of(tp, tp + fp),
        false_positive_rate=Proportion.of(fp, tp + fp),
    )


#: Reviewed bleeding series before a site's own threshold means much: with every one of
#: 20 flagged, the Wilson 95% interval of the sensitivity still reaches down to 0.84.
MIN_REVIEWED_BLEEDS = 20
#: Decimals a suggested threshold is shown with; it is rounded down, so the value a
#: person copies into the setting still flags the lowest reviewed bleed.
THRESHOLD_DECIMALS = 4


@dataclass(frozen=True)
class SeriesOperatingPoint:
    """Series decided by one model version at one threshold, as this site's readers judged them.

    Attributes:
        bleeds: Reviewed series that bleed (flags confirmed, misses reported).
        normals: Reviewed series that do not (flags refuted, negatives confirmed).
        sensitivity: Flagged bleeds of reviewed bleeds (the decisions made at ``threshold``).
        specificity: Unflagged normals of reviewed normals (the same decisions).
        lowest_bleed_score: The lowest score of a reviewed bleed (None without one).
        site_threshold: The highest threshold that flags every reviewed bleed: the
            lowest bleed score, rounded down to :data:`THRESHOLD_DECIMALS`.
        site_specificity: Reviewed normals below ``site_threshold``: the false alarms
            it would have spared, chosen on the same series (so optimistic).
        enough_bleeds: At least :data:`MIN_REVIEWED_BLEEDS` reviewed bleeds.
    """

    model_name: str
    model_version: str
    threshold: float
    bleeds: int
    normals: int
    sensitivity: Proportion
    specificity: Proportion
    lowest_bleed_score: float | None
    site_threshold: float | None
    site_specificity: Proportion | None
    enough_bleeds: bool


def series_operating_points(
    db: Connection, days: int | None, now: float
) -> list[SeriesOperatingPoint]:
    """Reviewed series (studies of more than one slice) by model version and threshold.

    Each study counts once, with its last verdict and the score and threshold it
    judged; lone images are left out (they are decided at the slice threshold,
    which ``HEMOTRIAGE_SERIES_THRESHOLD`` does not move).

    Args:
        db: Any connection.
        days: Window length over the studies' arrival; None counts every study.
        now: End of the window (seconds since the epoch).
    """
    since = -math.inf if days is None else now - days * 86400
    groups: dict[tuple[str, str, float], list[tuple[str, float]]] = {}
    for row in db.execute(
        "SELECT f.model_name, f.model_version, f.threshold, f.score, f.outcome FROM feedback f "
        "JOIN studies s ON s.id = f.study_id "
        "WHERE f.id IN (SELECT MAX(id) FROM feedback GROUP BY study_id) AND s.received_at >= ? "
        "AND (SELECT COUNT(*) FROM slices sl WHERE sl.study_id = s.id) > 1",
        (since,),
    ):
        key = (row["model_name"], row["model_version"], float(row["threshold"]))
        groups.setdefault(key, []).append((row["outcome"], float(row["score"])))
    return [_operating_point(*key, judged) for key, judged in sorted(groups.items())]


def _operating_point(
    name: str, version: str, threshold: float, judged: list[tuple[str, float]]
) -> SeriesOperatingPoint:
    outcomes = [outcome for outcome, _ in judged]
    bleed_scores = [s for outcome, s in judged if outcome in ("true_positive", "false_negative")]
    normal_scores = [s for outcome, s in judged if outcome in ("true_negative", "false_positive")]
    lowest = min(bleed_scores, default=None)
    site_threshold = site_specificity = None
    if lowest is not None:
        scale = 10**THRESHOLD_DECIMALS
        site_threshold = math.floor(lowest * scale) / scale
        spared = sum(score < site_threshold for score in normal_scores)
        site_specificity = Proportion.of(spared, len(normal_scores))
    return SeriesOperatingPoint(
        model_name=name,
        model_version=version,
        threshold=threshold,
        bleeds=len(bleed_scores),
        normals=len(normal_scores),
        sensitivity=Proportion.of(outcomes.count("true_positive"), len(bleed_scores)),
        specificity=Proportion.of(outcomes.count("true_negative"), len(normal_scores)),
        lowest_bleed_score=lowest,
        site_threshold=site_threshold,
        site_specificity=site_specificity,
        enough_bleeds=len(bleed_scores) >= MIN_REVIEWED_BLEEDS,
    )
