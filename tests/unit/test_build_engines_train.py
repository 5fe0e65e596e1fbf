import json
from pathlib import Path

from build_engines.crossval import run_training
from build_engines.data import index_records
from build_engines.train import TrainConfig
from client.registry import get_model
from client.torch_models import file_sha256


def test_smoke_training_run_writes_weights_report_and_figures(data_dir: Path, tmp_path):
    records = index_records(data_dir)
    kaggle = [r for r in records if r.source == "kaggle_head_ct"]
    trauma = {"ct_ich_dev/049", "ct_ich_dev/050", "ct_ich_dev/070", "ct_ich_dev/071"}
    subset = kaggle[:6] + kaggle[-6:] + [r for r in records if r.patient in trauma]
    config = TrainConfig(epochs=2, low_res=64, samples_per_epoch=32, batch_size=16)
    report = run_training(
        get_model("mobilenet_v2"),
        config,
        data_dir,
        tmp_path / "report",
        tmp_path / "weights",
        n_folds=2,
        records=subset,
    )
    assert 0.0 <= report["pooled"]["roc_auc"]["value"] <= 1.0
    for figure in ("curves.png", "roc.png", "confusion_slices.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000
    facts = json.loads((tmp_path / "weights" / "mobilenet_v2.json").read_text())
    assert facts["weights_sha256"] == file_sha256(tmp_path / "weights" / "mobilenet_v2.safetensors")
    assert 0.0 <= facts["threshold"] <= 1.0
    assert len(facts["reference_predictions"]) == 5
