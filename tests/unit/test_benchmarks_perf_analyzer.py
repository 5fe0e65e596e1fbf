"""perf_analyzer's CSV report, as a real run wrote it, read into rows."""

from pathlib import Path

import pytest

from benchmarks.bench_perf_analyzer import (
    PERF_ANALYZER_ENV,
    PerfAnalyzerError,
    PerfRow,
    find_perf_analyzer,
    parse_csv,
    perf_command,
    render_markdown,
)

#: Captured from perf_analyzer 2.60.0 on the embedded Triton: mobilenet_v2_int8,
#: gRPC, --shared-memory=system, concurrency 2, batch 1.
SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "perf_analyzer_grpc_shm.csv"


def test_real_csv_parses_into_milliseconds():
    [row] = parse_csv(SAMPLE.read_text(), "mobilenet_v2_int8", "grpc", "system")
    assert row == PerfRow(
        model="mobilenet_v2_int8",
        protocol="grpc",
        shared_memory="system",
        concurrency=2,
        infer_per_s=pytest.approx(52.6871),
        p50_ms=pytest.approx(11.463),
        p90_ms=pytest.approx(22.993),
        p95_ms=pytest.approx(27.596),
        p99_ms=pytest.approx(515.581),
        server_queue_ms=pytest.approx(22.165),
        server_compute_ms=pytest.approx(7.889),
    )


def test_output_without_measurements_is_a_typed_error():
    with pytest.raises(PerfAnalyzerError, match="no measurement"):
        parse_csv(SAMPLE.read_text().splitlines()[0], "m", "grpc", "none")
    with pytest.raises(PerfAnalyzerError, match="unexpected"):
        parse_csv("Concurrency,Inferences/Second\n2,1.0\n", "m", "grpc", "none")


def test_command_sets_model_protocol_transport_and_one_concurrency(tmp_path):
    argv = perf_command(
        ["perf_analyzer"],
        "resnet18",
        "localhost:8001",
        "grpc",
        "system",
        8,
        tmp_path / "r.csv",
        1500,
        4,
    )
    assert argv[:7] == ["perf_analyzer", "-m", "resnet18", "-u", "localhost:8001", "-i", "grpc"]
    assert "--concurrency-range=8:8" in argv and "--shared-memory=system" in argv
    assert argv[-2:] == ["-f", str(tmp_path / "r.csv")]


def test_command_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(PERF_ANALYZER_ENV, "/opt/glibc/ld.so --library-path /opt/lib perf_analyzer")
    assert find_perf_analyzer() == [
        *("/opt/glibc/ld.so", "--library-path", "/opt/lib", "perf_analyzer")
    ]


def test_report_lists_rows_and_failures():
    [row] = parse_csv(SAMPLE.read_text(), "mobilenet_v2_int8", "grpc", "system")
    text = render_markdown(
        {
            "date": "2026-11-30 11:30:00",
            "version": "2.60.0",
            "command": "python -m benchmarks.bench_perf_analyzer",
            "cores": 2,
            "load_start": 2.0,
            "load_end": 3.0,
            "interval_ms": 1500,
            "max_trials": 4,
            "rows": [row.__dict__],
            "failures": ["resnet18 http none c=16: perf_analyzer exited 99"],
        }
    )
    assert "| mobilenet_v2_int8 | grpc | shm | 2 | 52.7 |" in text
    assert "resnet18 http none c=16" in text
