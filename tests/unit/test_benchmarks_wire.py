"""benchmarks/bench_wire.py: the bytes per slice and the score comparison it reports."""

import numpy as np
import pytest

from benchmarks.bench_wire import compare, payload_bytes
from client.preprocess import model_input
from client.registry import get_model


def test_uint8_input_is_a_quarter_of_the_float32_bytes_and_what_the_client_sends():
    spec = get_model("resnet18")
    sizes = payload_bytes(spec)
    assert sizes == {"float32": 602_112, "uint8": 150_528}
    view = np.zeros((1, spec.input_size, spec.input_size), np.float32)
    assert model_input(view).nbytes == sizes["uint8"]


def test_comparison_counts_deltas_auc_and_flipped_decisions():
    labels = np.array([0, 0, 1, 1])
    before = np.array([0.1, 0.4, 0.35, 0.9])
    after = np.array([0.1, 0.95, 0.35, 0.9])
    row = compare("m", before, after, labels, threshold=0.5)
    assert row["max_abs_dp"] == pytest.approx(0.55)
    assert row["auc_float"] == pytest.approx(0.75) and row["auc_uint8"] == pytest.approx(0.5)
    assert row["delta_auc"] == pytest.approx(-0.25)
    assert row["flips_at_threshold"] == 1
