"""Where the false alarms and the misses are, from a run's out-of-fold predictions.

On other hospitals' trauma series the false alarms clustered by patient (small,
round heads filling the view; skull fractures), while bleeds of every subtype
were found about equally. This measures the same on ``ct_ich_dev`` out of fold,
at the model's slice operating threshold, so each training change can be judged
on the confounders and not only on a pooled AUC:

- false-alarm rate of normal slices by how much of the model view the head fills
  (quintiles) and with or without a skull fracture;
- sensitivity per hemorrhage subtype;
- normal series: the share of each one's slices that is flagged.

    analysis = analyse_errors(report_dir, data_dir)     # also writes errors.json
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np

SUBTYPES = ("epidural", "subdural", "subarachnoid", "intraparenchymal", "intraventricular")
#: Head-fill bins: quintiles of the normal slices' head fraction.
_BINS = 5


def analyse_errors(report_dir: Path, data_dir: Path) -> dict:
    """False alarms by head fill and fracture, sensitivity by subtype; writes errors.json."""
    threshold = json.loads((report_dir / "metrics.json").read_text())["threshold"]
    labels = ct_ich_labels(data_dir)
    with (report_dir / "oof.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "ct_ich_dev"]
    for row in rows:
        row.update(labels[row["path"].split("/", 1)[1]])
    flagged = np.array([float(r["probability"]) >= threshold for r in rows])
    bleeding = np.array([int(r["label"]) == 1 for r in rows])
    head = np.array([float(r["head_fraction"]) for r in rows])
    fracture = np.array([r["fracture"] == "1" for r in rows])
    normal = ~bleeding
    analysis = {
        "threshold": threshold,
        "normal_false_alarm_by_head_fraction": false_alarms_by_head_fill(head, flagged, normal),
        "normal_false_alarm_by_fracture": [
            _rate("fracture", flagged[normal & fracture]),
            _rate("no fracture", flagged[normal & ~fracture]),
        ],
        "sensitivity_by_subtype": sensitivity_by_subtype(flagged, rows),
        "normal_series_flagged_share": _normal_series(rows, flagged),
    }
    (report_dir / "errors.json").write_text(json.dumps(analysis, indent=1))
    return analysis


def false_alarms_by_head_fill(
    head: np.ndarray, flagged: np.ndarray, normal: np.ndarray
) -> list[dict]:
    """False-alarm rate of the normal slices in each quintile of their head fraction."""
    edges = np.quantile(head[normal], np.linspace(0, 1, _BINS + 1))
    return [
        _rate(f"{low:.2f}-{high:.2f}", flagged[normal & (head >= low) & (head <= high)])
        for low, high in itertools.pairwise(edges)
    ]


def sensitivity_by_subtype(flagged: np.ndarray, labels: list[dict[str, str]]) -> list[dict]:
    """Share of each subtype's slices flagged; ``labels`` are the slices' rows of labels.csv."""
    return [
        _rate(subtype, flagged[np.array([row[subtype] == "1" for row in labels], dtype=bool)])
        for subtype in SUBTYPES
    ]


def _rate(name: str, hits: np.ndarray) -> dict:
    return {
        "group": name,
        "slices": int(hits.size),
        "flagged": int(hits.sum()),
        "rate": float(hits.mean()) if hits.size else float("nan"),
    }


def _normal_series(rows: list[dict], flagged: np.ndarray) -> list[float]:
    """Share of flagged slices in each normal patient's series, highest first."""
    shares = []
    for patient in sorted({r["patient"] for r in rows}):
        members = np.array([r["patient"] == patient for r in rows])
        if not any(int(r["label"]) for r, m in zip(rows, members, strict=True) if m):
            shares.append(round(float(flagged[members].mean()), 3))
    return sorted(shares, reverse=True)


def ct_ich_labels(data_dir: Path) -> dict[str, dict[str, str]]:
    """Subtype and fracture columns of ct_ich_dev/labels.csv, keyed by file."""
    with (data_dir / "ct_ich_dev" / "labels.csv").open() as f:
        return {r["file"]: {k: r[k] for k in (*SUBTYPES, "fracture")} for r in csv.DictReader(f)}
