"""Fixtures of the unit tests that read training runs: tiny real runs, trained once a session."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from build_engines.crossval import run_training
from build_engines.data import index_records
from build_engines.train import TrainConfig
from client.registry import get_model

#: Two bleeding and two normal trauma series, so every fold can set a series threshold.
_TRAUMA = {"ct_ich_dev/085", "ct_ich_dev/050", "ct_ich_dev/122", "ct_ich_dev/128"}


#: The tiny run's variants: as served, with 2.5D input, with the scalp stripped.
TINY_RUN_VARIANTS = {"2d": {}, "2.5d": {"context": "2.5d"}, "strip": {"scalp": "strip"}}


@dataclass(frozen=True)
class TinyRuns:
    """Where each variant's tiny run wrote its folds, report and weights."""

    root: Path
    subset: list
    variants: dict

    def run_dir(self, variant: str) -> Path:
        """The variant's fold results (its one ``.cache/runs``-style folder)."""
        (folder,) = (self.root / variant / "runs").iterdir()
        return folder

    def report_dir(self, variant: str) -> Path:
        return self.root / variant / "report"

    def weights_dir(self, variant: str) -> Path:
        return self.root / variant / "weights"


@pytest.fixture(scope="session")
def tiny_runs(data_dir: Path, tmp_path_factory) -> TinyRuns:
    """The same tiny 2-fold run in each of :data:`TINY_RUN_VARIANTS`, on 16 patients."""
    tmp = tmp_path_factory.mktemp("ablation")
    records = index_records(data_dir)
    kaggle = [r for r in records if r.source == "kaggle_head_ct"]
    subset = kaggle[:6] + kaggle[-6:] + [r for r in records if r.patient in _TRAUMA]
    config = TrainConfig(epochs=1, low_res=64, samples_per_epoch=16, batch_size=8)
    for variant, change in TINY_RUN_VARIANTS.items():
        run_training(
            get_model("mobilenet_v2"),
            TrainConfig(**(vars(config) | change)),
            data_dir,
            tmp / variant / "report",
            tmp / variant / "weights",
            n_folds=2,
            records=subset,
            runs_dir=tmp / variant / "runs",
        )
    return TinyRuns(tmp, subset, TINY_RUN_VARIANTS)
