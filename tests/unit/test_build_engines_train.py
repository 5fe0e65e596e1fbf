import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from build_engines.crossval import Teacher, run_directory, run_training
from build_engines.data import index_records, load_dataset
from build_engines.model_card import REPORTS_DIR
from build_engines.train import TrainConfig, train_model
from client.constants import REPO_ROOT
from client.registry import get_model, list_models
from client.torch_models import file_sha256


def _small_subset(data_dir: Path):
    """12 kaggle patients and 4 trauma series: enough for 2 stratified folds."""
    records = index_records(data_dir)
    kaggle = [r for r in records if r.source == "kaggle_head_ct"]
    trauma = {"ct_ich_dev/049", "ct_ich_dev/050", "ct_ich_dev/070", "ct_ich_dev/071"}
    return kaggle[:6] + kaggle[-6:] + [r for r in records if r.patient in trauma]


def test_smoke_training_run_writes_weights_report_and_figures(data_dir: Path, tmp_path):
    subset = _small_subset(data_dir)
    config = TrainConfig(epochs=2, low_res=64, samples_per_epoch=32, batch_size=16)
    report = run_training(
        get_model("mobilenet_v2"),
        config,
        data_dir,
        tmp_path / "report",
        tmp_path / "weights",
        n_folds=2,
        records=subset,
        runs_dir=tmp_path / "runs",
    )
    assert 0.0 <= report["pooled"]["roc_auc"]["value"] <= 1.0
    for figure in ("curves.png", "roc.png", "confusion_slices.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000
    facts = json.loads((tmp_path / "weights" / "mobilenet_v2.json").read_text())
    assert facts["weights_sha256"] == file_sha256(tmp_path / "weights" / "mobilenet_v2.safetensors")
    assert 0.0 <= facts["threshold"] <= 1.0
    assert len(facts["reference_predictions"]) == 5
    (run_dir,) = (tmp_path / "runs").iterdir()
    fold = np.load(run_dir / "fold0.npz")
    n_test = len(fold["test_idx"])
    assert fold["probabilities"].shape == (3, n_test)  # plain view + 2 augmented
    assert fold["embeddings"].shape == (3, n_test, 1280)


def test_a_final_model_stops_after_the_given_epoch_of_the_full_schedule(data_dir: Path):
    """No early-stopping patients: it runs ``stop_after`` epochs, then the fine-tune."""
    subset = _small_subset(data_dir)
    dataset = load_dataset(data_dir, get_model("mobilenet_v2"), subset)
    config = TrainConfig(epochs=4, low_res=64, samples_per_epoch=16, batch_size=8)
    everyone = np.arange(len(dataset.records))
    result = train_model(get_model("mobilenet_v2"), dataset, everyone, None, config, stop_after=2)
    assert result.best_epoch == 2
    assert [r.get("finetune", False) for r in result.history] == [False, False, True]


@pytest.mark.parametrize("keep", ["lowest_loss", "last"])
def test_each_fold_keeps_the_epoch_its_setting_names(data_dir: Path, keep):
    """Early stopping keeps the lowest held-out loss; ``last`` runs the whole schedule."""
    subset = _small_subset(data_dir)
    dataset = load_dataset(data_dir, get_model("mobilenet_v2"), subset)
    config = TrainConfig(
        epochs=3, low_res=64, samples_per_epoch=16, batch_size=8, patience=1, keep=keep
    )
    held_out = np.isin(dataset.patients, ["ct_ich_dev/049", "ct_ich_dev/070"])
    result = train_model(
        get_model("mobilenet_v2"),
        dataset,
        np.flatnonzero(~held_out),
        np.flatnonzero(held_out),
        config,
    )
    epochs = [r for r in result.history if not r.get("finetune")]
    losses = [r["val_loss"] for r in epochs]
    if keep == "lowest_loss":
        assert result.best_epoch == epochs[int(np.argmin(losses))]["epoch"]
    else:
        assert len(losses) == result.best_epoch == config.epochs


def test_a_changed_setting_never_resumes_another_settings_folds(data_dir: Path, tmp_path):
    spec = get_model("mobilenet_v2")
    dataset = load_dataset(data_dir, spec, _small_subset(data_dir))
    default = run_directory(spec, TrainConfig(), dataset, 2, tmp_path)
    assert run_directory(spec, TrainConfig(), dataset, 2, tmp_path) == default
    assert run_directory(spec, TrainConfig(keep="last"), dataset, 2, tmp_path) != default


def test_a_rerun_resumes_from_the_saved_folds(data_dir: Path, tmp_path):
    """A run stopped after its folds picks them up again instead of retraining."""
    subset = _small_subset(data_dir)
    config = TrainConfig(epochs=1, low_res=64, samples_per_epoch=16, batch_size=8)
    runs = tmp_path / "runs"
    args = (get_model("mobilenet_v2"), config, data_dir, tmp_path / "report", tmp_path / "w")
    first = run_training(*args, n_folds=2, records=subset, runs_dir=runs)
    folds = sorted(next(runs.iterdir()).glob("fold*.npz"))
    stamps = [f.stat().st_mtime_ns for f in folds]
    second = run_training(*args, n_folds=2, records=subset, runs_dir=runs)
    assert [f.stat().st_mtime_ns for f in folds] == stamps
    assert second["pooled"]["roc_auc"] == first["pooled"]["roc_auc"]


def test_a_student_is_distilled_fold_by_fold_from_the_teachers_run(data_dir: Path, tmp_path):
    """Fold k's student learns from the teacher's fold-k model; other folds are refused."""
    subset = _small_subset(data_dir)
    config = TrainConfig(epochs=1, low_res=64, samples_per_epoch=16, batch_size=8)
    teacher_spec = get_model("mobilenet_v2")
    runs = tmp_path / "runs"
    run_training(teacher_spec, config, data_dir, tmp_path / "t", tmp_path / "tw", 2, subset, runs)
    (teacher_run,) = runs.iterdir()
    teacher = Teacher(teacher_spec, teacher_run, tmp_path / "tw" / "mobilenet_v2.safetensors")

    run_training(
        get_model("resnet18"),
        replace(config, distill_weight=0.5),
        data_dir,
        tmp_path / "s",
        tmp_path / "sw",
        2,
        subset,
        runs,
        teacher=teacher,
    )
    training = json.loads((tmp_path / "s" / "training.json").read_text())
    assert training["config"]["distill_weight"] == 0.5
    assert (tmp_path / "sw" / "resnet18.safetensors").exists()
    held_out = np.load(teacher_run / "fold0.npz")["test_idx"]
    with pytest.raises(ValueError, match="other slices"):
        teacher.fold_model(0, held_out[1:])


def test_a_teacher_trained_on_another_machine_is_refused_with_the_reason(tmp_path):
    """Fold models live in the git-ignored .cache: a clone has the report, not the folds."""
    (tmp_path / "training.json").write_text(json.dumps({"fold_results": ".cache/runs/gone"}))
    with pytest.raises(ValueError, match="no fold models on this machine"):
        Teacher.from_report(get_model("mobilenet_v2"), tmp_path)


def test_make_train_retrains_each_served_model_the_way_its_weights_were_made():
    """The Makefile's recipe, read against each served model's sidecar and training report."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^train:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    commands, steps = {}, []
    for line in recipe.splitlines():
        args = shlex.split(line)
        if args[1:3] == ["-m", "build_engines"] and "--model" in args:
            steps.append((args[3], args[args.index("--model") + 1]))
            if args[3] == "train":
                commands[steps[-1][1]] = args

    def flag(args: list[str], name: str, default):
        return args[args.index(name) + 1] if name in args else default

    for spec in list_models(precision="fp32", runtime="onnxruntime"):
        args = commands[spec.name]
        facts = json.loads(spec.facts_path.read_text())
        config = json.loads((REPORTS_DIR / spec.name / "training.json").read_text())["config"]
        # The served series rule and the CQ500 check at it come after training.
        trained = steps.index(("train", spec.name))
        assert steps[trained + 1 : trained + 3] == [("series", spec.name), ("evaluate", spec.name)]
        assert "series_rule" in facts
        assert ("--pretrained" in args) == facts["pretrained"] == config["pretrained"]
        assert flag(args, "--teacher", None) == facts.get("teacher")
        for name, key in (
            ("--low-res", "low_res"),
            ("--context", "context"),
            ("--scalp", "scalp"),
            ("--sampling", "sampling"),
            ("--keep", "keep"),
        ):
            default = getattr(TrainConfig, key)
            assert str(flag(args, name, default)) == str(config.get(key, default)), (spec.name, key)
