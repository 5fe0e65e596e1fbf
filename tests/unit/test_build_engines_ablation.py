import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from build_engines.ablation import compare_runs, ensemble_folds, finished_folds
from build_engines.error_analysis import SUBTYPES
from client.registry import get_model


def test_each_run_records_its_input_where_serving_would_read_it(tiny_runs):
    assert len({tiny_runs.run_dir(variant).name for variant in tiny_runs.variants}) == len(
        tiny_runs.variants
    )
    for variant, change in tiny_runs.variants.items():
        training = json.loads((tiny_runs.report_dir(variant) / "training.json").read_text())
        facts = json.loads((tiny_runs.weights_dir(variant) / "mobilenet_v2.json").read_text())
        expected = {"context": "2d", "scalp": "keep"} | change
        for key, value in expected.items():
            assert training["config"][key] == facts[key] == value
        # The single-file path has no neighbours and keeps the scalp: only the
        # served input gets reference predictions.
        assert bool(facts["reference_predictions"]) == (variant == "2d")


def test_the_ablation_compares_both_runs_on_the_same_held_out_patients(tiny_runs, data_dir: Path):
    subset = tiny_runs.subset
    spec = get_model("mobilenet_v2")
    result = compare_runs(
        spec, data_dir, tiny_runs.run_dir("2d"), tiny_runs.run_dir("strip"), subset
    )
    assert result["folds"] == [0, 1]
    assert result["slices"] == len(subset)
    assert result["patients"] == len({r.patient for r in subset})
    for role in ("baseline", "candidate"):
        measures = result[role]
        assert 0.0 <= measures["pooled_roc_auc"]["value"] <= 1.0
        assert set(measures["series"]) == {"max_slice", "neighbour_pair"}
        head_fill = measures["specificity_by_head_fill"]
        assert len(head_fill) == 5 and all(0 <= g["specificity"] <= 1 for g in head_fill)
        by_subtype = measures["sensitivity_by_subtype"]
        assert [g["subtype"] for g in by_subtype] == list(SUBTYPES)
        seen = [g for g in by_subtype if g["slices"]]
        assert seen and all(0 <= g["sensitivity"] <= 1 for g in seen)


def test_the_ablation_refuses_runs_whose_folds_held_out_other_slices(tiny_runs, data_dir, tmp_path):
    subset = tiny_runs.subset
    other = shutil.copytree(tiny_runs.run_dir("2.5d"), tmp_path / "other")
    fold = dict(np.load(other / "fold1.npz"))
    fold["test_idx"] = fold["test_idx"][::-1]
    np.savez(other / "fold1.npz", **fold)
    with pytest.raises(ValueError, match="fold 1 held out other slices"):
        compare_runs(get_model("mobilenet_v2"), data_dir, tiny_runs.run_dir("2d"), other, subset)
    (other / "fold1.npz").unlink()
    assert finished_folds(other) == [0]
    with pytest.raises(ValueError, match="needs 2"):
        compare_runs(get_model("mobilenet_v2"), data_dir, tiny_runs.run_dir("2d"), other, subset)


def test_the_mirror_average_scores_a_slice_and_its_mirror_image_alike():
    torch = pytest.importorskip("torch")
    from build_engines.ablation import MirrorAverage
    from client.torch_models import load_model

    torch.manual_seed(0)
    model = load_model(get_model("mobilenet_v2"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        averaged = MirrorAverage(model)(x)
        torch.testing.assert_close(averaged, MirrorAverage(model)(x.flip(-1)))
        torch.testing.assert_close(averaged, (model(x) + model(x.flip(-1))) / 2)
        assert not torch.allclose(averaged, model(x))


def test_the_mirror_ablation_rescores_only_the_candidate(tiny_runs, data_dir: Path):
    subset = tiny_runs.subset
    spec, served = get_model("mobilenet_v2"), tiny_runs.run_dir("2d")
    plain = compare_runs(spec, data_dir, served, served, subset)
    mirrored = compare_runs(spec, data_dir, served, served, subset, mirror=True)
    same = {json.dumps(m) for m in (plain["candidate"], plain["baseline"], mirrored["baseline"])}
    assert len(same) == 1  # as JSON: a subtype without slices has sensitivity NaN
    assert mirrored["candidate"]["threshold"] != mirrored["baseline"]["threshold"]


def test_a_run_compares_with_the_committed_oof_csv_as_with_its_folder(tiny_runs, data_dir: Path):
    """The served run's folder stays where it trained; its reports' oof.csv travels."""
    subset = tiny_runs.subset
    spec, served = get_model("mobilenet_v2"), tiny_runs.run_dir("2d")
    oof_csv = tiny_runs.report_dir("2d") / "oof.csv"
    assert finished_folds(oof_csv) == finished_folds(served) == [0, 1]
    from_folder = compare_runs(spec, data_dir, served, tiny_runs.run_dir("strip"), subset)
    from_csv = compare_runs(spec, data_dir, oof_csv, tiny_runs.run_dir("strip"), subset)
    assert json.dumps(from_csv["candidate"]) == json.dumps(from_folder["candidate"])  # NaN
    # oof.csv keeps 6 decimals of each probability: the same measures, to that rounding.
    baseline, rebuilt = from_folder["baseline"], from_csv["baseline"]
    assert rebuilt["threshold"] == pytest.approx(baseline["threshold"], abs=1e-6)
    assert rebuilt["pooled_roc_auc"]["value"] == pytest.approx(
        baseline["pooled_roc_auc"]["value"], abs=1e-3
    )
    for rule in ("max_slice", "neighbour_pair"):
        assert rebuilt["series"][rule]["roc_auc"]["value"] == pytest.approx(
            baseline["series"][rule]["roc_auc"]["value"], abs=1e-3
        )


def test_an_ensemble_candidate_averages_its_members_logits(tiny_runs, data_dir: Path, tmp_path):
    subset = tiny_runs.subset
    spec, served, strip = (
        get_model("mobilenet_v2"),
        tiny_runs.run_dir("2d"),
        tiny_runs.run_dir("strip"),
    )
    alone = compare_runs(spec, data_dir, served, [strip], subset)
    doubled = compare_runs(spec, data_dir, served, [strip, strip], subset)
    assert doubled["candidate_run"] == f"{alone['candidate_run']} + {alone['candidate_run']}"
    assert doubled["candidate"]["threshold"] == pytest.approx(
        alone["candidate"]["threshold"], abs=1e-5
    )
    # Odds 1 and 9 average, as logits, to odds 3: probability 0.75, not (0.5 + 0.9) / 2.
    idx = np.array([3, 1])
    members = [[{"test_idx": idx, "probabilities": np.array([[p, 0.2]])}] for p in (0.5, 0.9)]
    (fold,) = ensemble_folds(members)
    np.testing.assert_array_equal(fold["test_idx"], idx)
    np.testing.assert_allclose(fold["probabilities"], [[0.75, 0.2]], rtol=1e-5)
    with pytest.raises(ValueError, match="not an ensemble"):
        compare_runs(spec, data_dir, served, [served, strip], subset, mirror=True)
    other = shutil.copytree(strip, tmp_path / "other")
    fold = dict(np.load(other / "fold0.npz"))
    fold["test_idx"] = fold["test_idx"][::-1]
    np.savez(other / "fold0.npz", **fold)
    with pytest.raises(ValueError, match="fold 0 held out other slices"):
        compare_runs(spec, data_dir, served, [strip, other], subset)
