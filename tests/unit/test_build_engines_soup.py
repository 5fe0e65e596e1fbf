"""build_engines/soup.py: a weight soup of runs is a run of its own, out of fold."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from build_engines.ablation import compare_runs
from build_engines.soup import Member, make_soup, soup_model
from client.registry import get_model
from client.torch_models import file_sha256


def _member(tiny_runs, variant: str) -> Member:
    spec = get_model("mobilenet_v2")
    return Member.from_dirs(spec, tiny_runs.report_dir(variant), tiny_runs.weights_dir(variant))


def test_a_soup_of_a_run_with_itself_is_that_run(tiny_runs, data_dir: Path, tmp_path):
    spec, served = get_model("mobilenet_v2"), _member(tiny_runs, "2d")
    report = make_soup(
        spec,
        [served, served],
        data_dir,
        tmp_path / "report",
        tmp_path / "weights",
        runs_dir=tmp_path / "runs",
        records=tiny_runs.subset,
    )
    # The average of equal fp16 weights is those weights (-0.0 may come back as 0.0).
    souped_weights = load_file(tmp_path / "weights" / "mobilenet_v2.safetensors")
    served_weights = load_file(served.final_weights)
    assert souped_weights.keys() == served_weights.keys()
    for name, tensor in served_weights.items():
        assert souped_weights[name].dtype == tensor.dtype
        assert torch.equal(souped_weights[name], tensor), name
    (soup_run,) = (tmp_path / "runs").iterdir()
    for k in (0, 1):
        own, souped = np.load(served.run_dir / f"fold{k}.npz"), np.load(soup_run / f"fold{k}.npz")
        np.testing.assert_array_equal(souped["test_idx"], own["test_idx"])
        # The fold scored its held-out slices in fp32, before its weights were saved in fp16.
        np.testing.assert_allclose(souped["probabilities"], own["probabilities"], atol=1e-3)
        assert souped["embeddings"].shape == own["embeddings"].shape
    trained = json.loads((tiny_runs.report_dir("2d") / "metrics.json").read_text())
    assert report["threshold"] == pytest.approx(trained["threshold"], abs=1e-3)
    training = json.loads((tmp_path / "report" / "training.json").read_text())
    assert [m["final_weights_sha256"] for m in training["soup_of"]] == [
        file_sha256(served.final_weights)
    ] * 2
    facts = json.loads((tmp_path / "weights" / "mobilenet_v2.json").read_text())
    assert facts["weights_sha256"] == file_sha256(tmp_path / "weights" / "mobilenet_v2.safetensors")
    assert facts["reference_predictions"]
    # The ablation reads the soup's run like a trained one.
    result = compare_runs(spec, data_dir, served.run_dir, soup_run, tiny_runs.subset)
    assert result["candidate"]["threshold"] == pytest.approx(
        result["baseline"]["threshold"], abs=1e-3
    )


def test_the_soup_averages_every_float_tensor(tmp_path):
    spec = get_model("mobilenet_v2")
    state = load_file(spec.weights_path)
    tripled = {k: v * 3 if v.is_floating_point() else v for k, v in state.items()}
    save_file(tripled, str(tmp_path / "tripled.safetensors"))
    souped = soup_model(spec, [spec.weights_path, tmp_path / "tripled.safetensors"]).state_dict()
    name = "features.0.0.weight"
    np.testing.assert_allclose(souped[name].numpy(), 2 * state[name].float().numpy(), rtol=1e-3)


def test_a_soup_refuses_runs_given_other_input(tiny_runs, data_dir: Path, tmp_path):
    spec = get_model("mobilenet_v2")
    served, stripped = _member(tiny_runs, "2d"), _member(tiny_runs, "strip")
    dirs = (data_dir, tmp_path / "report", tmp_path / "weights")
    with pytest.raises(ValueError, match="scalp differs"):
        make_soup(spec, [served, stripped], *dirs, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="at least two runs"):
        make_soup(spec, [served], *dirs, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "weights").exists()
