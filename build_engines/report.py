"""Metrics report and figures from a training run's ``oof.csv`` and ``training.json``.

Regenerates everything without retraining: ``python -m build_engines evaluate
--model resnet18``. Writes ``metrics.json`` and PNG figures (learning curves,
ROC per source, confusion matrices) beside the inputs.

    report = write_report(get_model("mobilenet_v2"), Path("build_engines/reports/mobilenet_v2"))
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from build_engines.data import SOURCES
from build_engines.evaluate import (
    METRICS,
    binary_metrics,
    max_slice_aggregate,
    series_table,
    threshold_for_sensitivity,
    with_ci,
)
from client.registry import ModelSpec
from client.series import series_score

logger = logging.getLogger(__name__)

#: Triage wants sensitivity: thresholds keep at least this on out-of-fold data.
TARGET_SENSITIVITY = 0.95
#: The source whose series set the series threshold (trauma, every slice, one series each).
SERIES_SOURCE = "ct_ich_dev"


def _read_oof(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {
        "source": np.array([r["source"] for r in rows]),
        "patient": np.array([r["patient"] for r in rows]),
        "order": np.array([int(r["order"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
        "fold": np.array([int(r["fold"]) for r in rows]),
        "p": np.array([float(r["probability"]) for r in rows]),
        "head": np.array([float(r["head_fraction"]) for r in rows]),
    }


def write_report(spec: ModelSpec, report_dir: Path, n_boot: int = 1000) -> dict:
    """Compute every metric from the run in ``report_dir``, write metrics.json and figures."""
    oof = _read_oof(report_dir / "oof.csv")
    training = json.loads((report_dir / "training.json").read_text())
    y, p, patients = oof["label"], oof["p"], oof["patient"]
    threshold = threshold_for_sensitivity(y, p, TARGET_SENSITIVITY)

    per_fold = [
        binary_metrics(y[oof["fold"] == k], p[oof["fold"] == k], threshold)
        for k in np.unique(oof["fold"])
    ]
    fold_summary = {
        m: {
            "mean": float(np.nanmean([f[m] for f in per_fold])),
            "sd": float(np.nanstd([f[m] for f in per_fold], ddof=1)) if len(per_fold) > 1 else 0.0,
        }
        for m in METRICS
    }
    per_source = {}
    for source in SOURCES:
        mask = oof["source"] == source
        if mask.any():
            per_source[source] = with_ci(y[mask], p[mask], patients[mask], threshold, n_boot)
            per_source[source]["threshold_0.5"] = binary_metrics(y[mask], p[mask], 0.5)

    series = {}
    mask = oof["source"] == SERIES_SOURCE
    series_threshold = threshold
    if mask.any() and y[mask].any():
        ids, ys, scores = series_table(
            patients[mask], oof["order"][mask], y[mask], p[mask], oof["head"][mask]
        )
        series_threshold = threshold_for_sensitivity(ys, scores, TARGET_SENSITIVITY)
        _, _, max_scores = series_table(
            patients[mask],
            oof["order"][mask],
            y[mask],
            p[mask],
            oof["head"][mask],
            max_slice_aggregate,
        )
        series = {
            "aggregation": "neighbour agreement: max over adjacent slices of min(p_i, p_i+1)",
            "neighbour_agreement": with_ci(ys, scores, ids, series_threshold, n_boot),
            "max_slice_at_own_threshold": binary_metrics(
                ys, max_scores, threshold_for_sensitivity(ys, max_scores, TARGET_SENSITIVITY)
            ),
            "max_slice_at_slice_threshold": binary_metrics(ys, max_scores, threshold),
        }
        _plot_confusion(
            ys,
            scores >= series_threshold,
            report_dir / "confusion_series.png",
            f"{spec.name}: {SERIES_SOURCE} series (threshold {series_threshold:.3f})",
        )

    report = {
        "model": spec.name,
        "threshold": threshold,
        "threshold_rule": (
            f"highest threshold with pooled out-of-fold slice sensitivity >= {TARGET_SENSITIVITY}"
        ),
        "series_threshold": series_threshold,
        "series_threshold_rule": (
            f"highest threshold with {SERIES_SOURCE} out-of-fold series sensitivity"
            f" >= {TARGET_SENSITIVITY}"
        ),
        "pooled": with_ci(y, p, patients, threshold, n_boot),
        "pooled_threshold_0.5": binary_metrics(y, p, 0.5),
        "per_fold": per_fold,
        "fold_summary": fold_summary,
        "per_source": per_source,
        "series": series,
        "cpu_inference_ms_per_image": training["cpu_inference_ms_per_image"],
        "best_epochs": training["best_epochs"],
        "final_epochs": training["final_epochs"],
        "config": training["config"],
    }
    (report_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    if training["histories"]:  # a weight soup trained nothing: no curves
        _plot_curves(training["histories"], report_dir / "curves.png", spec.name)
    _plot_roc(oof, report_dir / "roc.png", spec.name)
    _plot_confusion(
        y,
        p >= threshold,
        report_dir / "confusion_slices.png",
        f"{spec.name}: all slices, out of fold (threshold {threshold:.3f})",
    )
    return report


def _skull_base_check(
    oof: dict[str, np.ndarray], threshold: float, series_threshold: float
) -> dict:
    """False alarms on normal trauma series, skull base (lowest quarter of slices) vs the rest.

    Bright, busy skull-base slices are where a slice model raises false alarms;
    this measures how often, and whether any normal series is flagged because of them.
    """
    mask = (oof["source"] == SERIES_SOURCE) & (oof["label"] == 0)
    base, rest, flagged, normal_series = [], [], 0, 0
    for patient in np.unique(oof["patient"][mask]):
        members = np.flatnonzero(oof["patient"] == patient)
        if oof["label"][members].any():
            continue  # a bleeding patient's normal slices are not a clean negative
        members = members[np.argsort(oof["order"][members])]
        cut = max(1, len(members) // 4)
        base.extend(oof["p"][members[:cut]] >= threshold)
        rest.extend(oof["p"][members[cut:]] >= threshold)
        normal_series += 1
        flagged += int(
            series_score(oof["p"][members], oof["head"][members]).score >= series_threshold
        )
    return {
        "normal_series": normal_series,
        "normal_series_flagged": flagged,
        "slice_false_alarm_rate_skull_base": float(np.mean(base)) if base else float("nan"),
        "slice_false_alarm_rate_above": float(np.mean(rest)) if rest else float("nan"),
    }


def _plot_curves(histories: list[list[dict]], path: Path, name: str) -> None:
    """Train/validation accuracy and loss per epoch, one line per fold (as in the paper)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in enumerate(histories, start=1):
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("acc", "loss"), strict=True):
            ax.plot(
                epochs,
                [h[f"train_{key}"] for h in history],
                color=f"C{fold}",
                alpha=0.8,
                label=f"fold {fold} train",
            )
            if "val_" + key in history[0]:
                ax.plot(
                    epochs,
                    [h[f"val_{key}"] for h in history],
                    color=f"C{fold}",
                    ls="--",
                    label=f"fold {fold} validation",
                )
    for ax, title in zip(axes, ("accuracy", "loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(f"{name}: {title}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(oof: dict[str, np.ndarray], path: Path, name: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    groups = [("pooled", np.ones_like(oof["label"], dtype=bool))]
    groups += [(s, oof["source"] == s) for s in SOURCES if (oof["source"] == s).any()]
    for label, mask in groups:
        y, p = oof["label"][mask], oof["p"][mask]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            auc = binary_metrics(y, p, 0.5)["roc_auc"]
            ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{name}: out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(y: np.ndarray, predicted: np.ndarray, path: Path, title: str) -> None:
    matrix = confusion_matrix(y, predicted, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set_xticks([0, 1], ["normal", "hemorrhage"])
    ax.set_yticks([0, 1], ["normal", "hemorrhage"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
