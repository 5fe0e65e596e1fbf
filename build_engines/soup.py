r"""A weight soup: one network whose weights average several training runs' models.

Runs of one architecture fine-tuned from the same ImageNet start stay close enough
in weight space that their average is a good model itself (a uniform "model soup",
Wortsman et al., ICML 2022), often scoring like the runs' ensemble at one network's
cost, so serving is unchanged. A soup of runs made on the same folds is a run: fold
k's soup averages the runs' fold-k models, none of which saw fold k's patients, so
its held-out scores are out of fold. Its held-out slices are embedded as a trained
fold's are, so ``series`` and ``ablation`` read it like any run, and the final soup
averages the runs' final weights.

    python -m build_engines soup --model mobilenet_v2 \
        --member /work/a/reports/mobilenet_v2 /work/a/weights \
        --member /work/b/reports/mobilenet_v2 /work/b/weights \
        --report-dir /work/soup/reports/mobilenet_v2 --weights-dir /work/soup/weights
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from build_engines.ablation import finished_folds
from build_engines.crossval import RUNS_DIR, repo_relative, save_fold, write_run
from build_engines.data import SliceRecord, load_dataset
from build_engines.train import TrainConfig
from client.constants import REPO_ROOT
from client.registry import ModelSpec
from client.torch_models import build_model, file_sha256

logger = logging.getLogger(__name__)

#: Settings that change what a model is given; a soup's members must agree on them.
_INPUT_SETTINGS = ("context", "scalp")


@dataclass(frozen=True)
class Member:
    """A finished training run: its fold results and its final weights."""

    run_dir: Path
    final_weights: Path
    config: TrainConfig

    @classmethod
    def from_dirs(cls, spec: ModelSpec, report_dir: Path, weights_dir: Path) -> Member:
        """The run that ``train --report-dir report_dir --weights-dir weights_dir`` wrote."""
        training = json.loads((report_dir / "training.json").read_text())
        known = {f.name for f in fields(TrainConfig)}
        return cls(
            REPO_ROOT / training["fold_results"],
            weights_dir / f"{spec.name}.safetensors",
            TrainConfig(**{k: v for k, v in training["config"].items() if k in known}),
        )


def soup_model(spec: ModelSpec, paths: list[Path]) -> torch.nn.Module:
    """``spec.arch`` with the uniform average of the fp16 weight files at ``paths``, in eval mode.

    Integer buffers (batch-norm step counts) are taken from the first file.
    """
    states = [load_file(path) for path in paths]
    averaged = {
        name: torch.stack([s[name].float() for s in states]).mean(0)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in states[0].items()
    }
    model = build_model(spec)
    model.load_state_dict(averaged)
    return model.eval()


def make_soup(
    spec: ModelSpec,
    members: list[Member],
    data_dir: Path,
    report_dir: Path,
    weights_dir: Path,
    runs_dir: Path = RUNS_DIR,
    records: list[SliceRecord] | None = None,
) -> dict:
    """Soup ``members`` fold by fold and as final weights; write the soup's run and reports.

    ``records`` are the slices the members trained on (default: every labelled slice).
    A fold already souped in the soup's run folder is kept (a rerun resumes).

    Returns:
        The soup's evaluation report (also written to ``report_dir / "metrics.json"``).

    Raises:
        ValueError: fewer than two members, members given other input (context, scalp)
            or other finished folds, or a fold that held out other slices.
    """
    if len(members) < 2:
        raise ValueError("a soup needs at least two runs")
    config = members[0].config
    for member in members[1:]:
        for setting in _INPUT_SETTINGS:
            if getattr(member.config, setting) != getattr(config, setting):
                raise ValueError(f"the runs were trained on other input ({setting} differs)")
    folds = finished_folds(members[0].run_dir)
    if any(finished_folds(m.run_dir) != folds for m in members) or len(folds) < 2:
        raise ValueError("a soup needs runs that finished the same folds, at least two")
    dataset = load_dataset(data_dir, spec, records, config.scalp)
    run_dir = _soup_directory(spec, members, runs_dir)
    oof = np.full(len(dataset.records), np.nan)
    fold_of = np.full(len(dataset.records), -1)
    for fold in folds:
        held_out = [np.load(m.run_dir / f"fold{fold}.npz")["test_idx"] for m in members]
        if any(not np.array_equal(idx, held_out[0]) for idx in held_out):
            raise ValueError(f"fold {fold} held out other slices in the runs")
        saved = run_dir / f"fold{fold}.npz"
        if not saved.exists():
            model = soup_model(spec, [m.run_dir / f"fold{fold}.safetensors" for m in members])
            save_fold(saved, model, spec, dataset, held_out[0], config, fold, [])
            logger.info("fold %d souped", fold + 1)
        oof[held_out[0]] = np.load(saved)["probabilities"][0]
        fold_of[held_out[0]] = fold
    run = {
        "folds": len(folds),
        "soup_of": [
            {
                "fold_results": repo_relative(m.run_dir),
                "final_weights_sha256": file_sha256(m.final_weights),
            }
            for m in members
        ],
        "best_epochs": [],
        "final_epochs": 0,
        "histories": [],
        "final_history": [],
    }
    final = soup_model(spec, [m.final_weights for m in members])
    return write_run(
        spec,
        config,
        dataset,
        run_dir,
        (fold_of, oof),
        final,
        run,
        (data_dir, report_dir, weights_dir),
    )


def _soup_directory(spec: ModelSpec, members: list[Member], runs_dir: Path) -> Path:
    """The soup's run folder, keyed by its members' runs and final weights."""
    key = hashlib.sha1(
        json.dumps([[m.run_dir.name, file_sha256(m.final_weights)] for m in members]).encode()
    ).hexdigest()[:12]
    path = runs_dir / f"{spec.name}-soup-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path
