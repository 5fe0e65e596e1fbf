"""GPU ceiling of both models: PyTorch, ONNX Runtime and TensorRT against the FLOP limit.

For each fp32 registry model (mobilenet_v2, resnet18) at batch sizes 1, 8, 32,
128 and 256 on CUDA device 0, one row per runtime:

- ``torch fp32``: eager, IEEE fp32 (TF32 off, so the card's fp32 peak applies);
- ``torch fp16``: eager, half precision, channels-last;
- ``torch fp16 graph``: the fp16 model replayed as one CUDA graph
  (``torch.cuda.graphs``), so no kernel launches cost host time;
- ``onnxruntime fp32``: the served ``model.onnx`` on ONNX Runtime's CUDA
  provider (TF32 off), input and output bound in GPU memory; only where the
  installed onnxruntime has that provider (``onnxruntime-gpu``);
- ``tensorrt fp16`` / ``tensorrt int8``: engines built on the spot by
  :func:`build_engines.tensorrt.build_plan`, with the served engines' profile
  optimum (batch 8) and the largest batch size as its maximum; only where
  TensorRT is installed, and int8 only where
  ``python -m build_engines quantize --target tensorrt`` wrote the QDQ model.

Each cell runs batches already in GPU memory (no host copies, no
preprocessing), waits for each, and reports the median batch latency and
images/s over ``--min-time-s``. Beside it stands the FLOP limit: the model's
FLOPs per image, counted on the real model with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, two
FLOPs per multiply-add), against the card's dense datasheet peak for the row's
precision (:data:`PEAKS`). A card without a peak on file prints ``unknown``
rather than a guess.

    python -m benchmarks.bench_gpu                      # both models; sized for < 5 min on an H100
    python -m benchmarks.bench_gpu --model resnet18 --batch-sizes 1 32 --min-time-s 0.2

Writes ``benchmarks/results/gpu_<card>.md`` (or ``--out``) and prints it.
Exit status: 0 once written; 77, the automake/meson code for a skipped test,
after printing ``skipped: no CUDA device`` when torch sees no GPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import RESULTS_DIR, markdown_table
from client.constants import INPUT_NAME, OUTPUT_NAME
from client.errors import HemoTriageError
from client.registry import ModelSpec, get_model, list_models
from client.torch_models import load_model

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 8, 32, 128, 256)
#: Exit status without a GPU: automake's and meson's "test skipped".
EXIT_SKIPPED = 77
#: Untimed calls first (cuDNN autotuning, allocator growth, lazy initialization).
WARMUP_CALLS = 3
#: Timed calls per cell, however long they take.
MIN_CALLS = 5

Step = Callable[[], object]


class RuntimeUnavailableError(HemoTriageError):
    """This machine lacks what a runtime needs (an execution provider, a library)."""


@dataclass(frozen=True)
class Peak:
    """Dense peak rates of one card at boost clock, in TFLOP/s (TOPS for int8).

    Attributes:
        card: Product name.
        tflops: Peak per precision: ``fp32`` on the CUDA cores; ``tf32``, ``fp16``
            and ``int8`` on the tensor cores without 2:4 sparsity. A precision
            the card lacks (T4 has no TF32) is absent.
        multiprocessors: SM count that must match too, where the device name alone
            does not identify the card (every Jetson Orin module reports "Orin").
    """

    card: str
    tflops: dict[str, float]
    multiprocessors: int | None = None


_A100 = Peak("A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "int8": 624.0})
_H100_SXM = Peak("H100 SXM5", {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "int8": 1979.0})
#: Keyed by ``torch.cuda.get_device_name()``. Sources: NVIDIA's datasheets (H100
#: Tensor Core GPU, H200 Tensor Core GPU, A100 Tensor Core GPU, L4, A10, T4) and the
#: Jetson AGX Orin Series Technical Brief v1.2. Datasheets quote tensor-core rates
#: "with sparsity" (except A100's and T4's dense figures); those are halved here. H200
#: has H100 SXM5's compute. Orin: 5.3 FP32 TFLOPS and 170 sparse INT8 TOPS for the
#: 64 GB module's GPU at MAXN; its FP16 tensor rate is half its INT8 rate (Ampere).
PEAKS: dict[str, Peak] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": Peak(
        "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "fp16": 756.5, "int8": 1513.0}
    ),
    "NVIDIA H200": Peak("H200 SXM", _H100_SXM.tflops),
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L4": Peak("L4", {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "int8": 242.5}),
    "NVIDIA A10": Peak("A10", {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "int8": 250.0}),
    "Tesla T4": Peak("T4", {"fp32": 8.1, "fp16": 65.0, "int8": 130.0}),
    "Orin": Peak(
        "Jetson AGX Orin 64GB (MAXN)",
        {"fp32": 5.3, "fp16": 42.5, "int8": 85.0},
        multiprocessors=16,
    ),
}


@dataclass(frozen=True)
class Runtime:
    """One way to run a model: its row name, the precision of its peak, a step factory.

    ``prepare(batch_size)`` returns a call that enqueues one batch on the GPU.
    """

    name: str
    precision: str
    prepare: Callable[[int], Step]


@dataclass(frozen=True)
class Cell:
    """One model x runtime x batch size measurement."""

    model: str
    runtime: str
    precision: str
    batch_size: int
    latency_ms: float

    @property
    def images_per_s(self) -> float:
        """Images per second at the median batch latency."""
        return self.batch_size / self.latency_ms * 1e3


@dataclass
class Report:
    """What a run measured, and what it could not measure and why."""

    device: str
    peak: Peak | None
    flops: dict[str, int]
    cells: list[Cell] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def lookup_peak(device_name: str, multiprocessors: int) -> Peak | None:
    """The datasheet peak of this card, or None for a card not on file."""
    peak = PEAKS.get(device_name)
    if peak is None or peak.multiprocessors not in (None, multiprocessors):
        return None
    return peak


def flops_per_image(spec: ModelSpec) -> int:
    """FLOPs of one image's forward pass through ``spec``'s trained torch model.

    Counted by ``FlopCounterMode`` on the CPU (two per multiply-add; the batch
    normalizations, activations and softmax it does not count are a few percent).
    """
    model = load_model(spec)
    image = torch.zeros(1, 3, spec.input_size, spec.input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops()


def median_latency_s(step: Step, min_time_s: float) -> float:
    """Median seconds from launching ``step`` to its completion, after a warm-up."""
    for _ in range(WARMUP_CALLS):
        step()
    torch.cuda.synchronize()
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < MIN_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_runtimes(spec: ModelSpec, max_batch_size: int) -> list[Runtime]:
    """Eager fp32, eager fp16 (channels-last), and the fp16 model as a CUDA graph."""
    model = load_model(spec, device="cuda")
    model_fp16 = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
    shape = (max_batch_size, 3, spec.input_size, spec.input_size)
    images = torch.randn(shape, device="cuda")
    images_fp16 = images.half().contiguous(memory_format=torch.channels_last)

    def eager(module: torch.nn.Module, batch: torch.Tensor) -> Callable[[int], Step]:
        return lambda n: functools.partial(module, batch[:n])

    def graph(n: int) -> Step:
        # Capture recipe of https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs:
        # warm up on a side stream, then record one forward pass on static memory (the
        # input is a view of images_fp16, which lives as long as this runtime).
        static = images_fp16[:n]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                model_fp16(static)
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            model_fp16(static)
        return cuda_graph.replay

    return [
        Runtime("torch fp32", "fp32", eager(model, images)),
        Runtime("torch fp16", "fp16", eager(model_fp16, images_fp16)),
        Runtime("torch fp16 graph", "fp16", graph),
    ]


def _model_input(shape: tuple[int, ...]) -> torch.Tensor:
    """Random uint8 model input on the GPU: the ONNX and TensorRT graphs normalize it."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")


def onnxruntime_runtime(spec: ModelSpec, onnx_path: Path, max_batch_size: int) -> Runtime:
    """``onnx_path`` on ONNX Runtime's CUDA provider with GPU-resident I/O bindings.

    Raises:
        RuntimeUnavailableError: this onnxruntime build cannot run on the GPU.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeUnavailableError(
            "this onnxruntime has no CUDAExecutionProvider (that is onnxruntime-gpu)"
        )
    # use_tf32=0: true fp32, comparable with the fp32 peak like torch fp32.
    provider = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})
    session = ort.InferenceSession(str(onnx_path), providers=[provider])
    # A provider that fails to load (CUDA or cuDNN missing) falls back to the CPU with a warning.
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeUnavailableError(f"CUDA provider did not load: {session.get_providers()}")
    shape = (max_batch_size, 3, spec.input_size, spec.input_size)
    images = _model_input(shape)
    probabilities = torch.empty((max_batch_size, len(spec.labels)), device="cuda")

    def prepare(n: int) -> Step:
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", 0, np.uint8, (n, *shape[1:]), images[:n].data_ptr())
        binding.bind_output(
            OUTPUT_NAME, "cuda", 0, np.float32, (n, len(spec.labels)), probabilities.data_ptr()
        )
        return lambda: session.run_with_iobinding(binding)

    return Runtime("onnxruntime fp32", "fp32", prepare)


def tensorrt_runtime(
    spec: ModelSpec, onnx_path: Path, max_batch_size: int, work_dir: Path
) -> Runtime:
    """An engine for ``spec`` built now on this GPU, batch profile 1 to ``max_batch_size``.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed.
        ModelNotReadyError: the ONNX file is missing, or not the TensorRT INT8 variant.
    """
    from build_engines.tensorrt import build_plan

    out_dir = work_dir / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(spec, max_batch_size, onnx_path=onnx_path, out_dir=out_dir)
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    shape = (max_batch_size, 3, spec.input_size, spec.input_size)
    images = _model_input(shape)
    probabilities = torch.empty((max_batch_size, len(spec.labels)), device="cuda")

    def prepare(n: int) -> Step:
        # TensorRT >= 8.5 named-tensor API; the context keeps its engine alive (keep_alive).
        if not context.set_input_shape(INPUT_NAME, (n, *shape[1:])):
            raise ValueError(f"batch {n} is outside the engine's profile (max {max_batch_size})")
        context.set_tensor_address(INPUT_NAME, images.data_ptr())
        context.set_tensor_address(OUTPUT_NAME, probabilities.data_ptr())
        stream = torch.cuda.current_stream().cuda_stream
        return functools.partial(context.execute_async_v3, stream)

    precision = "int8" if spec.precision == "int8" else "fp16"
    return Runtime(f"tensorrt {precision}", precision, prepare)


def measure_model(
    spec: ModelSpec, batch_sizes: list[int], min_time_s: float, work_dir: Path, report: Report
) -> None:
    """Every available runtime of ``spec`` at every batch size, into ``report``."""
    from build_engines.export_onnx import export_onnx

    largest = max(batch_sizes)
    onnx_path = spec.onnx_path
    if not onnx_path.exists():
        onnx_path = export_onnx(spec, work_dir / f"{spec.name}.onnx")
    int8 = next(
        s
        for s in list_models(precision="int8", runtime="onnxruntime")
        if s.weights_name == spec.name
    )
    runtimes = torch_runtimes(spec, largest)
    builders = (
        ("onnxruntime fp32", lambda: onnxruntime_runtime(spec, onnx_path, largest)),
        ("tensorrt fp16", lambda: tensorrt_runtime(spec, onnx_path, largest, work_dir)),
        ("tensorrt int8", lambda: tensorrt_runtime(int8, int8.onnx_path, largest, work_dir)),
    )
    for name, build in builders:
        try:
            runtimes.append(build())
        except HemoTriageError as e:  # no provider, no TensorRT, no INT8 file for TensorRT
            report.skipped.append(f"{spec.name} {name}: {e}")
            logger.warning("%s %s skipped: %s", spec.name, name, e)
    for runtime in runtimes:
        for n in batch_sizes:
            latency_ms = median_latency_s(runtime.prepare(n), min_time_s) * 1e3
            cell = Cell(spec.name, runtime.name, runtime.precision, n, latency_ms)
            report.cells.append(cell)
            logger.info(
                "%s %s batch %d: %.3f ms, %.0f img/s",
                spec.name,
                runtime.name,
                n,
                latency_ms,
                cell.images_per_s,
            )


def render(report: Report, command: str) -> str:
    """The Markdown report: setup, peaks, FLOPs, the table and what was skipped."""
    peak = report.peak
    if peak is None:
        peak_line = f"no datasheet peak on file for {report.device!r}: limits print unknown"
    else:
        rates = ", ".join(f"{p} {v:g}" for p, v in peak.tflops.items())
        peak_line = f"{peak.card}, dense datasheet peak (TFLOP/s; TOPS for int8): {rates}"
    flops = ", ".join(f"{m} {f / 1e9:.3f} GFLOP" for m, f in report.flops.items())
    rows = []
    for c in report.cells:
        achieved = c.images_per_s * report.flops[c.model] / 1e12
        peak_tflops = peak.tflops.get(c.precision) if peak else None
        if peak_tflops is None:
            limit, share = "unknown", "unknown"
        else:
            limit = f"{peak_tflops * 1e12 / report.flops[c.model]:,.0f}"
            share = f"{100 * achieved / peak_tflops:.1f}"
        rows.append(
            [
                c.model,
                c.runtime,
                c.batch_size,
                f"{c.latency_ms:.3f}",
                f"{c.images_per_s:,.0f}",
                f"{achieved:.2f}",
                limit,
                share,
            ]
        )
    headers = [
        "model",
        "runtime",
        "batch",
        "ms/batch",
        "img/s",
        "TFLOP/s",
        "FLOP limit img/s",
        "% of peak",
    ]
    lines = [
        f"# GPU ceiling: {report.device}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{command}`; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}). Median latency of back-to-back batches in GPU memory.",
        "",
        f"- Peak: {peak_line}.",
        f"- FLOPs per image (FlopCounterMode, 2 per multiply-add): {flops}.",
        "- FLOP limit = peak / FLOPs per image; % of peak = achieved TFLOP/s / peak.",
        "",
        markdown_table(headers, rows),
    ]
    if report.skipped:
        lines += ["", "Not measured:", "", *(f"- {s}" for s in report.skipped)]
    return "\n".join(lines) + "\n"


def card_slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``, for the file name."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    """Measure every cell, write and print the report; 77 when there is no GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        choices=[s.name for s in list_models(precision="fp32", runtime="onnxruntime")],
        help="repeatable; default every fp32 model",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--min-time-s", type=float, default=0.5, help="timed seconds per cell")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/gpu_<card>.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        sys.stdout.write("skipped: no CUDA device (torch.cuda.is_available() is False)\n")
        return EXIT_SKIPPED
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    properties = torch.cuda.get_device_properties(0)
    specs = [get_model(name) for name in args.model or []] or list_models(
        precision="fp32", runtime="onnxruntime"
    )
    report = Report(
        device=properties.name,
        peak=lookup_peak(properties.name, properties.multi_processor_count),
        flops={spec.name: flops_per_image(spec) for spec in specs},
    )
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work_dir, torch.no_grad():
        for spec in specs:
            measure_model(spec, args.batch_sizes, args.min_time_s, Path(work_dir), report)
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.bench_gpu", *arguments])
    text = render(report, command)
    out = args.out or RESULTS_DIR / f"gpu_{card_slug(properties.name)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.stdout.write(text)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
