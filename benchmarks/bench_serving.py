"""Paper-style Flask + PyTorch vs Triton vs in-process ONNX Runtime, from the encoded PNG.

One run answers "what does serving buy us?" for each base model (mobilenet_v2,
resnet18). Every request carries one encoded PNG slice (kaggle_head_ct) and
every path decodes and preprocesses it with :mod:`client.preprocess`, so all
rows measure the same work from the same input:

- ``naive-flask``: the paper's web app (:mod:`benchmarks.naive_server`), a real
  Flask development-server process; the PNG goes up as a multipart upload, the
  server decodes, preprocesses and runs PyTorch eager per request.
- ``http`` / ``grpc``: the served path end to end: the calling thread decodes
  and preprocesses (client side, as the console does), then Triton
  (fp32 and int8 ONNX in ONNX Runtime, and the OpenVINO entries: fp32, bf16 and
  int8 on the same graphs; dynamic batching) scores the uint8 model input, sent
  in the request (the wire).
- ``http-shm`` / ``grpc-shm``: the same, with the input in system shared
  memory (``TritonClassifier(shm="on")``; benchmark and Triton share this host).
- ``onnxruntime``: the same preprocessing, then the same ``model.onnx`` in this
  process (the ceiling: no network, no server); ONNX Runtime entries only.

Each cell is a closed loop: ``concurrency`` threads send their next request when
the last one answers, for ``--duration-s`` seconds (``run_cell`` of
bench_triton.py). It writes ``serving.md``, ``serving.json``,
``serving_throughput.png`` and ``serving_p95.png`` to ``--out-dir``. On a
shared machine, serialize timed runs with the benchmark lock:

    flock /tmp/hemotriage-bench.lock python -m benchmarks.bench_serving --duration-s 10
    python -m benchmarks.bench_serving --model mobilenet_v2 --concurrency 1 8 --duration-s 3
    python -m benchmarks.bench_serving --path onnxruntime grpc --concurrency 8   # every variant
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from benchmarks.bench_triton import (
    CONCURRENCY,
    Cell,
    format_table,
    measure_cell,
    real_files,
    run_cell,
)
from benchmarks.naive_server import IMAGE_FIELD, NaiveServer
from benchmarks.report import RESULTS_DIR, figure, markdown_table, write_report
from benchmarks.stack import triton_on_free_ports
from build_engines.data import data_dir_from_env
from build_engines.runners import runner_for
from build_engines.serve import EmbeddedTriton, ServeSettings
from client.preprocess import preprocess_bytes
from client.registry import ModelSpec, get_model, list_models
from client.triton_client import TritonClassifier

logger = logging.getLogger(__name__)

NAIVE = "naive-flask"
SERVED = ("http", "grpc", "http-shm", "grpc-shm")
PATHS = (NAIVE, "onnxruntime", *SERVED)
PRECISIONS = ("fp32", "bf16", "int8")
RUNTIMES = ("onnxruntime", "openvino")
#: File name sent with every upload; decoding goes by content, the suffix names the format.
_UPLOAD_NAME = "slice.png"
_REQUEST_TIMEOUT_S = 60.0
#: Requests sent before each path's first cell, outside the clock (lazy init, caches).
_WARMUP_REQUESTS = 3

Predict = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class Ratio:
    """One served path against the naive baseline at the same concurrency."""

    model: str
    served: str
    concurrency: int
    throughput_ratio: float
    naive_p95_ms: float
    served_p95_ms: float


def png_payloads(data_dir: Path, count: int) -> np.ndarray:
    """The encoded bytes of ``count`` real slices, as an object array ``run_cell`` can index."""
    payloads = np.empty(count, dtype=object)
    payloads[:] = [f.read_bytes() for f in real_files(data_dir, count)]
    return payloads


def from_png(spec: ModelSpec, tensor_predict: Predict) -> Predict:
    """Client-side decode and preprocessing of each PNG, then ``tensor_predict`` on the batch."""

    def predict(pngs: np.ndarray) -> object:
        return tensor_predict(np.stack([preprocess_bytes(p, _UPLOAD_NAME, spec) for p in pngs]))

    return predict


@contextlib.contextmanager
def naive_predictor(model: str, port: int | None) -> Iterator[Predict]:
    """The baseline server process on ``port`` (None: a free one), and a predict uploading to it."""
    import requests

    local = threading.local()
    sessions: list[requests.Session] = []

    def post(url: str, pngs: np.ndarray) -> None:
        session = getattr(local, "session", None)
        if session is None:  # one keep-alive connection per load thread, like one browser
            session = local.session = requests.Session()
            sessions.append(session)
        for png in pngs:
            files = {IMAGE_FIELD: (_UPLOAD_NAME, png, "image/png")}
            response = session.post(url, files=files, timeout=_REQUEST_TIMEOUT_S)
            response.raise_for_status()

    with NaiveServer(model, port) as server:
        try:
            yield functools.partial(post, server.url + "/predict")
        finally:
            for session in sessions:
                session.close()


@contextlib.contextmanager
def served_predictor(
    spec: ModelSpec, path: str, urls: dict[str, str], ort_threads: int
) -> Iterator[Predict]:
    """In-process ONNX Runtime or a Triton client for ``spec``, end to end from the PNG."""
    if path == "onnxruntime":
        yield from_png(spec, runner_for(spec, ort_threads, spinning=True).run)
        return
    protocol, _, transport = path.partition("-")
    with TritonClassifier(
        spec,
        urls[protocol],
        protocol,
        timeout_s=_REQUEST_TIMEOUT_S,
        shm="on" if transport == "shm" else "off",
    ) as classifier:
        yield from_png(spec, classifier.predict)


def sweep(
    name: str, path: str, predict: Predict, pngs: np.ndarray, args: argparse.Namespace, bar: tqdm
) -> list[Cell]:
    """Warm ``predict`` up, then one cell per concurrency level (one PNG per request)."""
    for i in range(_WARMUP_REQUESTS):
        predict(pngs[i : i + 1])
    cells = []
    for concurrency in args.concurrency:
        bar.set_postfix_str(f"{name} {path} c={concurrency}")
        cells.append(measure_cell((name, path), predict, pngs, 1, concurrency, args.duration_s))
        logger.info("%s", cells[-1])
        bar.update(1)
    return cells


def variants(base: str, args: argparse.Namespace) -> list[ModelSpec]:
    """The registered builds of one base model's weights in ``--runtime``, ``--precision`` order."""
    specs = [s for s in list_models() if (s.weights_name or s.name) == base]
    return [
        s
        for r in args.runtime
        for p in args.precision
        for s in specs
        if (s.runtime, s.precision) == (r, p)
    ]


def paths_of(spec: ModelSpec, args: argparse.Namespace) -> list[str]:
    """The measured paths of ``spec``: in-process is ONNX Runtime's ceiling, for its entries."""
    return [p for p in args.path if p != NAIVE and (p != "onnxruntime" or spec.runtime == p)]


def measure_model(
    base: str, pngs: np.ndarray, args: argparse.Namespace, urls: dict[str, str], bar: tqdm
) -> list[Cell]:
    """Every requested path and concurrency for one base model."""
    cells = []
    if NAIVE in args.path:
        with naive_predictor(base, args.naive_port) as predict:
            cells += sweep(base, NAIVE, predict, pngs, args, bar)
    for spec in variants(base, args):
        for path in paths_of(spec, args):
            with served_predictor(spec, path, urls, args.ort_threads) as predict:
                cells += sweep(spec.name, path, predict, pngs, args, bar)
    return cells


def stage_costs(base: str, pngs: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of each stage alone, one thread: what each path's latency is made of."""
    from client.classify import LocalClassifier

    spec = get_model(base)
    tensors = np.stack([preprocess_bytes(p, _UPLOAD_NAME, spec) for p in pngs])
    stages = {
        "decode+preprocess": (from_png(spec, len), pngs),  # len: no model, just the tensors
        "torch eager forward": (LocalClassifier(spec).predict, tensors),
    }
    for variant in (v for v in variants(base, args) if v.runtime == "onnxruntime"):
        predict = runner_for(variant, args.ort_threads, spinning=True).run
        stages[f"onnxruntime {variant.precision} forward"] = (predict, tensors)
    costs = {}
    for stage, (predict, items) in stages.items():
        predict(items[:1])
        _, _, ms = run_cell(predict, items, 1, 1, args.stage_s)
        costs[stage] = float(np.median(ms))
    return costs


def ratios(cells: list[Cell], concurrency: int) -> list[Ratio]:
    """Each Triton path against the naive path of the same base model at ``concurrency``."""
    at = [c for c in cells if c.concurrency == concurrency]
    naive = {c.model: c for c in at if c.backend == NAIVE}
    found = []
    for cell in (c for c in at if c.backend in SERVED):
        spec = get_model(cell.model)
        base = naive.get(spec.weights_name or spec.name)
        if base is not None:
            found.append(
                Ratio(
                    base.model,
                    f"{cell.model} {cell.backend}",
                    concurrency,
                    cell.slices_per_s / base.slices_per_s,
                    base.p95_ms,
                    cell.p95_ms,
                )
            )
    return found


def inprocess_ratios(cells: list[Cell]) -> list[dict]:
    """Each Triton cell against in-process ONNX Runtime on the same graph and concurrency.

    An OpenVINO entry's graph is its ONNX Runtime twin's (``ModelSpec.graph_name``).
    """
    ort = {(c.model, c.concurrency): c for c in cells if c.backend == "onnxruntime"}
    found = []
    for cell in (c for c in cells if c.backend in SERVED):
        base = ort.get((get_model(cell.model).graph_name, cell.concurrency))
        if base is not None:
            found.append(
                {
                    "model": cell.model,
                    "path": cell.backend,
                    "concurrency": cell.concurrency,
                    "throughput_ratio": cell.slices_per_s / base.slices_per_s,
                    "p95_ratio": cell.p95_ms / base.p95_ms,
                    "p99_ratio": cell.p99_ms / base.p99_ms,
                }
            )
    return found


def payload_bytes(spec: ModelSpec, pngs: np.ndarray) -> int:
    """Bytes of the model input one slice puts on the wire (the tensor, without headers)."""
    return int(preprocess_bytes(pngs[0], _UPLOAD_NAME, spec).nbytes)


def machine() -> dict[str, object]:
    """CPU model, core count and load before the run (others' work skews every cell)."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": "none used",
        "load_1min_at_start": os.getloadavg()[0],
    }


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (``/proc/stat``, all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU-seconds of this process and its reaped children (Triton and its stubs, Flask)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def others_cpu_share(start: tuple[float, float, float], cores: int) -> float:
    """Share of all cores that other processes used since ``start`` (wall, busy, own)."""
    wall_s, busy_s, own_s = (now - then for now, then in zip(_clocks(), start, strict=True))
    return max(0.0, busy_s - own_s) / (wall_s * cores)


def _clocks() -> tuple[float, float, float]:
    return time.monotonic(), busy_cpu_s(), own_cpu_s()


def verdict(found: list[Ratio], target: float) -> str:
    """One sentence per base model on its best served path against ``target``x naive."""
    lines = []
    for model in dict.fromkeys(r.model for r in found):
        best = max((r for r in found if r.model == model), key=lambda r: r.throughput_ratio)
        ratio = best.throughput_ratio
        throughput = "met" if ratio >= target else f"missed by {target / ratio:.1f}x"
        p95 = "lower" if best.served_p95_ms < best.naive_p95_ms else "not lower"
        lines.append(
            f"- {model}: best served path {best.served} at concurrency {best.concurrency}: "
            f"{ratio:.2f}x the naive throughput (target {target:g}x: {throughput}); p95 "
            f"{best.served_p95_ms:.1f} ms vs naive {best.naive_p95_ms:.1f} ms ({p95})."
        )
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """``serving.md``: header facts, the table, the ratios, the stage costs, the plots."""
    m = report["machine"]
    cells = [Cell(**c) for c in report["cells"]]
    found = [Ratio(**r) for r in report["ratios"]]
    return "\n".join(
        [
            "# Serving: paper-style Flask + PyTorch vs Triton vs in-process ONNX Runtime",
            "",
            f"- Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; 1-minute load "
            f"average at the start: {m['load_1min_at_start']:.2f}; other processes used "
            f"{m['others_cpu_share']:.0%} of all cores during the run",
            f"- Date (UTC): {report['date']}",
            f"- Command: `{report['command']}`",
            f"- {report['duration_s']:g} s per cell, closed loop, one encoded PNG per request "
            f"({report['images']} kaggle_head_ct slices cycled).",
            "- Every path starts from the encoded PNG and runs the same client/preprocess path: "
            "`naive-flask` on the server (Flask threaded development server, PyTorch eager, "
            "batch of one per request), `http`/`grpc` on the client before Triton (dynamic "
            "batching, ONNX Runtime), `onnxruntime` in the benchmark process (the ceiling).",
            "",
            _cells_table(cells),
            "",
            "## Triton vs in-process ONNX Runtime (same model, same concurrency)",
            "",
            _inprocess_table(report.get("inprocess_ratios", [])),
            "",
            "Model input per slice (tensor bytes in each request over the wire, or written to "
            "shared memory): "
            + ", ".join(f"{m} {b:,} B" for m, b in report.get("payload_bytes", {}).items()),
            "",
            f"## Served vs naive at concurrency {report['ratio_concurrency']}",
            "",
            _ratios_table(found),
            "",
            verdict(found, report["target_ratio"]),
            "",
            "## Where the time goes (each stage alone, one thread, median ms)",
            "",
            _stages_table(report["stages"]),
            "",
            "![images/s vs concurrency](serving_throughput.png)",
            "",
            "![p95 latency vs concurrency](serving_p95.png)",
            "",
        ]
    )


def _cells_table(cells: list[Cell]) -> str:
    headers = [
        *("model", "path", "concurrency", "requests"),
        *("images/s", "p50 ms", "p95 ms", "p99 ms"),
    ]
    rows = [
        [c.model, c.backend, c.concurrency, c.requests]
        + [f"{v:.1f}" for v in (c.slices_per_s, c.p50_ms, c.p95_ms, c.p99_ms)]
        for c in cells
    ]
    return markdown_table(headers, rows)


def _inprocess_table(found: list[dict]) -> str:
    headers = [
        "model",
        "path",
        "concurrency",
        "images/s Triton/in-process",
        "p95 ratio",
        "p99 ratio",
    ]
    rows = [
        [
            *(r["model"], r["path"], r["concurrency"]),
            *(f"{r[k]:.2f}x" for k in ("throughput_ratio", "p95_ratio", "p99_ratio")),
        ]
        for r in found
    ]
    return markdown_table(headers, rows)


def _ratios_table(found: list[Ratio]) -> str:
    headers = ["model", "served path", "images/s served/naive", "naive p95 ms", "served p95 ms"]
    rows = [
        [r.model, r.served, f"{r.throughput_ratio:.2f}x"]
        + [f"{v:.1f}" for v in (r.naive_p95_ms, r.served_p95_ms)]
        for r in found
    ]
    return markdown_table(headers, rows)


def compute_bound(costs: dict[str, float]) -> float:
    """(preprocess + torch) / (preprocess + fastest ONNX forward), one image each.

    The throughput gain that cheaper per-image compute alone allows when both
    paths saturate the same cores; batching, HTTP and Flask overheads come on top.
    """
    preprocess_ms = costs["decode+preprocess"]
    onnx_ms = min(v for k, v in costs.items() if k.startswith("onnxruntime"))
    return (preprocess_ms + costs["torch eager forward"]) / (preprocess_ms + onnx_ms)


def _stages_table(stages: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(stages.values()), {}))
    rows = [
        [model, *(f"{v:.1f}" for v in costs.values()), f"{compute_bound(costs):.2f}x"]
        for model, costs in stages.items()
    ]
    return markdown_table(["model", *names, "compute bound served/naive"], rows)


def plot(cells: list[Cell], metric: str, label: str, path: Path) -> None:
    """One panel per base model, one line per model build and path, against concurrency."""
    bases = list(dict.fromkeys(get_model(c.model).weights_name or c.model for c in cells))
    with figure(path, len(bases), (6 * len(bases), 4.5), dpi=110) as axes:
        for axis, base in zip(axes, bases, strict=True):
            mine = [c for c in cells if (get_model(c.model).weights_name or c.model) == base]
            for line in dict.fromkeys((c.model, c.backend) for c in mine):
                points = [c for c in mine if (c.model, c.backend) == line]
                axis.plot(
                    [c.concurrency for c in points],
                    [getattr(c, metric) for c in points],
                    marker="o",
                    label=" ".join(line),
                )
            axis.set(title=base, xlabel="concurrency", ylabel=label, yscale="log")
            axis.set_xticks(sorted({c.concurrency for c in mine}))
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)


def write_results(report: dict, out_dir: Path) -> None:
    """``serving.json``, ``serving.md`` and the two plots in ``out_dir``."""
    write_report(out_dir, "serving", render_markdown(report), report)
    cells = [Cell(**c) for c in report["cells"]]
    plot(cells, "slices_per_s", "images/s", out_dir / "serving_throughput.png")
    plot(cells, "p95_ms", "p95 latency (ms)", out_dir / "serving_p95.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bases = [s.name for s in list_models(precision="fp32", runtime="onnxruntime")]
    parser.add_argument("--model", nargs="+", choices=bases, default=bases)
    parser.add_argument("--path", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--stage-s", type=float, default=3.0, help="seconds per stage timing")
    parser.add_argument("--images", type=int, default=16, help="distinct PNGs cycled")
    parser.add_argument("--ratio-concurrency", type=int, default=8)
    parser.add_argument("--target-ratio", type=float, default=10.0)
    parser.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime threads, 0=all")
    parser.add_argument("--naive-port", type=int, help="default: a free port")
    parser.add_argument(
        "--triton-ports", nargs=3, type=int, help="HTTP gRPC metrics; default: free ports"
    )
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.ratio_concurrency not in args.concurrency:
        parser.error("--ratio-concurrency must be one of --concurrency")
    return args


def start_triton(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, str]:
    """The embedded CPU Triton with every measured build, on ``--triton-ports`` or free ports."""
    models = tuple(s.name for base in args.model for s in variants(base, args))
    if args.triton_ports:
        http_port, grpc_port, metrics_port = args.triton_ports
        triton = EmbeddedTriton(
            ServeSettings.from_env(
                models=models, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
            )
        )
    else:
        triton = triton_on_free_ports(models)
    server = stack.enter_context(triton)
    return {"http": server.http_url, "grpc": server.grpc_url}


def main(argv: list[str] | None = None) -> int:
    """Run every cell, print the table, write the results; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, start = machine(), _clocks()
    pngs = png_payloads(args.data_dir, args.images)
    per_model = {
        base: len(args.concurrency)
        * ((NAIVE in args.path) + sum(len(paths_of(s, args)) for s in variants(base, args)))
        for base in args.model
    }
    cells, stages = [], {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(logging_redirect_tqdm())
        urls = start_triton(stack, args) if set(args.path) & set(SERVED) else {}
        bar = stack.enter_context(tqdm(total=sum(per_model.values()), unit="cell"))
        for base in args.model:
            cells += measure_model(base, pngs, args, urls, bar)
            bar.set_postfix_str(f"{base} stage costs")
            stages[base] = stage_costs(base, pngs, args)
    host["others_cpu_share"] = others_cpu_share(start, host["cores"])
    found = ratios(cells, args.ratio_concurrency)
    report = {
        "machine": host,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(sys.orig_argv),
        "duration_s": args.duration_s,
        "images": args.images,
        "ratio_concurrency": args.ratio_concurrency,
        "target_ratio": args.target_ratio,
        "cells": [asdict(c) for c in cells],
        "ratios": [asdict(r) for r in found],
        "inprocess_ratios": inprocess_ratios(cells),
        "payload_bytes": {m: payload_bytes(get_model(m), pngs) for m in args.model},
        "stages": stages,
    }
    write_results(report, args.out_dir)
    sys.stdout.write(format_table(cells, 1, args.duration_s) + "\n")
    sys.stdout.write(verdict(found, args.target_ratio) + "\n")
    sys.stdout.write(f"wrote {args.out_dir}/serving.md, serving.json and the plots\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
