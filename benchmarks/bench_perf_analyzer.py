"""Triton's own ``perf_analyzer`` on our models, beside bench_serving (issue 10).

Every Triton user knows perf_analyzer's figures, so this runs it on the same
embedded CPU Triton and the same four models (mobilenet_v2, resnet18 and their
INT8 builds) at concurrency 1, 2, 4, 8 and 16, over HTTP and gRPC, with the
input over the wire and through system shared memory (``--shared-memory
system``: perf_analyzer and Triton share this host). perf_analyzer sends random
uint8 tensors of the model's input shape, batch 1, and measures from the
tensor: no decoding or preprocessing, unlike bench_serving's rows, which start
from the PNG.

It writes ``perf_analyzer.md``, ``perf_analyzer.json`` and
``perf_analyzer_throughput.png`` to ``--out-dir``.

The binary comes from the ``perf-analyzer`` wheel on PyPI (``pip install
perf-analyzer``; its only wheels are manylinux_2_38, glibc 2.38 or newer). It
is looked up as ``--perf-analyzer``, then ``HEMOTRIAGE_PERF_ANALYZER`` (a
command, e.g. a wrapper that runs it under a newer glibc), then
``perf_analyzer`` next to this Python and on ``PATH``.

    python -m benchmarks.bench_perf_analyzer
    python -m benchmarks.bench_perf_analyzer --model resnet18 --concurrency 1 8 --protocol grpc
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.report import RESULTS_DIR, figure, markdown_table, write_report
from benchmarks.stack import triton_on_free_ports
from client.constants import ENV_PREFIX
from client.registry import list_models

logger = logging.getLogger(__name__)

CONCURRENCY = (1, 2, 4, 8, 16)
PROTOCOLS = ("http", "grpc")
SHARED_MEMORY = ("none", "system")
#: Environment variable naming the perf_analyzer command.
PERF_ANALYZER_ENV = f"{ENV_PREFIX}PERF_ANALYZER"
#: Longest a single perf_analyzer run may take before it is stopped.
_RUN_TIMEOUT_S = 300


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot run here, or failed."""


@dataclass(frozen=True)
class PerfRow:
    """One perf_analyzer measurement (one model, protocol, transport and concurrency).

    Latencies are perf_analyzer's client-side request latencies in ms.
    """

    model: str
    protocol: str
    shared_memory: str
    concurrency: int
    infer_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float


def parse_csv(text: str, model: str, protocol: str, shared_memory: str) -> list[PerfRow]:
    """Rows of perf_analyzer's ``-f`` CSV report (times in µs) as :class:`PerfRow` (ms).

    Raises:
        PerfAnalyzerError: the text has no measurement rows or lacks a column.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    reader = csv.DictReader(lines)
    rows = []
    try:
        for record in reader:
            if not record.get("Concurrency", "").strip().isdigit():
                continue  # perf_analyzer appends blank and summary lines in some modes
            compute = sum(
                float(record[k])
                for k in (
                    "Server Compute Input",
                    "Server Compute Infer",
                    "Server Compute Output",
                )
            )
            rows.append(
                PerfRow(
                    model=model,
                    protocol=protocol,
                    shared_memory=shared_memory,
                    concurrency=int(record["Concurrency"]),
                    infer_per_s=float(record["Inferences/Second"]),
                    p50_ms=float(record["p50 latency"]) / 1000,
                    p90_ms=float(record["p90 latency"]) / 1000,
                    p95_ms=float(record["p95 latency"]) / 1000,
                    p99_ms=float(record["p99 latency"]) / 1000,
                    server_queue_ms=float(record["Server Queue"]) / 1000,
                    server_compute_ms=compute / 1000,
                )
            )
    except (KeyError, ValueError) as e:
        raise PerfAnalyzerError(f"unexpected perf_analyzer CSV ({e}): {lines[:2]}") from e
    if not rows:
        raise PerfAnalyzerError(f"no measurement in perf_analyzer's CSV: {lines[:2]}")
    return rows


def find_perf_analyzer(explicit: str | None = None) -> list[str]:
    """The perf_analyzer command as an argv prefix; see the module docstring.

    Raises:
        PerfAnalyzerError: none is found.
    """
    command = explicit or os.environ.get(PERF_ANALYZER_ENV)
    if command:
        return shlex.split(command)
    beside = Path(sys.executable).parent / "perf_analyzer"
    for candidate in (beside, shutil.which("perf_analyzer")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    raise PerfAnalyzerError(
        "perf_analyzer not found: 'pip install perf-analyzer' (manylinux_2_38 wheels, "
        f"glibc 2.38+), or set {PERF_ANALYZER_ENV} to a command that runs it"
    )


def check_runs(command: list[str]) -> None:
    """Run the binary once without arguments: a glibc too old shows up here, with its message.

    Raises:
        PerfAnalyzerError: it cannot start (missing libraries or symbol versions).
    """
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise PerfAnalyzerError(f"cannot start {command[0]}: {e}") from e
    output = done.stdout + done.stderr
    if "GLIBC" in output or "error while loading shared libraries" in output:
        raise PerfAnalyzerError(
            f"{command[0]} cannot run on this machine: {output.strip().splitlines()[0]}"
        )


def perf_command(
    command: list[str],
    model: str,
    url: str,
    protocol: str,
    shared_memory: str,
    concurrency: int,
    csv_path: Path,
    interval_ms: int,
    max_trials: int,
) -> list[str]:
    """The argv of one perf_analyzer run: one model, one concurrency, batch 1."""
    return [
        *command,
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        "1",
        f"--concurrency-range={concurrency}:{concurrency}",
        f"--shared-memory={shared_memory}",
        "--measurement-mode=time_windows",
        f"--measurement-interval={interval_ms}",
        # Others share this machine's cores: a stable measurement may never come, so
        # the check is off (a huge threshold) and the last windows are reported.
        "--stability-percentage=999",
        f"--max-trials={max_trials}",
        f"--warmup-request-count={2 * concurrency}",
        "-f",
        str(csv_path),
    ]


def run_one(argv: list[str], model: str, protocol: str, shared_memory: str) -> list[PerfRow]:
    """Run perf_analyzer and parse its CSV.

    Raises:
        PerfAnalyzerError: it failed or wrote no CSV.
    """
    csv_path = Path(argv[argv.index("-f") + 1])
    logger.info("%s", shlex.join(argv))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise PerfAnalyzerError(f"perf_analyzer ran over {_RUN_TIMEOUT_S} s: {argv}") from e
    if done.returncode != 0 or not csv_path.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise PerfAnalyzerError(f"perf_analyzer exited {done.returncode}: {' | '.join(tail)}")
    return parse_csv(csv_path.read_text(), model, protocol, shared_memory)


def render_markdown(report: dict) -> str:
    """``perf_analyzer.md``: how it was run, then one row per measurement."""
    rows = [PerfRow(**r) for r in report["rows"]]
    headers = [
        *("model", "protocol", "input", "concurrency", "infer/s"),
        *("p50 ms", "p95 ms", "p99 ms", "server queue ms", "server compute ms"),
    ]
    table = [
        [
            r.model,
            r.protocol,
            "shm" if r.shared_memory == "system" else "wire",
            r.concurrency,
            f"{r.infer_per_s:.1f}",
            *(f"{v:.1f}" for v in (r.p50_ms, r.p95_ms, r.p99_ms)),
            *(f"{v:.1f}" for v in (r.server_queue_ms, r.server_compute_ms)),
        ]
        for r in rows
    ]
    failures = [f"- {f}" for f in report["failures"]] or ["- none"]
    return "\n".join(
        [
            "# perf_analyzer: Triton's own measurement of the embedded CPU Triton",
            "",
            f"- Date (UTC): {report['date']}; perf_analyzer {report['version']}",
            f"- Command: `{report['command']}`",
            f"- Machine: {report['cores']} cores; 1-minute load average {report['load_start']:.2f} "
            f"at the start, {report['load_end']:.2f} at the end (other engineers share the "
            "cores: absolute figures are pessimistic, compare rows with each other)",
            f"- Each row: batch 1, random uint8 input (the model's (3, 224, 224)), "
            "2 warm-up requests per concurrent stream, then up to "
            f"{report['max_trials']} "
            f"windows of {report['interval_ms']} ms (time_windows, no stability required; "
            "perf_analyzer reports the last three), latencies as the client sees them. "
            "`shm`: `--shared-memory=system` (input and output in system shared memory); "
            "`wire`: in the request.",
            "",
            markdown_table(headers, table, align="lllrrrrrrr"),
            "",
            "Runs that failed:",
            "",
            *failures,
            "",
            "![inferences/s vs concurrency](perf_analyzer_throughput.png)",
            "",
        ]
    )


def plot(rows: list[PerfRow], path: Path) -> None:
    """One panel per model, one line per protocol and transport: infer/s against concurrency."""
    models = list(dict.fromkeys(r.model for r in rows))
    with figure(path, len(models), (4.5 * len(models), 4.0), dpi=110) as axes:
        for axis, model in zip(axes, models, strict=True):
            mine = [r for r in rows if r.model == model]
            for line in dict.fromkeys((r.protocol, r.shared_memory) for r in mine):
                points = [r for r in mine if (r.protocol, r.shared_memory) == line]
                label = f"{line[0]} {'shm' if line[1] == 'system' else 'wire'}"
                axis.plot(
                    [r.concurrency for r in points],
                    [r.infer_per_s for r in points],
                    marker="o",
                    label=label,
                )
            axis.set(title=model, xlabel="concurrency", ylabel="inferences/s", xscale="log")
            axis.set_xticks(sorted({r.concurrency for r in mine}))
            axis.set_xticklabels([str(c) for c in sorted({r.concurrency for r in mine})])
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s.name for s in list_models()]
    parser.add_argument("--model", nargs="+", choices=names, default=names)
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument(
        "--shared-memory", nargs="+", choices=SHARED_MEMORY, default=list(SHARED_MEMORY)
    )
    parser.add_argument("--interval-ms", type=int, default=1500, help="measurement window")
    parser.add_argument("--max-trials", type=int, default=4, help="windows per row (3 or more)")
    parser.add_argument("--perf-analyzer", help=f"command; default {PERF_ANALYZER_ENV} or PATH")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start Triton, run every combination, write the report; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        command = find_perf_analyzer(args.perf_analyzer)
        check_runs(command)
    except PerfAnalyzerError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    version = _version()
    load_start = os.getloadavg()[0]
    rows: list[PerfRow] = []
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(triton_on_free_ports(tuple(args.model)))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls = {"http": server.http_url, "grpc": server.grpc_url}
        for model in args.model:
            for protocol in args.protocol:
                for shared_memory in args.shared_memory:
                    for concurrency in args.concurrency:
                        csv_path = tmp / f"{model}-{protocol}-{shared_memory}-{concurrency}.csv"
                        run = perf_command(
                            command,
                            model,
                            urls[protocol],
                            protocol,
                            shared_memory,
                            concurrency,
                            csv_path,
                            args.interval_ms,
                            args.max_trials,
                        )
                        try:
                            rows += run_one(run, model, protocol, shared_memory)
                        except PerfAnalyzerError as e:
                            logger.warning("%s", e)
                            failures.append(
                                f"{model} {protocol} {shared_memory} c={concurrency}: {e}"
                            )
                        if rows:
                            logger.info("%s", rows[-1])
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "version": version,
        "command": shlex.join(sys.orig_argv),
        "cores": len(os.sched_getaffinity(0)),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "interval_ms": args.interval_ms,
        "max_trials": args.max_trials,
        "rows": [asdict(r) for r in rows],
        "failures": failures,
    }
    write_report(args.out_dir, "perf_analyzer", render_markdown(report), report)
    if rows:
        plot(rows, args.out_dir / "perf_analyzer_throughput.png")
    sys.stdout.write(f"wrote {args.out_dir}/perf_analyzer.md ({len(rows)} rows)\n")
    return 0 if rows and not failures else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("perf-analyzer")
    except PackageNotFoundError:
        return "(binary outside this environment)"


if __name__ == "__main__":
    sys.exit(main())
