"""benchmarks/bench_gpu.py off the GPU: the skip, the FLOP count and the report's arithmetic."""

import pytest
import torch

from benchmarks import bench_gpu
from client.registry import get_model


def test_bench_gpu_exits_77_with_skipped_message_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--out", str(out)]) == bench_gpu.EXIT_SKIPPED == 77
    assert capsys.readouterr().out.startswith("skipped: no CUDA device")
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "gflops"),
    # torchvision's model docs list 1.81 and 0.30 GFLOPS, counted as multiply-adds, at 224 px.
    [("resnet18", 3.627), ("mobilenet_v2", 0.599)],
)
def test_bench_gpu_counts_two_flops_per_multiply_add_on_the_real_model(model, gflops):
    assert bench_gpu.flops_per_image(get_model(model)) / 1e9 == pytest.approx(gflops, abs=0.002)


def test_bench_gpu_peak_lookup_needs_the_exact_card():
    assert bench_gpu.lookup_peak("NVIDIA H100 80GB HBM3", 132).card == "H100 SXM5"
    assert bench_gpu.lookup_peak("Orin", 16).card.startswith("Jetson AGX Orin 64GB")
    # Orin NX and Nano report the same name with fewer SMs and lower clocks.
    assert bench_gpu.lookup_peak("Orin", 8) is None
    assert bench_gpu.lookup_peak("NVIDIA GeForce RTX 4090", 128) is None


def _report(peak: bench_gpu.Peak | None) -> str:
    cell = bench_gpu.Cell("resnet18", "torch fp16", "fp16", batch_size=100, latency_ms=1.0)
    report = bench_gpu.Report("Some GPU", peak, {"resnet18": 10**9}, [cell], ["x: skipped"])
    return bench_gpu.render(report, "python -m benchmarks.bench_gpu")


def test_bench_gpu_report_sets_achieved_flops_against_the_peak():
    # 100 images in 1 ms at 1 GFLOP each: 100 TFLOP/s, 10 % of a 1000 TFLOP/s peak,
    # whose FLOP limit is 1,000,000 images/s.
    row = _report(bench_gpu.Peak("Card", {"fp16": 1000.0})).splitlines()
    assert "| resnet18 | torch fp16 | 100 | 1.000 | 100,000 | 100.00 | 1,000,000 | 10.0 |" in row
    assert "- x: skipped" in row


def test_bench_gpu_report_says_unknown_without_a_peak():
    text = _report(None)
    assert "| 100.00 | unknown | unknown |" in text
    assert "no datasheet peak on file for 'Some GPU'" in text


def test_bench_gpu_names_the_results_file_for_the_card():
    assert bench_gpu.card_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
