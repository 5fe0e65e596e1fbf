"""benchmarks/bench_series_int8.py: fp32 against INT8 series models, measured and reported."""

import json

import pytest

from benchmarks.bench_series_int8 import main
from client.registry import get_model
from client.series import SERIES_MODEL_RULE


def test_report_compares_both_graphs_on_every_ct_ich_dev_series(tmp_path, capsys):
    spec = get_model("resnet18", SERIES_MODEL_RULE)
    if not spec.series_onnx_path.exists():
        pytest.skip("series model not exported; run 'python -m build_engines export'")
    assert main(["--model", "resnet18", "--repeats", "3", "--results-dir", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "series_int8.json").read_text())["models"]
    assert result["model"] == "resnet18_series" and result["series"] == 39
    assert result["threshold"] == spec.series_threshold
    # Quantized, yet close: the same graph with INT8 MatMuls.
    assert 0 < result["max_abs_diff_series"] < 0.05
    assert len(result["median_ms"]) == 3
    assert all(ms["fp32"] > 0 and ms["int8"] > 0 for ms in result["median_ms"].values())
    table = (tmp_path / "series_int8.md").read_text()
    assert table.count("| resnet18_series |") == 3
    assert "resnet18_series" in capsys.readouterr().out
