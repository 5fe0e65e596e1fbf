"""Where Triton's latency tail comes from on a small CPU: ONNX Runtime threads next to other work.

The embedded Triton runs each model in ONNX Runtime inside its Python backend,
and on the edge box it shares the cores with the console (decoding and
preprocessing the next slices) and the clients. ONNX Runtime's intra-op
threads split every operator between them, then spin while they wait for
each other: when another process holds one of the cores, the thread that was
descheduled holds up the operator, and a batch waits a scheduler time slice or
more. This measures one model's batch latency in-process, with 1 and 2
intra-op threads, spinning on and off, alone and beside a process that keeps
one core busy (as the console's decoding does), all in one run.

    python -m benchmarks.bench_ort_threads                    # mobilenet_v2 and resnet18
    python -m benchmarks.bench_ort_threads --batch-size 8 --calls 60

Writes ``ort_threads.{md,json}`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import RESULTS_DIR, markdown_table, percentiles, write_report
from client.registry import get_model


def _burn(stop) -> None:
    """Keep one core busy until ``stop`` is set (the console decoding the next batch)."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def latencies_ms(model: str, threads: int, spinning: bool, batch_size: int, calls: int) -> list:
    """Milliseconds of ``calls`` runs of one batch, after one untimed run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(
        str(get_model(model).onnx_path), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, 224, 224), dtype=np.uint8)
    session.run(None, {name: batch})
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, {name: batch})
        out.append((time.perf_counter() - start) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every combination, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows, data = [], []
    context = multiprocessing.get_context("spawn")
    for model, busy, threads, spinning in itertools.product(
        args.model, (False, True), (1, 2), (True, False)
    ):
        stop = context.Event()
        burner = context.Process(target=_burn, args=(stop,)) if busy else None
        if burner:
            burner.start()
            time.sleep(0.5)
        try:
            ms = latencies_ms(model, threads, spinning, args.batch_size, args.calls)
        finally:
            if burner:
                stop.set()
                burner.join()
        stats = percentiles(ms)
        data.append(
            {"model": model, "busy_core": busy, "threads": threads, "spinning": spinning, **stats}
        )
        rows.append(
            [
                model,
                "busy" if busy else "idle",
                str(threads),
                "on" if spinning else "off",
                *(f"{stats[k]:.1f}" for k in ("p50", "p95", "p99", "max")),
                f"{stats['p99'] / stats['p50']:.2f}",
            ]
        )
        print(" ".join(rows[-1]), flush=True)
    text = "\n".join(
        [
            f"# ONNX Runtime intra-op threads on {os.cpu_count()} cores, batch {args.batch_size}",
            "",
            f"{args.calls} timed calls per row, in-process, the served `model.onnx` (uint8 input). "
            "`busy`: another process keeps one core busy meanwhile, as the console's decoding "
            f"does on the edge box. 1-minute load average before the run: {load:.2f}.",
            "",
            markdown_table(
                [
                    "model",
                    "other core",
                    "threads",
                    "spinning",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "max ms",
                    "p99/p50",
                ],
                rows,
                align="llrlrrrrr",
            ),
        ]
    )
    sys.stdout.write(text + "\n")
    write_report(args.results_dir, "ort_threads", text, {"load_average_1m": load, "rows": data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
