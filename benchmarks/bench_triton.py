"""In-process ONNX Runtime vs Triton HTTP vs Triton gRPC: throughput and latency percentiles.

One run, one table: for every model (fp32 and int8) and every concurrency
level, ``concurrency`` threads send requests of ``--batch-size`` real,
preprocessed slices back to back for ``--duration-s`` seconds. ONNX Runtime
runs the same ``model.onnx`` in this process (one shared session, no batching);
Triton runs it behind its dynamic batcher. Without ``--http-url``/``--grpc-url``
the script starts the embedded CPU Triton itself on free ports.

    python benchmarks/bench_triton.py                           # 5 s per cell
    python benchmarks/bench_triton.py --duration-s 30 --csv benchmarks/results/triton.csv
    python benchmarks/bench_triton.py --model resnet18 --concurrency 1 8 --backend grpc
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import numpy as np

from benchmarks.report import Column, percentiles, text_header, text_row
from benchmarks.stack import triton_on_free_ports
from build_engines.data import data_dir_from_env
from build_engines.runners import runner_for
from client.preprocess import preprocess_file
from client.registry import ModelSpec, get_model, list_models
from client.triton_client import TritonClassifier

BACKENDS = ("onnxruntime", "http", "grpc")
CONCURRENCY = (1, 4, 8, 16)
#: The printed table, one column per :class:`Cell` field.
_COLUMNS = (
    Column("model", 18, left=True),
    Column("backend", 12, left=True),
    Column("conc", 4),
    Column("req", 6),
    Column("slices/s", 9, ".1f"),
    Column("p50 ms", 8, ".1f"),
    Column("p95 ms", 8, ".1f"),
    Column("p99 ms", 8, ".1f"),
)


@dataclass(frozen=True)
class Cell:
    """One model x backend x concurrency measurement."""

    model: str
    backend: str
    concurrency: int
    requests: int
    slices_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def real_files(data_dir: Path, count: int = 16) -> list[Path]:
    """``count`` kaggle_head_ct PNG slices, half hemorrhage (ids 0-99) and half normal."""
    ids = [*range(count // 2), *range(100, 100 + count - count // 2)]
    return [data_dir / "kaggle_head_ct" / "head_ct" / f"{i:03d}.png" for i in ids]


def real_batch(spec: ModelSpec, data_dir: Path, count: int = 16) -> np.ndarray:
    """:func:`real_files` through the preprocessing path."""
    return np.stack([preprocess_file(f, spec) for f in real_files(data_dir, count)])


def run_cell(
    predict: Callable[[np.ndarray], object],
    slices: np.ndarray,
    batch_size: int,
    concurrency: int,
    duration_s: float,
) -> tuple[int, float, np.ndarray]:
    """Drive ``predict`` from ``concurrency`` threads; return requests, seconds, latencies (ms).

    Raises:
        Exception: the first error a worker thread met (a failed request must not
            pass for a slow one).
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[Exception] = []
    start_line = threading.Barrier(concurrency + 1)
    stop_at: list[float] = []

    def worker(index: int) -> None:
        offset = index * batch_size
        start_line.wait()
        while time.perf_counter() < stop_at[0] and not errors:
            rows = [(offset + k) % len(slices) for k in range(batch_size)]
            begin = time.perf_counter()
            try:
                predict(slices[rows])
            except Exception as e:  # re-raised in the caller's thread below
                errors.append(e)
                return
            latencies[index].append((time.perf_counter() - begin) * 1000)
            offset += batch_size * concurrency

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    stop_at.append(begin + duration_s)
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    if errors:
        raise errors[0]
    flat = np.array([x for per_thread in latencies for x in per_thread])
    return len(flat), elapsed, flat


def measure_cell(
    row: tuple[str, str],
    predict: Callable[[np.ndarray], object],
    slices: np.ndarray,
    batch_size: int,
    concurrency: int,
    duration_s: float,
) -> Cell:
    """One :func:`run_cell` as a table row: ``row`` (model, backend), throughput, percentiles."""
    count, elapsed, ms = run_cell(predict, slices, batch_size, concurrency, duration_s)
    stats = percentiles(ms)
    return Cell(
        *row,
        concurrency,
        count,
        count * batch_size / elapsed,
        stats["p50"],
        stats["p95"],
        stats["p99"],
    )


def benchmark(args: argparse.Namespace, urls: dict[str, str]) -> list[Cell]:
    """Every requested cell, in table order."""
    cells = []
    for name in args.model:
        spec = get_model(name)
        slices = real_batch(spec, args.data_dir)
        for backend in args.backend:
            if backend == "onnxruntime" and spec.runtime != "onnxruntime":
                continue  # in-process is ONNX Runtime's path; OpenVINO entries are measured served
            if backend == "onnxruntime":
                predict, closer = runner_for(spec, args.ort_threads, spinning=True).run, None
            else:
                closer = TritonClassifier(spec, urls[backend], backend, timeout_s=60.0)
                predict = closer.predict
            try:
                predict(slices[: args.batch_size])  # warm-up outside the clock
                for concurrency in args.concurrency:
                    cell = measure_cell(
                        (name, backend),
                        predict,
                        slices,
                        args.batch_size,
                        concurrency,
                        args.duration_s,
                    )
                    logging.info("%s", cell)
                    cells.append(cell)
            finally:
                if closer is not None:
                    closer.close()
    return cells


def format_table(cells: list[Cell], batch_size: int, duration_s: float) -> str:
    """The one result table."""
    lines = [
        f"batch {batch_size} slice(s) per request, {duration_s:g} s per cell",
        text_header(_COLUMNS),
    ]
    lines += [text_row(_COLUMNS, astuple(c)) for c in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every cell, print the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = [s.name for s in list_models()]
    parser.add_argument("--model", nargs="+", choices=models, default=models)
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--batch-size", type=int, default=1, help="slices per request")
    parser.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime threads, 0=all")
    parser.add_argument("--http-url", help="running Triton HTTP endpoint; else start one")
    parser.add_argument("--grpc-url", help="running Triton gRPC endpoint; else start one")
    parser.add_argument("--data-dir", type=Path, default=data_dir_from_env())
    parser.add_argument("--csv", type=Path, help="also write the cells as CSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with contextlib.ExitStack() as stack:
        urls = {"http": args.http_url, "grpc": args.grpc_url}
        needs_server = any(b != "onnxruntime" and not urls[b] for b in args.backend)
        if needs_server:
            server = stack.enter_context(triton_on_free_ports(tuple(args.model)))
            urls["http"] = urls["http"] or server.http_url
            urls["grpc"] = urls["grpc"] or server.grpc_url
        cells = benchmark(args, urls)
    sys.stdout.write(format_table(cells, args.batch_size, args.duration_s) + "\n")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(cells[0])))
            writer.writeheader()
            writer.writerows(asdict(c) for c in cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
