"""The committed weights load through the client and reproduce their recorded predictions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.decode import decode_file
from client.preprocess import model_view, normalize
from client.registry import ModelSpec, get_model, list_models
from client.torch_models import load_model


@pytest.mark.parametrize(
    "spec", list_models(precision="fp32", runtime="onnxruntime"), ids=lambda s: s.name
)
def test_committed_weights_reproduce_recorded_predictions(spec, data_dir: Path):
    facts = json.loads(spec.facts_path.read_text())
    model = load_model(spec)
    assert facts["reference_predictions"], "no reference predictions recorded"
    with torch.inference_mode():
        for name, expected in facts["reference_predictions"].items():
            x = torch.from_numpy(_float_path(data_dir / name, spec))[None]
            probability = float(torch.softmax(model(x), 1)[0, 1])
            assert probability == pytest.approx(expected, abs=1e-4), name


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_registered_model_has_a_threshold_in_unit_range(spec):
    assert 0.0 < spec.threshold < 1.0
    assert 0.0 < spec.series_threshold < 1.0


def test_weights_are_small_fp16_files():
    total = sum(
        get_model(s.name).weights_path.stat().st_size
        for s in list_models(precision="fp32", runtime="onnxruntime")
    )
    assert total < 40 * 1024 * 1024


def _float_path(path: Path, spec: ModelSpec) -> np.ndarray:
    """The float view normalized, without the uint8 rounding of the served input.

    The recorded predictions predate the uint8 model input (issue 10); they
    pin the weights, and the float view reproduces them exactly. The uint8
    input moves them by a few 1e-4 (measured by benchmarks/bench_wire.py).
    """
    return normalize(model_view(decode_file(path), spec), spec)
