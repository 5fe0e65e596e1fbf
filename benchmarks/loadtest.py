"""The console load test in one command: the stack, locust, then a lost-scan audit.

Starts the embedded CPU Triton and the console under gunicorn
(``console/gunicorn.conf.py``) on a temporary storage folder, issues an API
token, runs ``benchmarks/locustfile.py`` headless with a fixed number of users
for a fixed time, waits for the queue to drain, and audits the SQLite
database: every slice the API accepted must end ``classified`` or ``failed``
with a reason. A slice that is missing, still queued or processing, or failed
without a reason is a lost scan, and the command exits non-zero.

    python -m benchmarks.loadtest                      # the 10-minute run
    python -m benchmarks.loadtest --duration-s 60      # a short one
    flock /tmp/hemotriage-bench.lock python -m benchmarks.loadtest

Locust's CSV and HTML reports and ``loadtest_summary.{md,json}`` go to
``--results-dir``. The stack is :class:`benchmarks.stack.ConsoleStack`, on free
ports (clear of ``make demo``); the series come from ``benchmarks/phantoms.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from benchmarks.stack import ConsoleStack, StackSettings
from client.constants import ENV_PREFIX, REPO_ROOT
from client.registry import list_models
from console import DEFAULTS as CONSOLE_DEFAULTS

logger = logging.getLogger(__name__)

LOCUSTFILE = REPO_ROOT / "benchmarks" / "locustfile.py"
#: Seconds between progress lines while something long runs.
_PROGRESS_S = 10.0
#: Header of locust's ``*_stats.csv`` per-endpoint table.
_STATS_COLUMNS = ("Type", "Name", "Request Count", "Failure Count", "50%", "95%", "99%")
_ENDPOINT_HEADERS = ("type", "name", "requests", "failures", "p50 ms", "p95 ms", "p99 ms")
_SLICE_STATES = "SELECT id, status, error FROM slices"


@dataclass(frozen=True)
class Audit:
    """What became of every slice the API accepted, after the drain wait.

    Attributes:
        accepted: Slice ids in 201 answers, as locust logged them.
        classified: Of those, ``classified``.
        failed_with_reason: Of those, ``failed`` with an error shown to users.
        failed_without_reason: Of those, ``failed`` with no error text.
        unfinished: Of those, still ``queued`` or ``processing``.
        missing: Of those, absent from the database.
        unlogged: Slices in the database that no 201 seen by locust named.
    """

    accepted: int
    classified: int
    failed_with_reason: int
    failed_without_reason: int
    unfinished: int
    missing: int
    unlogged: int

    @property
    def lost(self) -> int:
        """Accepted slices without a result or a reason: the number that must be 0."""
        return self.missing + self.unfinished + self.failed_without_reason


def audit_database(database: Path, accepted_ids: set[int]) -> Audit:
    """Compare the slices the API accepted with their state in the console's database.

    Args:
        database: The console's SQLite file (opened read-only).
        accepted_ids: Slice ids from the 201 answers.

    Returns:
        The counts; :attr:`Audit.lost` must be 0.
    """
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = {i: (status, error) for i, status, error in db.execute(_SLICE_STATES)}
    finally:
        db.close()
    found = [rows[i] for i in accepted_ids if i in rows]
    return Audit(
        accepted=len(accepted_ids),
        classified=sum(status == "classified" for status, _ in found),
        failed_with_reason=sum(status == "failed" and bool(error) for status, error in found),
        failed_without_reason=sum(status == "failed" and not error for status, error in found),
        unfinished=sum(status in ("queued", "processing") for status, _ in found),
        missing=len(accepted_ids) - len(found),
        unlogged=len(rows.keys() - accepted_ids),
    )


def queue_depth(database: Path) -> dict[str, int]:
    """Slices per state, read without taking a write lock."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT status, COUNT(*) FROM slices GROUP BY status").fetchall())
    finally:
        db.close()


def wait_for_drain(database: Path, timeout_s: float) -> float:
    """Wait until no slice is queued or processing; return the seconds it took."""
    start = time.monotonic()
    next_note = start
    while True:
        depth = queue_depth(database)
        pending = depth.get("queued", 0) + depth.get("processing", 0)
        elapsed = time.monotonic() - start
        if pending == 0 or elapsed > timeout_s:
            if pending:
                logger.warning("%d slices still pending after %.0f s", pending, elapsed)
            return elapsed
        if time.monotonic() >= next_note:
            logger.info("draining: %d slices pending (%s)", pending, _depth_text(depth))
            next_note += _PROGRESS_S
        time.sleep(0.5)


def read_ledger(path: Path) -> list[dict]:
    """The locustfile's record of accepted uploads, one JSON object a line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_locust_stats(prefix: Path) -> list[dict[str, str]]:
    """Rows of locust's ``<prefix>_stats.csv``, the ``Aggregated`` row last."""
    with Path(f"{prefix}_stats.csv").open(newline="") as f:
        return [{k: row[k] for k in _STATS_COLUMNS} for row in csv.DictReader(f)]


@dataclass(frozen=True)
class Summary:
    """The load test's outcome, printed and written as Markdown and JSON."""

    duration_s: float
    users: int
    spawn_rate: float
    load_average_1m: float
    series_accepted: int
    slices_accepted: int
    series_per_min: float
    slices_per_s: float
    classified_during_load_per_s: float
    drain_s: float
    requests: int
    failures: int
    locust_exit_code: int
    audit: Audit
    endpoints: list[dict[str, str]]

    def markdown(self) -> str:
        """The summary table, then locust's per-endpoint table."""
        a = self.audit
        measures = [
            ("series accepted", self.series_accepted),
            ("slices accepted (locust's 201 answers)", self.slices_accepted),
            (
                "sustained scan rate",
                f"{self.series_per_min:.2f} series/min, {self.slices_per_s:.2f} slices/s",
            ),
            ("classified while under load", f"{self.classified_during_load_per_s:.2f} slices/s"),
            ("drain after the load stopped", f"{self.drain_s:.1f} s"),
            ("requests", self.requests),
            ("failures", self.failures),
            ("locust exit code (2: an error outside a request)", self.locust_exit_code),
            ("slices classified", a.classified),
            ("slices failed with a reason", a.failed_with_reason),
            ("slices in the database no 201 named", a.unlogged),
            (
                f"**lost scans** (missing {a.missing}, unfinished {a.unfinished}, "
                f"failed without reason {a.failed_without_reason})",
                f"**{a.lost}**",
            ),
        ]
        endpoints = [[row[c] for c in _STATS_COLUMNS] for row in self.endpoints]
        lines = [
            f"Load test: {self.users} users (spawn rate {self.spawn_rate:g}/s), "
            f"{self.duration_s:.0f} s (locust's wall clock), {os.cpu_count()} CPU cores, "
            f"1-min load average at the end {self.load_average_1m:.2f}",
            "",
            markdown_table(["measure", "value"], measures),
            "",
            markdown_table(_ENDPOINT_HEADERS, endpoints, align="llrrrrr"),
        ]
        return "\n".join(lines)


def summarize(
    args: argparse.Namespace,
    database: Path,
    ledger: list[dict],
    window: tuple[float, float],
    drain_s: float,
    locust_exit_code: int,
) -> Summary:
    """Rates over the locust run's wall-clock window, counts from locust, the audit."""
    accepted = {i for entry in ledger for i in entry["slice_ids"]}
    endpoints = read_locust_stats(args.results_dir / "loadtest")
    total = endpoints[-1]
    seconds = window[1] - window[0]
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        (classified,) = db.execute(
            "SELECT COUNT(*) FROM slices WHERE status = 'classified' AND finished_at <= ?",
            (window[1],),
        ).fetchone()
    finally:
        db.close()
    return Summary(
        duration_s=seconds,
        users=args.users,
        spawn_rate=args.spawn_rate,
        load_average_1m=os.getloadavg()[0],
        series_accepted=len(ledger),
        slices_accepted=len(accepted),
        series_per_min=len(ledger) / seconds * 60,
        slices_per_s=len(accepted) / seconds,
        classified_during_load_per_s=classified / seconds,
        drain_s=drain_s,
        requests=int(total["Request Count"]),
        failures=int(total["Failure Count"]),
        locust_exit_code=locust_exit_code,
        audit=audit_database(database, accepted),
        endpoints=endpoints,
    )


def run_locust(args: argparse.Namespace, stack: ConsoleStack, ledger: Path) -> int:
    """Run locust headless against the stack, with a progress line now and then."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "locust"),
        f"--locustfile={LOCUSTFILE}",
        "--headless",
        "--only-summary",
        f"--host={stack.url}",
        f"--users={args.users}",
        f"--spawn-rate={args.spawn_rate}",
        f"--run-time={args.duration_s:.0f}s",
        # Let an upload in flight finish, so its 201 reaches the ledger.
        "--stop-timeout=60",
        f"--csv={args.results_dir / 'loadtest'}",
        f"--html={args.results_dir / 'loadtest.html'}",
        f"--triton-url={stack.triton_grpc_url}",
        f"--ledger={ledger}",
        f"--triton-model={args.model}",
        f"--series-slices={args.series_slices}",
        f"--scanner-pace-s={args.scanner_pace_s}",
    ]
    env = {**os.environ, f"{ENV_PREFIX}TOKEN": stack.token}
    log_path = args.results_dir / "loadtest_locust.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        start = time.monotonic()
        while process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            entries = read_ledger(ledger)
            logger.info(
                "locust %.0f/%.0f s: %d series accepted; queue %s",
                time.monotonic() - start,
                args.duration_s,
                len(entries),
                _depth_text(queue_depth(stack.database)),
            )
    logger.info("locust exited with %d (log %s)", process.returncode, log_path)
    return process.returncode


def _depth_text(depth: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in sorted(depth.items()))


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run locust, drain, audit, print and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="locust run time")
    parser.add_argument("--users", type=int, default=6, help="scanners:screens:Triton 2:3:1")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--series-slices", type=int, default=40, help="slices per series")
    parser.add_argument(
        "--scanner-pace-s", type=float, default=10.0, help="seconds between a scanner's series"
    )
    parser.add_argument(
        "--model",
        default=CONSOLE_DEFAULTS["MODEL_NAME"],
        choices=[s.name for s in list_models()],
        help="the console's model (default: the console's default)",
    )
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with ConsoleStack(StackSettings(models=(args.model,))) as stack:
        ledger = Path(tempfile.mkdtemp(prefix="hemotriage-ledger-")) / "accepted.jsonl"
        load_start = time.time()
        exit_code = run_locust(args, stack, ledger)
        window = (load_start, time.time())
        drain_s = wait_for_drain(stack.database, args.drain_timeout_s)
        summary = summarize(args, stack.database, read_ledger(ledger), window, drain_s, exit_code)
        ledger.unlink(missing_ok=True)
        ledger.parent.rmdir()
    text = summary.markdown()
    sys.stdout.write(text + "\n")
    data = {**asdict(summary), "lost": summary.audit.lost}
    write_report(args.results_dir, "loadtest_summary", text, data)
    return 1 if summary.audit.lost or summary.failures or summary.locust_exit_code else 0


if __name__ == "__main__":
    sys.exit(main())
