r"""One training change against the served run, on the same folds: a row of the ablation table.

Issue 9 keeps a change to the slice model only if it wins on the same folds.
This reads two runs' saved fold results (``.cache/runs/<run>/fold{k}.npz``:
held-out slices and their out-of-fold probabilities; or a run's ``oof.csv``, as the
served run's is committed in its reports), checks that each fold
held out the same slices in both, and compares them on the folds both have
finished (a run still training is compared on its finished folds' patients):

- pooled slice ROC-AUC and ``ct_ich_dev`` slice ROC-AUC, 95% patient-bootstrap CIs;
- ``kaggle_head_ct`` accuracy at 0.5;
- ``ct_ich_dev`` series ROC-AUC, nested sensitivity and specificity and specificity
  at sensitivity 15/16, for the maximum slice and the neighbour pair, by the
  nested cross-validation of ``python -m build_engines series``;
- ``ct_ich_dev`` normal-slice specificity by head fill (quintiles) and bleeding-slice
  sensitivity by subtype (``labels.csv``), each run at its own operating threshold
  (pooled slice sensitivity 0.95).

The result is kept in ``build_engines/reports/<model>/ablations.json`` under the
change's name, and the model card shows it.

    python -m build_engines ablation --model mobilenet_v2 --name "2.5D input" --candidate-run RUN

With ``mirror`` the candidate's fold models are scored again on every held-out
slice and its mirror image (:class:`MirrorAverage`): an
inference change measured on the same models, where the candidate is the served run.

Several candidate runs make one candidate, their ensemble (:func:`ensemble_folds`):
each held-out slice's logits averaged over the runs' fold models, as one served
graph holding every member would score it.

    python -m build_engines ablation --model mobilenet_v2 --name "ensemble" \
        --candidate-run build_engines/reports/mobilenet_v2/oof.csv --candidate-run RUN
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from build_engines.crossval import oof_key, repo_relative
from build_engines.data import Dataset, SliceRecord, load_dataset
from build_engines.error_analysis import (
    ct_ich_labels,
    false_alarms_by_head_fill,
    sensitivity_by_subtype,
)
from build_engines.evaluate import binary_metrics, threshold_for_sensitivity, with_ci
from build_engines.report import TARGET_SENSITIVITY
from build_engines.series_model import (
    FIXED_RULES,
    fixed_rule_scorer,
    load_series_table,
    nested_evaluation,
)
from build_engines.series_stage import summarize_nested
from build_engines.train import predict_views
from client.registry import ModelSpec
from client.torch_models import load_weights_file

logger = logging.getLogger(__name__)


class MirrorAverage(torch.nn.Module):
    """A slice classifier scored on the slice and on its left-right mirror image.

    Heads are close to symmetric and bleeds occur on either side, so the mirror
    image is a second look at the same slice from the training distribution;
    averaging the two logits removes part of what one look gets wrong. The
    result does not change when the input is mirrored.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized slices to the (N, 2) logits averaged over both looks."""
        plain, mirrored = self.model(torch.cat([x, x.flip(-1)])).chunk(2)
        return (plain + mirrored) / 2


def finished_folds(run_dir: Path) -> list[int]:
    """Folds 0, 1, ... whose results are saved, up to the first missing one.

    A run's ``oof.csv`` in place of its folder holds every fold it finished.
    """
    if run_dir.suffix == ".csv":
        with run_dir.open() as f:
            return sorted({int(r["fold"]) for r in csv.DictReader(f) if int(r["fold"]) >= 0})
    folds = []
    while (run_dir / f"fold{len(folds)}.npz").exists():
        folds.append(len(folds))
    return folds


def load_folds(run: Path, folds: list[int], dataset: Dataset) -> list:
    """A run's saved fold results (``fold{k}.npz``), or rebuilt from its ``oof.csv``.

    The run folders under ``.cache/runs`` stay on the machine that trained; the served
    run's ``oof.csv`` is committed with its reports, so a later checkout compares a new
    run with it. Rebuilt folds hold the plain view's probabilities and no embeddings,
    all that the comparison reads.
    """
    if run.suffix != ".csv":
        return [np.load(run / f"fold{k}.npz") for k in folds]
    with run.open() as f:
        saved = {r["path"]: (int(r["fold"]), float(r["probability"])) for r in csv.DictReader(f)}
    fold_of, probabilities = np.array(
        [saved.get(oof_key(r), (-1, np.nan)) for r in dataset.records]
    ).T
    rebuilt = []
    for k in folds:
        test_idx = np.flatnonzero(fold_of == k)
        rebuilt.append(_plain_view_fold(test_idx, probabilities[test_idx]))
    return rebuilt


def _plain_view_fold(test_idx: np.ndarray, probabilities: np.ndarray) -> dict:
    """A fold result with the plain view's probabilities only, no embeddings."""
    return {
        "test_idx": test_idx,
        "probabilities": probabilities[None].astype(np.float32),
        "embeddings": np.zeros((1, len(test_idx), 0), np.float16),
    }


def compare_runs(
    spec: ModelSpec,
    data_dir: Path,
    baseline_run: Path,
    candidate_run: Path | list[Path],
    records: list[SliceRecord] | None = None,
    mirror: bool = False,
) -> dict:
    """Both runs' measures on the patients of the folds both have finished.

    ``candidate_run`` is one run, or several whose ensemble is the candidate.
    ``records`` are the slices both runs trained on (default: every labelled slice).
    ``mirror`` scores the candidate's (single-slice) fold models on each slice and its
    mirror image instead of reading the probabilities its folds saved.

    Raises:
        ValueError: fewer than two common folds (the nested series evaluation
            needs an inner fold), a fold that held out other slices, or ``mirror``
            with an ensemble.
    """
    members = [candidate_run] if isinstance(candidate_run, Path) else list(candidate_run)
    if mirror and len(members) > 1:
        raise ValueError("the mirror average rescores one run's fold models, not an ensemble")
    folds = sorted(set(finished_folds(baseline_run)).intersection(*map(finished_folds, members)))
    if len(folds) < 2:
        raise ValueError(f"{len(folds)} fold(s) finished in both runs; the comparison needs 2")
    dataset = load_dataset(data_dir, spec, records)
    baseline = load_folds(baseline_run, folds, dataset)
    member_folds = [load_folds(member, folds, dataset) for member in members]
    for changed in member_folds:
        for k, base, fold in zip(folds, baseline, changed, strict=True):
            if not np.array_equal(base["test_idx"], fold["test_idx"]):
                raise ValueError(f"fold {k} held out other slices in the two runs")
    candidate = member_folds[0] if len(members) == 1 else ensemble_folds(member_folds)
    if mirror:
        candidate = [
            _mirrored(spec, dataset, members[0] / f"fold{k}.safetensors", fold)
            for k, fold in zip(folds, candidate, strict=True)
        ]
    held_out = np.concatenate([f["test_idx"] for f in baseline])
    trauma_dir = data_dir / "ct_ich_dev"
    subtypes = {trauma_dir / file: row for file, row in ct_ich_labels(data_dir).items()}
    return {
        "folds": folds,
        "slices": len(held_out),
        "patients": len(np.unique(dataset.patients[held_out])),
        "baseline_run": repo_relative(baseline_run),
        "candidate_run": " + ".join(map(repo_relative, members)),
        "baseline": _measures(dataset, baseline, subtypes),
        "candidate": _measures(dataset, candidate, subtypes),
    }


def ensemble_folds(member_folds: list[list]) -> list[dict]:
    """The folds of an ensemble: each held-out slice's plain-view logit averaged over members.

    Averaging logits (not probabilities) is what one graph holding every member
    computes before its softmax. Members must hold out the same slices in each fold.
    """
    ensemble = []
    for folds in zip(*member_folds, strict=True):
        probabilities = np.clip([f["probabilities"][0] for f in folds], 1e-7, 1 - 1e-7)
        logit = np.log(probabilities / (1 - probabilities)).mean(0)
        ensemble.append(_plain_view_fold(folds[0]["test_idx"], 1 / (1 + np.exp(-logit))))
    return ensemble


def _mirrored(spec: ModelSpec, dataset: Dataset, weights: Path, fold) -> dict:
    """A saved fold whose plain-view probabilities the mirror average scored again."""
    model = MirrorAverage(load_weights_file(spec, weights))
    probabilities = fold["probabilities"].copy()
    probabilities[0] = predict_views(model, dataset.inputs(fold["test_idx"], "2d"), spec)
    return dict(fold) | {"probabilities": probabilities}


def record_ablation(report_dir: Path, name: str, comparison: dict) -> Path:
    """Keep ``comparison`` under ``name`` in ``report_dir/ablations.json``; returns its path."""
    path = report_dir / "ablations.json"
    ablations = json.loads(path.read_text()) if path.exists() else {}
    ablations[name] = comparison
    path.write_text(json.dumps(ablations, indent=1) + "\n")
    return path


def _measures(dataset: Dataset, folds: list, subtypes: dict[Path, dict[str, str]]) -> dict:
    """Slice, series, head-fill and subtype measures of one run's out-of-fold probabilities.

    ``subtypes`` are the ``ct_ich_dev`` rows of ``labels.csv``, keyed by slice path.
    """
    idx = np.concatenate([f["test_idx"] for f in folds])
    p = np.concatenate([f["probabilities"][0] for f in folds])
    y, patients, sources = dataset.labels[idx], dataset.patients[idx], dataset.sources[idx]
    threshold = threshold_for_sensitivity(y, p, TARGET_SENSITIVITY)
    trauma, kaggle = sources == "ct_ich_dev", sources == "kaggle_head_ct"

    table = load_series_table(folds, dataset)
    series = [s for s in table if s.fold >= 0]  # patients of unfinished folds have no fold
    nested = {
        name: summarize_nested(
            nested_evaluation(series, fixed_rule_scorer(rule), name, TARGET_SENSITIVITY)
        )
        for name, rule in FIXED_RULES.items()
    }
    flagged = p[trauma] >= threshold
    by_head = false_alarms_by_head_fill(
        dataset.head_fractions[idx][trauma], flagged, y[trauma] == 0
    )
    by_subtype = sensitivity_by_subtype(
        flagged, [subtypes[dataset.records[i].path] for i in idx[trauma]]
    )
    return {
        "threshold": threshold,
        "pooled_roc_auc": with_ci(y, p, patients, threshold)["roc_auc"],
        "ct_ich_dev_roc_auc": with_ci(y[trauma], p[trauma], patients[trauma], threshold)["roc_auc"],
        "kaggle_accuracy_at_0.5": binary_metrics(y[kaggle], p[kaggle], 0.5)["accuracy"],
        "series": nested,
        "specificity_by_head_fill": [
            {"group": g["group"], "slices": g["slices"], "specificity": 1 - g["rate"]}
            for g in by_head
        ],
        "sensitivity_by_subtype": [
            {"subtype": g["group"], "slices": g["slices"], "sensitivity": g["rate"]}
            for g in by_subtype
        ],
    }
