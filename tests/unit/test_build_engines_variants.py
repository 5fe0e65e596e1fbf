"""The CPU variants: registry entries, the report's table and the console default it picks."""

import json

import pytest

from build_engines.model_card import REPORTS_DIR
from build_engines.variants import fastest_within, format_variants, variants_of
from client.registry import get_model, list_models


def _row(model, auc_delta, sensitivity, specificity, batch8, precision="f32"):
    return {
        "model": model,
        "runtime": "openvino",
        "precision": precision,
        "auc": 0.98 + auc_delta,
        "auc_delta": auc_delta,
        "accuracy_delta": 0.0,
        "max_abs_diff": 0.01,
        "slice_decisions_changed": 0.0,
        "series_flags_changed": 0,
        "series_sensitivity": sensitivity,
        "series_specificity": specificity,
        # as read back from variants.json: JSON object keys are strings
        "slices_per_s": {"1": batch8 / 2, "8": batch8},
    }


REPORT = {
    "n_series": 39,
    "rows": [
        _row("fp32", 0.0, 0.9, 0.7, 100),
        _row("fast_but_worse_auc", -0.011, 0.9, 0.7, 900),
        _row("fast_but_more_false_alarms", -0.002, 0.9, 0.6, 800),
        _row("fast_but_misses_a_bleed", 0.0, 0.8, 0.8, 700),
        _row("chosen", -0.009, 0.9, 0.75, 300, precision="bf16"),
        _row("slower", 0.0, 0.9, 0.7, 200),
    ],
}


def test_fastest_within_skips_variants_that_lose_auc_or_series_decisions():
    assert fastest_within(REPORT) == "chosen"
    assert fastest_within(REPORT, max_auc_drop=0.02) == "fast_but_worse_auc"


def test_fastest_within_falls_back_to_fp32_when_nothing_qualifies():
    report = {"rows": [REPORT["rows"][0], REPORT["rows"][1]]}
    assert fastest_within(report) == "fp32"


def test_variant_table_shows_deltas_series_and_speed_ratio():
    table = format_variants(REPORT).splitlines()
    assert len(table) == 2 + len(REPORT["rows"])
    assert "| chosen | openvino | bf16 | 0.9710 (-0.0090) |" in table[6]
    assert "| 0/39 | 0.900, 0.750 | 150 | 300 (3.00×) |" in table[6]


def test_every_base_has_an_onnx_runtime_int8_and_three_openvino_variants():
    for base in list_models(precision="fp32", runtime="onnxruntime"):
        variants = variants_of(base)
        assert variants[0] == base
        assert {(s.runtime, s.precision) for s in variants[1:]} == {
            ("onnxruntime", "int8"),
            ("openvino", "fp32"),
            ("openvino", "bf16"),
            ("openvino", "int8"),
        }
        for spec in variants[1:]:
            assert spec.weights_name == base.name
            assert spec.threshold == base.threshold
            assert get_model(spec.graph_name).onnx_path.parent.parent.name == spec.graph_name


def test_console_default_is_the_recorded_fastest_variant():
    from console import DEFAULTS

    path = REPORTS_DIR / "mobilenet_v2" / "variants.json"
    if not path.exists():
        pytest.skip("no variants report; run 'python -m build_engines variants'")
    report = json.loads(path.read_text())
    assert DEFAULTS["MODEL_NAME"] == fastest_within(report)
    assert get_model(DEFAULTS["MODEL_NAME"]).weights_name == report["base"]


def test_openvino_runner_reports_the_precision_it_compiled(real_batch):
    ov = pytest.importorskip("openvino")
    from build_engines.runners import predict, runner_for

    spec = get_model("mobilenet_v2_openvino_bf16")
    if not spec.onnx_path.exists():
        pytest.skip("ONNX not built; run 'python -m build_engines export'")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    runner = runner_for(spec, threads=2)
    assert runner.precision == ("bf16" if has_bf16 else "f32")
    p = predict(runner, real_batch)
    assert p.shape == (len(real_batch),) and ((p >= 0) & (p <= 1)).all()
    assert runner_for(get_model("mobilenet_v2_openvino_int8"), threads=2).precision == "int8"
