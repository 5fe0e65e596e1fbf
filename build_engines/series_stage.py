"""``python -m build_engines series``: which series score to trust, measured honestly.

Reads the out-of-fold slice outputs of a finished slice-model run (the fold
results named in its ``training.json``, or its ``oof.csv`` for older runs),
compares the series scores by nested cross-validation (maximum slice,
neighbour pair, and each series-model variant) and writes ``series.json`` and
``series_roc.png`` to the report folder; the model card shows both.

The best score is the one with the highest nested specificity at its nested
threshold on ``ct_ich_dev`` series (ties: higher ROC-AUC). The servable rules
are the fixed ones (``client.series.SERIES_RULES``) and one series-model design
that reads no embeddings: each is retrained on every series, and the best-ranked
that flags the held-out CQ500 bleed is saved as
``weights/<base>_series.safetensors`` (served by Triton as ``<base>_series``).
Each gets a threshold (the highest that keeps ``TARGET_SENSITIVITY`` of all
out-of-fold ``ct_ich_dev`` series), recorded in the weights sidecar
(``series_thresholds``), so a site may choose any of them. The default
(``series_rule``, ``series_threshold``) is the best servable rule that also
flags the held-out CQ500 bleed with the final slice weights: 39 series of one
hospital are too few to let a rule that misses the one external bleed we hold
be served by default.

    python -m build_engines series --model mobilenet_v2
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from build_engines.data import load_dataset
from build_engines.evaluate import binary_metrics, bootstrap_ci, threshold_for_sensitivity
from build_engines.report import TARGET_SENSITIVITY
from build_engines.series_check import CQ500_SERIES
from build_engines.series_model import (
    FIXED_RULES,
    NestedResult,
    Series,
    SeriesVariant,
    fixed_rule_scorer,
    load_series_table,
    nested_evaluation,
    series_from_oof_csv,
    series_model_scorer,
    train_series_ensemble,
)
from client.classify import LocalClassifier, classify_files, find_image_files
from client.constants import REPO_ROOT, WEIGHTS_DIR
from client.registry import ModelSpec
from client.series import SERIES_MODEL_FALLBACK, SERIES_MODEL_RULE, rule_score, series_features
from client.torch_models import SeriesEnsemble, save_weights

logger = logging.getLogger(__name__)

#: The series-model designs compared (choose by measurement, as the issue asks),
#: each an average of 4 seeds: single seeds of the ResNet-18 TCN ranged over
#: series ROC-AUC 0.85-0.93, wider than the gaps between designs. The ``-max``
#: designs score a series by its highest refined slice alone, with no correction
#: from the whole series' pooled context: ResNet-18's pooled GRU ranked first out
#: of fold but scored the held-out CQ500 bleed 0.30 with refined slices up to 0.92.
VARIANTS = (
    SeriesVariant("gru", embeddings=False, members=4),
    SeriesVariant("gru", embeddings=True, members=4),
    SeriesVariant("tcn", embeddings=False, members=4),
    SeriesVariant("tcn", embeddings=True, members=4),
    SeriesVariant("gru", embeddings=False, members=4, pooled=False),
    SeriesVariant("tcn", embeddings=False, members=4, pooled=False),
)
#: Sensitivities at which series specificity is reported (15/16: one missed bleed of 16).
REPORTED_SENSITIVITIES = (1.0, 15 / 16)


def run_series_stage(
    spec: ModelSpec,
    data_dir: Path,
    report_dir: Path,
    weights_dir: Path,
    variants: tuple[SeriesVariant, ...] = VARIANTS,
) -> dict:
    """Nested comparison of series scores; series.json, series_roc.png, the served rule."""
    table = _out_of_fold_series(spec, data_dir, report_dir)
    if table[0].embeddings.shape[2] == 0:
        variants = tuple(v for v in variants if not v.embeddings)

    results: list[NestedResult] = [
        nested_evaluation(table, fixed_rule_scorer(rule), name, TARGET_SENSITIVITY)
        for name, rule in FIXED_RULES.items()
    ]
    n_folds = len({s.fold for s in table})
    progress = tqdm(total=len(variants) * n_folds * n_folds, desc="series models", unit="fit")
    for variant in variants:
        results.append(
            nested_evaluation(
                table, series_model_scorer(variant, progress), variant.name, TARGET_SENSITIVITY
            )
        )
    progress.close()

    summary = {r.name: summarize_nested(r) for r in results}

    def rank(name: str) -> tuple[float, float]:
        return (
            summary[name]["nested"]["specificity"]["value"],
            summary[name]["roc_auc"]["value"],
        )

    best = max(summary, key=rank)
    # Only designs that read no embeddings can be served: the slice graphs output
    # probabilities alone. Each is retrained on every series for the CQ500 check; the
    # best of them is committed whatever the default, so a site may choose it.
    designs = {v.name: v for v in variants if not v.embeddings}
    ensembles = {name: train_series_ensemble(table, v) for name, v in designs.items()}
    thresholds_of = {
        r.name: threshold_for_sensitivity(r.labels, r.scores, TARGET_SENSITIVITY)
        for r in results
        if r.name in FIXED_RULES or r.name in designs
    }
    held_out = _held_out_bleed(spec, data_dir, weights_dir, ensembles, thresholds_of)

    design = designs[choose_default(designs, rank, held_out)]
    series_model = _save_series_model(
        ensembles[design.name], design, table, weights_dir / f"{spec.series_model_name}.safetensors"
    )
    rule_of = {**{name: name for name in FIXED_RULES}, design.name: SERIES_MODEL_RULE}
    thresholds = {rule_of[name]: thresholds_of[name] for name in rule_of}
    served = choose_default(rule_of, rank, held_out)
    rule, threshold = rule_of[served], thresholds[rule_of[served]]
    facts_path = weights_dir / f"{spec.name}.json"
    facts = json.loads(facts_path.read_text())
    report = {
        "model": spec.name,
        "target_sensitivity": TARGET_SENSITIVITY,
        "series": len(table),
        "decision_series": len(results[0].labels),
        "embeddings": bool(table[0].embeddings.shape[2]),
        "views": int(table[0].probabilities.shape[0]),
        "variants": {v.name: asdict(v) for v in variants},
        "scores": summary,
        "best": best,
        "thresholds": thresholds,
        "held_out_bleed": held_out,
        "served": {
            "rule": rule,
            "score": served,
            "threshold": threshold,
            "fallback": _fallback_operating_point(results, facts["threshold"]),
        },
        "series_model": series_model,
    }
    (report_dir / "series.json").write_text(json.dumps(report, indent=1))
    _plot_roc(results, report_dir / "series_roc.png", spec.name)
    facts |= {
        "series_rule": rule,
        "series_threshold": threshold,
        "series_thresholds": thresholds,
        "series_model": series_model,
    }
    facts_path.write_text(json.dumps(facts, indent=1) + "\n")
    logger.info("best series score %s; served %s (%s) at %.4f", best, rule, served, threshold)
    return report


def choose_default(
    names: Iterable[str], rank: Callable[[str], tuple], held_out: dict[str, dict]
) -> str:
    """The best-ranked of ``names`` that flags the held-out bleed (``held_out[name]["flagged"]``).

    A score that misses the held-out CQ500 bleed is not served by default, whatever its
    cross-validated figures: they come from 39 series of one hospital. A name the check
    did not cover counts as flagging; if none flags, the best-ranked is chosen.
    """
    return max(names, key=lambda name: (held_out.get(name, {}).get("flagged", True), rank(name)))


def _fallback_operating_point(results: list[NestedResult], slice_threshold: float) -> dict:
    """Out-of-fold ct_ich_dev series flags of the series model's fallback (``client.series``).

    While the series model cannot be reached, a series is decided by its
    maximum slice at the slice threshold: this is what that costs.
    """
    max_slice = next(r for r in results if r.name == "max_slice")
    flagged = (max_slice.scores >= slice_threshold).astype(float)
    metrics = binary_metrics(max_slice.labels, flagged, 0.5)
    return {
        "rule": SERIES_MODEL_FALLBACK,
        "threshold": slice_threshold,
        "sensitivity": metrics["recall"],
        "specificity": metrics["specificity"],
    }


def _save_series_model(
    ensemble: SeriesEnsemble, design: SeriesVariant, table: list[Series], path: Path
) -> dict:
    """Save the series model of ``design`` (trained on every series); its sidecar facts."""
    return {
        "design": design.name,
        "kind": design.kind,
        "hidden": design.hidden,
        "members": design.members,
        "pooled": design.pooled,
        "features": int(table[0].features(None, False).shape[1]),
        "weights_sha256": save_weights(ensemble, path),
    }


def _held_out_bleed(
    spec: ModelSpec,
    data_dir: Path,
    weights_dir: Path,
    ensembles: dict[str, SeriesEnsemble],
    thresholds: dict[str, float],
) -> dict:
    """Each score's value and flag on the CQ500 bleed, with the committed final slice weights.

    Scores are the fixed rules and the series-model designs (``ensembles``, by
    name). Empty where the series is not in the data folder, or for weights
    other than the committed ones (an ablation's).
    """
    folder = data_dir / CQ500_SERIES
    if not folder.exists() or weights_dir.resolve() != WEIGHTS_DIR.resolve():
        return {}
    results = classify_files(find_image_files([folder]), LocalClassifier(spec))
    scored = sorted((r for r in results if r.probability is not None), key=lambda r: r.order_key)
    p = [r.probability for r in scored]
    head = [r.head_fraction for r in scored]
    scores = {rule: rule_score(rule, p, head)[0] for rule in FIXED_RULES}
    with torch.inference_mode():
        features = torch.from_numpy(series_features(p, head))[None]
        scores |= {name: float(model(features)[1][0]) for name, model in ensembles.items()}
    return {
        name: {"score": score, "flagged": bool(score >= thresholds[name])}
        for name, score in scores.items()
    }


def _out_of_fold_series(spec: ModelSpec, data_dir: Path, report_dir: Path) -> list[Series]:
    """The run's saved fold results (views and embeddings) or, for older runs, its oof.csv."""
    training = json.loads((report_dir / "training.json").read_text())
    run_dir = REPO_ROOT / training.get("fold_results", "")
    if "fold_results" not in training or not (run_dir / "fold0.npz").exists():
        # Fold results live in the git-ignored .cache of the machine that trained.
        logger.info("no saved fold results here: series from oof.csv, plain views only")
        return series_from_oof_csv(report_dir / "oof.csv")
    dataset = load_dataset(data_dir, spec)
    folds = [np.load(run_dir / f"fold{k}.npz") for k in range(training["folds"])]
    return load_series_table(folds, dataset)


def summarize_nested(result: NestedResult) -> dict:
    """ROC-AUC, nested-threshold metrics and specificity at fixed sensitivities, with CIs."""
    y, s, patients = result.labels, result.scores, np.array(result.patients)
    nested = binary_metrics(y, result.flagged.astype(float), 0.5)
    nested_ci = bootstrap_ci(y, result.flagged.astype(float), patients, 0.5)
    out = {
        "roc_auc": _with_ci(y, s, patients, "roc_auc", 0.5),
        "nested": {
            m: {"value": nested[m], "low": nested_ci[m][0], "high": nested_ci[m][1]}
            for m in ("recall", "specificity", "precision")
        },
        "nested_thresholds": result.thresholds,
    }
    for sensitivity in REPORTED_SENSITIVITIES:
        t = threshold_for_sensitivity(y, s, sensitivity)
        out[f"specificity_at_sensitivity_{sensitivity:.4f}"] = _with_ci(
            y, s, patients, "specificity", t
        )
    return out


def _with_ci(y, s, patients, metric: str, threshold: float) -> dict:
    value = binary_metrics(y, s, threshold)[metric]
    low, high = bootstrap_ci(y, s, patients, threshold)[metric]
    return {"value": value, "low": low, "high": high}


def _plot_roc(results: list[NestedResult], path: Path, name: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for result in results:
        fpr, tpr, _ = roc_curve(result.labels, result.scores)
        auc = roc_auc_score(result.labels, result.scores)
        ax.plot(fpr, tpr, label=f"{result.name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"{name}: ct_ich_dev series, nested out of fold",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
