"""Honest evaluation from out-of-fold predictions: metrics with patient-bootstrap CIs.

Every slice is scored by the fold model that never saw its patient. Confidence
intervals resample patients, not slices (slices of one patient are not
independent). Thresholds are chosen for triage: the highest one that keeps
sensitivity at or above 0.95 on out-of-fold data.

    metrics = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, patients, threshold)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from client.series import series_score

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1 and ROC-AUC."""
    y = np.asarray(y).astype(bool)
    predicted = np.asarray(p) >= threshold
    tp = int(np.sum(predicted & y))
    tn = int(np.sum(~predicted & ~y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "roc_auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan"),
        "n": len(y),
        "positives": int(y.sum()),
    }


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each metric, resampling whole patients."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        picked = np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])
        values = binary_metrics(y[picked], p[picked], threshold)
        for m in METRICS:
            samples[m].append(values[m])
    return {
        m: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
        for m, v in samples.items()
    }


def with_ci(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, threshold: float, n_boot: int = 1000
) -> dict[str, dict[str, float]]:
    """Each metric as {value, low, high}."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, groups, threshold, n_boot)
    out = {m: {"value": point[m], "low": ci[m][0], "high": ci[m][1]} for m in METRICS}
    out["counts"] = {
        "n": point["n"],
        "positives": point["positives"],
        "patients": len(np.unique(groups)),
    }
    return out


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.95) -> float:
    """Highest threshold whose sensitivity on (y, p) is at least ``min_sensitivity``."""
    positives = np.sort(np.asarray(p)[np.asarray(y) == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive examples to set a sensitivity threshold on")
    needed = int(np.ceil(min_sensitivity * positives.size))
    return float(positives[needed - 1])


def series_table(
    patients: np.ndarray,
    orders: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    head: np.ndarray,
    aggregate: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patient series (patient ids, labels, scores), slices in anatomical order.

    ``aggregate`` defaults to the client's neighbour-agreement series score.
    """
    aggregate = aggregate or (lambda probs, fractions: series_score(probs, fractions).score)
    ids = np.unique(patients)
    labels, scores = [], []
    for patient in ids:
        members = np.flatnonzero(patients == patient)
        members = members[np.argsort(orders[members])]
        labels.append(int(y[members].max()))
        scores.append(aggregate(p[members], head[members]))
    return ids, np.array(labels), np.array(scores)


def max_slice_aggregate(probs: np.ndarray, fractions: np.ndarray) -> float:
    """The naive series score (maximum slice), kept for comparison."""
    return float(np.max(probs))
