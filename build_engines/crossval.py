"""The whole training run for one model: 5-fold CV, evaluation, final model, weights.

Folds are patient-grouped and stratified by source and label
(``StratifiedGroupKFold``), so no patient is ever in two folds. Inside each
fold, 10% of the training patients are held out for early stopping. The final
model trains on every patient on the folds' learning-rate schedule and stops
after their median best epoch, where the fold models were kept, so it comes as
close as it can to the models whose out-of-fold scores chose its thresholds.
Out-of-fold predictions are written to ``oof.csv`` so evaluation and figures
can be regenerated without retraining (``python -m build_engines evaluate``).

A run is resumable fold by fold: each fold's model, out-of-fold probabilities
and out-of-fold slice embeddings (the plain view and a few augmented views,
the series model's training input) are saved under ``.cache/runs/<run key>/``
as the fold finishes, and a rerun of the same configuration skips what exists.

    run_training(get_model("resnet18"), TrainConfig(), data_dir, report_dir, WEIGHTS_DIR)

A student can be distilled from a teacher's run (``Teacher``): fold k's
student learns from the teacher's fold-k model, which never saw fold k's
patients either, and the final student from the teacher's final weights.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from build_engines import augment
from build_engines.data import SOURCES, Dataset, SliceRecord, load_dataset
from build_engines.reference import reference_predictions
from build_engines.report import write_report
from build_engines.train import TrainConfig, embed_views, train_model
from client.constants import REPO_ROOT
from client.registry import PREPROCESSING_VERSION, ModelSpec
from client.torch_models import file_sha256, load_weights_file, save_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """A finished training run to distil from: its fold models and its final weights."""

    spec: ModelSpec
    run_dir: Path
    final_weights: Path

    @classmethod
    def from_report(cls, spec: ModelSpec, report_dir: Path) -> Teacher:
        """The run recorded in ``report_dir/training.json`` with the served weights.

        Raises:
            ValueError: that run's fold models are not on this machine (trained
                elsewhere, or before runs were saved).
        """
        training = json.loads((report_dir / "training.json").read_text())
        run_dir = REPO_ROOT / training.get("fold_results", "")
        if "fold_results" not in training or not (run_dir / "fold0.safetensors").exists():
            raise ValueError(
                f"{spec.name}'s run in {report_dir} left no fold models on this machine"
                " (.cache is not in git); retrain it here first"
            )
        return cls(spec, run_dir, spec.weights_path)

    def fold_model(self, fold: int, test_idx: np.ndarray) -> torch.nn.Module:
        """The teacher's model of ``fold``, checked to have held out the same slices.

        Raises:
            ValueError: the teacher's folds differ (other data or seed).
        """
        held_out = np.load(self.run_dir / f"fold{fold}.npz")["test_idx"]
        if not np.array_equal(np.sort(held_out), np.sort(test_idx)):
            raise ValueError(
                f"teacher fold {fold} held out other slices; use the same data and seed"
            )
        return load_weights_file(self.spec, self.run_dir / f"fold{fold}.safetensors")


#: Fold results of every training configuration (git-ignored, reused by reruns).
RUNS_DIR = REPO_ROOT / ".cache" / "runs"
#: Augmented views embedded per out-of-fold slice, besides the plain view.
EMBEDDING_AUGMENTED_VIEWS = 2

OOF_COLUMNS = (
    "path",
    "source",
    "patient",
    "order",
    "label",
    "fold",
    "probability",
    "head_fraction",
)


def patient_folds(dataset: Dataset, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped folds, stratified by (source, label)."""
    strata = np.array([SOURCES.index(r.source) * 2 + r.label for r in dataset.records])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(strata)), strata, dataset.patients))


def _stopping_split(
    dataset: Dataset, train_idx: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ~10% of the training patients for early stopping."""
    sub = Dataset(
        [dataset.records[i] for i in train_idx], dataset.views[:0], dataset.head_fractions[:0]
    )
    n_splits = min(10, len(np.unique(sub.patients)))
    fit, stop = patient_folds(sub, n_splits, seed)[0]
    return train_idx[fit], train_idx[stop]


def run_training(
    spec: ModelSpec,
    config: TrainConfig,
    data_dir: Path,
    report_dir: Path,
    weights_dir: Path,
    n_folds: int = 5,
    records: list[SliceRecord] | None = None,
    runs_dir: Path = RUNS_DIR,
    teacher: Teacher | None = None,
    hard_negatives_from: Path | None = None,
) -> dict:
    """Cross-validate, evaluate, train the final model and write weights, facts and figures.

    Returns:
        The evaluation report (also written to ``report_dir / "metrics.json"``).
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir, spec, records, config.scalp)
    if hard_negatives_from is not None:
        dataset = replace(dataset, difficulty=read_difficulty(hard_negatives_from, dataset))
    run_dir = run_directory(spec, config, dataset, n_folds, runs_dir, teacher)
    oof = np.full(len(dataset.records), np.nan)
    fold_of = np.full(len(dataset.records), -1)
    histories, best_epochs = [], []
    for fold, (train_idx, test_idx) in enumerate(patient_folds(dataset, n_folds, config.seed)):
        saved = run_dir / f"fold{fold}.npz"
        if not saved.exists():
            teacher_model = None if teacher is None else teacher.fold_model(fold, test_idx)
            _run_fold(
                spec, config, dataset, fold, n_folds, train_idx, test_idx, saved, teacher_model
            )
        stored = np.load(saved)
        oof[test_idx] = stored["probabilities"][0]
        fold_of[test_idx] = fold
        histories.append(json.loads(str(stored["history"])))
        best_epochs.append(int(stored["best_epoch"]))
    final_epochs = max(1, int(np.median(best_epochs)))
    final = train_model(
        spec,
        dataset,
        np.arange(len(dataset.records)),
        None,
        config,
        desc=f"{spec.name} final",
        teacher=None if teacher is None else load_weights_file(teacher.spec, teacher.final_weights),
        stop_after=final_epochs,
    )
    run = {
        "folds": n_folds,
        "best_epochs": best_epochs,
        "final_epochs": final_epochs,
        "histories": histories,
        "final_history": final.history,
    }
    return write_run(
        spec,
        config,
        dataset,
        run_dir,
        (fold_of, oof),
        final.model,
        run,
        (data_dir, report_dir, weights_dir),
        None if teacher is None else teacher.spec.name,
    )


def write_run(
    spec: ModelSpec,
    config: TrainConfig,
    dataset: Dataset,
    run_dir: Path,
    out_of_fold: tuple[np.ndarray, np.ndarray],
    final_model: torch.nn.Module,
    run: dict,
    dirs: tuple[Path, Path, Path],
    teacher: str | None = None,
) -> dict:
    """Write a finished run: ``oof.csv``, final weights, ``training.json``, report and sidecar.

    Args:
        spec: the model trained.
        config: the training settings, recorded in ``training.json``.
        dataset: every slice of the run, in ``out_of_fold``'s order.
        run_dir: the run's fold results (``fold{k}.npz``).
        out_of_fold: each slice's fold and out-of-fold probability.
        final_model: the model trained on every patient, saved as the weights.
        run: what ``training.json`` records of how the run went (folds, epochs, histories).
        dirs: the data, report and weights folders.
        teacher: the registry name of the model it was distilled from.

    Returns:
        The evaluation report (also written to ``report_dir / "metrics.json"``).
    """
    data_dir, report_dir, weights_dir = dirs
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_oof(report_dir / "oof.csv", dataset, *out_of_fold)
    weights_path = weights_dir / f"{spec.name}.safetensors"
    sha256 = save_weights(final_model, weights_path)
    training = {
        "config": asdict(config),
        "fold_results": repo_relative(run_dir),
        **run,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu_inference_ms_per_image": _cpu_latency_ms(final_model, spec),
    }
    (report_dir / "training.json").write_text(json.dumps(training, indent=1))
    report = write_report(spec, report_dir)
    facts = {
        "threshold": report["threshold"],
        "series_threshold": report["series_threshold"],
        "weights_sha256": sha256,
        "preprocessing_version": PREPROCESSING_VERSION,
        "trained_at": training["trained_at"],
        "pretrained": config.pretrained,
        "teacher": teacher,
        "context": config.context,
        "scalp": config.scalp,
        # The reference files go through the client's single-file path, which
        # has no neighbours to give a 2.5D model and does not strip the scalp.
        "reference_predictions": reference_predictions(spec, weights_path, data_dir)
        if (config.context, config.scalp) == ("2d", "keep")
        else {},
    }
    (weights_dir / f"{spec.name}.json").write_text(json.dumps(facts, indent=1) + "\n")
    return report


def repo_relative(run_dir: Path) -> str:
    """A run folder as reports name it: relative to the repository when inside it."""
    run_dir = run_dir.absolute()  # not resolved: .cache may be a link out of the checkout
    return str(run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir)


def run_directory(
    spec: ModelSpec,
    config: TrainConfig,
    dataset: Dataset,
    n_folds: int,
    runs_dir: Path,
    teacher: Teacher | None = None,
) -> Path:
    """Where one configuration's fold results live: keyed by everything that shapes them.

    Only the settings that differ from the defaults enter the key, so a new
    setting (added with a default that keeps the old behaviour) leaves earlier
    runs resumable.
    """
    changed = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if getattr(config, f.name) != f.default
    }
    key = hashlib.sha1(
        json.dumps(
            [
                spec.name,
                changed,
                n_folds,
                PREPROCESSING_VERSION,
                [str(r.path) for r in dataset.records],
                inspect.getsource(augment),
                None
                if teacher is None
                else [teacher.run_dir.name, file_sha256(teacher.final_weights)],
            ]
        ).encode()
    ).hexdigest()[:12]
    path = runs_dir / f"{spec.name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def oof_key(record: SliceRecord) -> str:
    """A slice's ``path`` in ``oof.csv``, relative to the data folder: ``<source>/<dir>/<file>``."""
    return str(record.path.relative_to(record.path.parents[2]))


def read_difficulty(oof_csv: Path, dataset: Dataset) -> np.ndarray:
    """Per-slice out-of-fold probability from an earlier run's ``oof.csv`` (0 where absent)."""
    with oof_csv.open() as f:
        earlier = {r["path"]: float(r["probability"]) for r in csv.DictReader(f)}
    return np.array([earlier.get(oof_key(r), 0.0) for r in dataset.records], dtype=np.float32)


def _run_fold(
    spec: ModelSpec,
    config: TrainConfig,
    dataset: Dataset,
    fold: int,
    n_folds: int,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    saved: Path,
    teacher: torch.nn.Module | None = None,
) -> None:
    """Train one fold; save its model and its out-of-fold probabilities and embeddings."""
    fit_idx, stop_idx = _stopping_split(dataset, train_idx, config.seed + fold)
    result = train_model(
        spec,
        dataset,
        fit_idx,
        stop_idx,
        config,
        desc=f"{spec.name} fold {fold + 1}/{n_folds}",
        teacher=teacher,
    )
    save_fold(
        saved,
        result.model,
        spec,
        dataset,
        test_idx,
        config,
        fold,
        result.history,
        result.best_epoch,
    )
    logger.info("fold %d best epoch %d", fold + 1, result.best_epoch)


def save_fold(
    saved: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    dataset: Dataset,
    test_idx: np.ndarray,
    config: TrainConfig,
    fold: int,
    history: list[dict],
    best_epoch: int = 0,
) -> None:
    """Save a fold's model and its held-out slices' probabilities and embeddings.

    ``saved`` is the fold's ``fold{k}.npz``; the model goes beside it as
    ``fold{k}.safetensors``, written first, so a fold counts as done only once both are whole.
    """
    save_weights(model, saved.with_suffix(".safetensors"))
    probabilities, embeddings = embed_views(
        model,
        dataset.inputs(test_idx, config.context),
        spec,
        EMBEDDING_AUGMENTED_VIEWS,
        config.seed + fold,
    )
    partial = saved.with_suffix(".partial.npz")
    np.savez(
        partial,
        test_idx=test_idx,
        probabilities=probabilities,
        embeddings=embeddings.astype(np.float16),
        history=json.dumps(history),
        best_epoch=best_epoch,
    )
    partial.replace(saved)


def _write_oof(path: Path, dataset: Dataset, fold_of: np.ndarray, oof: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(OOF_COLUMNS)
        for record, fold, p, head in zip(
            dataset.records, fold_of, oof, dataset.head_fractions, strict=True
        ):
            writer.writerow(
                [
                    oof_key(record),
                    record.source,
                    record.patient,
                    record.order,
                    record.label,
                    int(fold),
                    f"{p:.6f}",
                    f"{head:.4f}",
                ]
            )


def _cpu_latency_ms(model: torch.nn.Module, spec: ModelSpec, repeats: int = 20) -> float:
    """Median batch-1 forward time on this CPU, in milliseconds."""
    x = torch.zeros(1, 3, spec.input_size, spec.input_size).to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))
