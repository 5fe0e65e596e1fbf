"""The series model: trained on out-of-fold slice outputs, judged by nested cross-validation.

Each series' per-slice features (:func:`client.series.series_features`) come
from the fold model that never saw its patient, so the series model learns on
the slice model's honest errors. Every slice carries the plain view and a few
augmented views; training picks one at random per slice and sometimes keeps
every second slice only (thicker reconstructions). Series are ``ct_ich_dev``
(trauma, normal and bleeding patients) and ``phe_sich`` (every series bleeds,
but its slice labels teach where).

Evaluation is nested: for each outer fold the series model trains on the other
folds' patients, and its threshold is chosen on inner folds of those patients
only; the outer fold's series are then scored and decided. The fixed rules
(maximum slice, neighbour pair) get their thresholds the same way, so the three
scores are compared on equal terms.

    table = load_series_table(run_dir, dataset)
    result = nested_evaluation(table, variant, folds)
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from build_engines.data import Dataset
from build_engines.evaluate import threshold_for_sensitivity
from client.series import SERIES_RULES, rule_score, series_features
from client.torch_models import SeriesEnsemble, SeriesNet

logger = logging.getLogger(__name__)

#: Sources whose patients form series (kaggle is one slice per patient).
SERIES_SOURCES = ("ct_ich_dev", "phe_sich")
#: The series whose sensitivity and specificity matter (both classes, trauma).
DECISION_SOURCE = "ct_ich_dev"


@dataclass(frozen=True)
class SeriesVariant:
    """One series-model design: context kind and whether it reads embeddings.

    ``members`` models are trained with seeds ``seed``, ``seed + 1``, ... and
    their series probabilities averaged: one model this small, trained on a
    hundred-odd series, moves with its seed about as much as between designs.
    """

    kind: str = "gru"
    embeddings: bool = False
    hidden: int = 32
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-2
    series_weight: float = 2.0
    seed: int = 0
    members: int = 1
    pooled: bool = True

    @property
    def name(self) -> str:
        """Short label for tables: ``gru+emb`` or ``tcn``."""
        return self.kind + ("+emb" if self.embeddings else "") + ("" if self.pooled else "-max")


@dataclass
class Series:
    """One patient's series, slices in anatomical order, out of fold."""

    patient: str
    source: str
    fold: int
    labels: np.ndarray  # (T,)
    head: np.ndarray  # (T,)
    probabilities: np.ndarray  # (V, T): plain view first
    embeddings: np.ndarray  # (V, T, D) float16

    @property
    def label(self) -> int:
        """1 when any slice bleeds."""
        return int(self.labels.max())

    def features(self, view_of_slice: np.ndarray | None, use_embeddings: bool) -> np.ndarray:
        """(T, F) features; ``view_of_slice`` picks a view per slice (None: the plain view)."""
        views = np.zeros(len(self.labels), int) if view_of_slice is None else view_of_slice
        rows = np.arange(len(self.labels))
        embeddings = self.embeddings[views, rows].astype(np.float32) if use_embeddings else None
        return series_features(self.probabilities[views, rows], self.head, embeddings)


def load_series_table(fold_results: list[dict], dataset: Dataset) -> list[Series]:
    """Assemble out-of-fold series from saved folds (``test_idx``, probabilities, embeddings)."""
    n = len(dataset.records)
    fold_of = np.full(n, -1)
    probabilities: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    for fold, stored in enumerate(fold_results):
        idx = stored["test_idx"]
        if probabilities is None:
            views, _, dim = stored["embeddings"].shape
            probabilities = np.zeros((views, n), np.float32)
            embeddings = np.zeros((views, n, dim), np.float16)
        fold_of[idx] = fold
        probabilities[:, idx] = stored["probabilities"]
        embeddings[:, idx] = stored["embeddings"]
    series = []
    orders = np.array([r.order for r in dataset.records])
    for patient in np.unique(dataset.patients):
        members = np.flatnonzero(dataset.patients == patient)
        source = dataset.records[members[0]].source
        if source not in SERIES_SOURCES:
            continue
        members = members[np.argsort(orders[members])]
        series.append(
            Series(
                patient,
                source,
                int(fold_of[members[0]]),
                dataset.labels[members],
                dataset.head_fractions[members],
                probabilities[:, members],
                embeddings[:, members],
            )
        )
    return series


def series_from_oof_csv(path: Path) -> list[Series]:
    """Series from a run's ``oof.csv`` alone: the plain view's probabilities, no embeddings.

    For slice-model runs made before fold results were saved; only series
    models that read no embeddings can train on these.
    """
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["source"] in SERIES_SOURCES]
    series = []
    for patient in sorted({r["patient"] for r in rows}):
        members = sorted(
            (r for r in rows if r["patient"] == patient), key=lambda r: int(r["order"])
        )
        p = np.array([[float(r["probability"]) for r in members]], np.float32)
        series.append(
            Series(
                patient,
                members[0]["source"],
                int(members[0]["fold"]),
                np.array([int(r["label"]) for r in members]),
                np.array([float(r["head_fraction"]) for r in members], np.float32),
                p,
                np.zeros((1, p.shape[1], 0), np.float16),
            )
        )
    return series


def train_series_model(series: list[Series], variant: SeriesVariant) -> SeriesNet:
    """Fit a series model on out-of-fold series, in zero-padded batches of 16.

    One thread: on a model this small, more threads cost more than they give
    (measured 10x slower with two threads beside a training job).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(series, variant)
    finally:
        torch.set_num_threads(threads)


def _fit(series: list[Series], variant: SeriesVariant) -> SeriesNet:
    torch.manual_seed(variant.seed)
    rng = np.random.default_rng(variant.seed)
    n_features = series[0].features(None, variant.embeddings).shape[1]
    model = SeriesNet(n_features, variant.kind, variant.hidden, pooled=variant.pooled)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=variant.lr, weight_decay=variant.weight_decay
    )
    views = series[0].probabilities.shape[0]
    model.train()
    for _ in range(variant.epochs):
        order = rng.permutation(len(series))
        for start in range(0, len(order), _BATCH):
            batch = [
                _training_sample(series[i], rng, views, variant)
                for i in order[start : start + _BATCH]
            ]
            features, labels, lengths, weights = _pad(batch)
            slice_logits, series_logits = model(features, lengths)
            mask = torch.arange(features.shape[1])[None] < lengths[:, None]
            slice_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                slice_logits[mask], labels[mask]
            )
            series_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                series_logits, labels.amax(1), weight=weights
            )
            optimizer.zero_grad(set_to_none=True)
            (slice_loss + variant.series_weight * series_loss).backward()
            optimizer.step()
    return model.eval()


#: Series per training step.
_BATCH = 16


def _training_sample(s: Series, rng: np.random.Generator, views: int, variant: SeriesVariant):
    """A random variant of one series: a view per slice, sometimes every second slice only."""
    keep = np.arange(len(s.labels))
    if len(keep) > 8 and rng.random() < 0.3:  # thicker slices
        keep = keep[rng.integers(0, 2) :: 2]
    features = s.features(rng.integers(0, views, len(s.labels)), variant.embeddings)[keep]
    # phe_sich has no normal series: its series labels would only teach "every series bleeds".
    weight = 1.0 if s.source == DECISION_SOURCE else 0.0
    return features, s.labels[keep].astype(np.float32), weight


def _pad(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(labels) for _, labels, _ in batch)
    features = np.zeros((len(batch), longest, batch[0][0].shape[1]), np.float32)
    labels = np.zeros((len(batch), longest), np.float32)
    for row, (f, y, _) in enumerate(batch):
        features[row, : len(y)] = f
        labels[row, : len(y)] = y
    lengths = torch.tensor([len(y) for _, y, _ in batch])
    weights = torch.tensor([w for *_, w in batch], dtype=torch.float32)
    return torch.from_numpy(features), torch.from_numpy(labels), lengths, weights


def train_series_ensemble(series: list[Series], variant: SeriesVariant) -> SeriesEnsemble:
    """``variant.members`` series models, seeds ``seed``, ``seed + 1``, ..., averaged."""
    return SeriesEnsemble(
        [
            train_series_model(series, replace(variant, seed=variant.seed + member))
            for member in range(variant.members)
        ]
    ).eval()


def series_model_score(model: SeriesEnsemble, series: Series, use_embeddings: bool) -> float:
    """P(the series bleeds) from the plain views."""
    with torch.inference_mode():
        features = torch.from_numpy(series.features(None, use_embeddings))[None]
        return float(model(features)[1][0])


#: The servable series rules (client.series), scored from the plain view's probabilities.
FIXED_RULES: dict[str, Callable[[Series], float]] = {
    rule: (lambda s, rule=rule: rule_score(rule, s.probabilities[0], s.head)[0])
    for rule in SERIES_RULES
}


@dataclass
class NestedResult:
    """Outer-fold scores and nested-threshold decisions of one series score."""

    name: str
    patients: list[str]
    labels: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    thresholds: list[float]


def _decision_labels(series: list[Series]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.array([s.source == DECISION_SOURCE for s in series])
    return mask, np.array([s.label for s in series])


def nested_evaluation(
    series: list[Series],
    score_fn: Callable[[list[Series], list[Series]], np.ndarray],
    name: str,
    target_sensitivity: float,
) -> NestedResult:
    """Outer-fold scores of ``score_fn(train, test)``, thresholds from inner folds only.

    Only ``DECISION_SOURCE`` series are scored and decided; the others train.
    """
    folds = sorted({s.fold for s in series})
    patients, labels, scores, flagged, thresholds = [], [], [], [], []
    for outer in folds:
        train = [s for s in series if s.fold != outer]
        test = [s for s in series if s.fold == outer and s.source == DECISION_SOURCE]
        inner_scores, inner_labels = [], []
        for inner in sorted({s.fold for s in train}):
            inner_train = [s for s in train if s.fold != inner]
            inner_test = [s for s in train if s.fold == inner and s.source == DECISION_SOURCE]
            if inner_test:
                inner_scores.append(score_fn(inner_train, inner_test))
                inner_labels.append([s.label for s in inner_test])
        threshold = threshold_for_sensitivity(
            np.concatenate(inner_labels), np.concatenate(inner_scores), target_sensitivity
        )
        outer_scores = score_fn(train, test)
        thresholds.append(threshold)
        patients += [s.patient for s in test]
        labels += [s.label for s in test]
        scores.append(outer_scores)
        flagged.append(outer_scores >= threshold)
    return NestedResult(
        name,
        patients,
        np.array(labels),
        np.concatenate(scores),
        np.concatenate(flagged),
        thresholds,
    )


def fixed_rule_scorer(rule: Callable[[Series], float]):
    """A ``score_fn`` for a rule that needs no training."""
    return lambda train, test: np.array([rule(s) for s in test])


def series_model_scorer(variant: SeriesVariant, progress: tqdm | None = None):
    """A ``score_fn`` that trains the series model on ``train`` and scores ``test``."""

    def score(train: list[Series], test: list[Series]) -> np.ndarray:
        ensemble = train_series_ensemble(train, variant)
        if progress is not None:
            progress.update()
        return np.array([series_model_score(ensemble, s, variant.embeddings) for s in test])

    return score
