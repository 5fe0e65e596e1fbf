"""Does the ImageNet start help? One outer fold, same budget, pretrained against random.

The full cross-validation trains each model once per fold, so comparing two
initializations there doubles hours of CPU. This runs the first outer fold of
the same patient-grouped split twice on an equal, reduced budget (no early
stopping, no fine-tune) and scores the held-out patients, pooled and per source.

    python -m build_engines compare-init --model mobilenet_v2 --epochs 4
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from build_engines.crossval import patient_folds
from build_engines.data import load_dataset
from build_engines.train import TrainConfig, predict_views, train_model
from client.registry import ModelSpec

logger = logging.getLogger(__name__)


def compare_initializations(
    spec: ModelSpec, config: TrainConfig, data_dir: Path, out_path: Path, n_folds: int = 5
) -> dict:
    """Train fold 1 from ImageNet and from random weights; write and return the AUCs."""
    dataset = load_dataset(data_dir, spec)
    train_idx, test_idx = patient_folds(dataset, n_folds, config.seed)[0]
    labels, sources = dataset.labels[test_idx], dataset.sources[test_idx]
    runs = []
    for pretrained in (True, False):
        run_config = replace(config, pretrained=pretrained, finetune_epochs=0)
        started = time.perf_counter()
        name = "imagenet" if pretrained else "random"
        result = train_model(spec, dataset, train_idx, None, run_config, desc=name)
        p = predict_views(result.model, dataset.views[test_idx], spec)
        run = {
            "initialization": name,
            "train_seconds": round(time.perf_counter() - started, 1),
            "roc_auc": float(roc_auc_score(labels, p)),
        }
        for source in np.unique(sources):
            mask = sources == source
            run[f"roc_auc_{source}"] = float(roc_auc_score(labels[mask], p[mask]))
        logger.info("%s", run)
        runs.append(run)
    report = {
        "model": spec.name,
        "fold": f"1 of {n_folds}",
        "held_out_slices": len(test_idx),
        "epochs": config.epochs,
        "samples_per_epoch": config.samples_per_epoch,
        "low_res": config.low_res,
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    return report
