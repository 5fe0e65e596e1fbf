from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.bench_serving import (
    NAIVE,
    from_png,
    inprocess_ratios,
    parse_args,
    paths_of,
    ratios,
    render_markdown,
    variants,
    verdict,
)
from benchmarks.bench_triton import Cell, run_cell
from benchmarks.naive_server import IMAGE_FIELD, NaiveServer, create_app
from client.classify import LocalClassifier
from client.preprocess import preprocess_file
from client.registry import get_model


@pytest.fixture(scope="module")
def slice_png(data_dir) -> Path:
    return data_dir / "kaggle_head_ct" / "head_ct" / "000.png"


def _cell(model, backend, concurrency, per_s, p95):
    return Cell(model, backend, concurrency, 10, per_s, p95 / 2, p95, p95 * 1.1)


def test_naive_app_scores_an_upload_like_the_local_classifier(slice_png):
    spec = get_model("mobilenet_v2")
    client = create_app(spec.name).test_client()
    with slice_png.open("rb") as f:
        response = client.post("/predict", data={IMAGE_FIELD: (f, "slice.png")})
    expected = LocalClassifier(spec).predict(preprocess_file(slice_png, spec)[None])[0]
    assert response.status_code == 200
    assert response.get_json()["probability"] == pytest.approx(float(expected), abs=1e-6)


def test_naive_server_runs_as_a_real_process_and_stops(slice_png):
    with NaiveServer("mobilenet_v2") as server:
        files = {IMAGE_FIELD: ("slice.png", slice_png.read_bytes(), "image/png")}
        answer = requests.post(server.url + "/predict", files=files, timeout=60).json()
        assert 0.0 <= answer["probability"] <= 1.0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/healthz", timeout=5)


def test_from_png_preprocesses_on_the_client_before_the_model(slice_png):
    spec = get_model("resnet18")
    seen = []
    from_png(spec, seen.append)(np.array([slice_png.read_bytes()], dtype=object))
    np.testing.assert_allclose(seen[0][0], preprocess_file(slice_png, spec))


def test_variants_pair_each_base_model_with_its_builds_in_runtime_and_precision_order():
    args = parse_args(["--precision", "fp32", "int8"])
    assert [s.name for s in variants("resnet18", args)] == [
        "resnet18",
        "resnet18_int8",
        "resnet18_openvino",
        "resnet18_openvino_int8",
    ]
    args = parse_args(["--precision", "int8", "--runtime", "onnxruntime"])
    assert [s.name for s in variants("mobilenet_v2", args)] == ["mobilenet_v2_int8"]


def test_openvino_entries_are_measured_served_only():
    args = parse_args(["--path", "onnxruntime", "grpc", "--concurrency", "8"])
    assert paths_of(get_model("mobilenet_v2_openvino_bf16"), args) == ["grpc"]
    assert paths_of(get_model("mobilenet_v2"), args) == ["onnxruntime", "grpc"]


def test_ratios_compare_triton_paths_with_naive_of_the_same_base_model():
    cells = [
        _cell("resnet18", NAIVE, 8, 5.0, 900.0),
        _cell("resnet18", "onnxruntime", 8, 40.0, 100.0),
        _cell("resnet18_int8", "grpc", 8, 30.0, 300.0),
        _cell("resnet18", "grpc", 4, 99.0, 10.0),
    ]
    (found,) = ratios(cells, 8)
    assert (found.model, found.served) == ("resnet18", "resnet18_int8 grpc")
    assert found.throughput_ratio == pytest.approx(6.0)
    assert "missed by 1.7x" in verdict([found], 10.0) and "(lower)" in verdict([found], 10.0)
    assert "target 5x: met" in verdict([found], 5.0)


def test_report_markdown_names_machine_command_table_and_plots():
    cells = [_cell("resnet18", NAIVE, 8, 5.0, 900.0), _cell("resnet18", "http", 8, 60.0, 90.0)]
    report = {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "gpu": "none",
            "load_1min_at_start": 0.1,
            "others_cpu_share": 0.05,
        },
        "date": "2030-01-01 00:00:00",
        "command": "python -m benchmarks.bench_serving",
        "duration_s": 1.0,
        "images": 4,
        "ratio_concurrency": 8,
        "target_ratio": 10.0,
        "cells": [asdict(c) for c in cells],
        "ratios": [asdict(r) for r in ratios(cells, 8)],
        "stages": {
            "resnet18": {
                "decode+preprocess": 3.0,
                "torch eager forward": 40.0,
                "onnxruntime fp32 forward": 17.0,
                "onnxruntime int8 forward": 7.0,
            }
        },
    }
    text = render_markdown(report)
    assert "Test CPU, 2 cores" in text and "`python -m benchmarks.bench_serving`" in text
    assert "| resnet18 | http | 8 | 10 | 60.0 | 45.0 | 90.0 | 99.0 |" in text
    assert "| resnet18 | resnet18 http | 12.00x | 900.0 | 90.0 |" in text
    assert "| resnet18 | 3.0 | 40.0 | 17.0 | 7.0 | 4.30x |" in text
    assert "![images/s vs concurrency](serving_throughput.png)" in text


def test_run_cell_raises_a_worker_error_instead_of_counting_it_as_slow():
    def failing(batch):
        raise ValueError("server said 500")

    with pytest.raises(ValueError, match="500"):
        run_cell(failing, np.zeros((4, 1)), 1, 2, 0.5)


def test_serving_reads_hemotriage_data_dir_and_takes_free_ports_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HEMOTRIAGE_DATA_DIR", str(tmp_path))
    args = parse_args([])
    assert args.data_dir == tmp_path
    assert (args.naive_port, args.triton_ports) == (None, None)


def test_triton_paths_are_compared_with_in_process_onnx_runtime_of_the_same_model():
    cells = [
        _cell("resnet18", "onnxruntime", 8, 20.0, 400.0),
        _cell("resnet18", "grpc", 8, 18.0, 500.0),
        _cell("resnet18", "grpc-shm", 8, 19.0, 420.0),
        _cell("resnet18_int8", "grpc", 8, 30.0, 300.0),  # no in-process row: left out
        _cell("resnet18_openvino_bf16", "http", 8, 40.0, 250.0),  # against resnet18's
    ]
    found = {r["path"]: r for r in inprocess_ratios(cells)}
    assert set(found) == {"grpc", "grpc-shm", "http"}
    assert found["http"]["throughput_ratio"] == pytest.approx(2.0)
    assert found["grpc"]["throughput_ratio"] == pytest.approx(0.9)
    assert found["grpc-shm"]["p95_ratio"] == pytest.approx(1.05)


def test_shm_paths_are_choices():
    args = parse_args(["--path", "onnxruntime", "grpc-shm", "http-shm", "--concurrency", "8"])
    assert args.path == ["onnxruntime", "grpc-shm", "http-shm"]
