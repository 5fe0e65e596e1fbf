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
``--results-dir``. :class:`ConsoleStack` is shared with ``bench_time_to_alert.py``;
the series come from ``benchmarks/phantoms.py``. The default ports (console 5100,
Triton 8100-8102) stay clear of ``make demo`` (5000, 8000-8002).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from client.constants import ENV_PREFIX, REPO_ROOT
from client.registry import list_models

logger = logging.getLogger(__name__)

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LOCUSTFILE = REPO_ROOT / "benchmarks" / "locustfile.py"
#: The user that owns the benchmark's API token.
BENCH_USER = "bench"
#: Seconds between progress lines while something long runs.
_PROGRESS_S = 10.0
#: Header of locust's ``*_stats.csv`` per-endpoint table.
_STATS_COLUMNS = ("Type", "Name", "Request Count", "Failure Count", "50%", "95%", "99%")
_SLICE_STATES = "SELECT id, status, error FROM slices"


@dataclass(frozen=True)
class StackSettings:
    """Ports and models of a benchmark stack.

    Attributes:
        console_port: gunicorn's port on 127.0.0.1.
        dicom_port: The console's DICOM receiver on 127.0.0.1 (beside ``make demo``'s 11112).
        http_port: Triton HTTP.
        grpc_port: Triton gRPC (the console's classifier uses it).
        metrics_port: Triton metrics.
        models: Models Triton loads; the first is the console's ``MODEL_NAME``.
        ready_timeout_s: Longest wait for the console's ``/readyz``.
    """

    console_port: int = 5100
    dicom_port: int = 11212
    http_port: int = 8100
    grpc_port: int = 8101
    metrics_port: int = 8102
    models: tuple[str, ...] = ("mobilenet_v2",)
    ready_timeout_s: float = 120.0


class ConsoleStack:
    """Embedded Triton plus the console under gunicorn, on a temporary storage folder.

    ``HEMOTRIAGE_*`` variables in the environment reach the console (for example
    ``HEMOTRIAGE_BATCH_SIZE=32``), except the ones this class sets: storage,
    database, bind address, Triton URL and protocol, and the model.

    Attributes:
        url: The console's base URL.
        token: An API token of the ``bench`` administrator.
        database: The console's SQLite file.
        triton_grpc_url: ``localhost:<port>`` of Triton's gRPC endpoint.
        log_path: gunicorn's log (deleted with the storage folder on exit).

    Raises:
        HemoTriageError: (on enter) Triton does not start.
        RuntimeError: (on enter) the console does not start or become ready.
    """

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.url = f"http://127.0.0.1:{self.settings.console_port}"
        self.token = ""
        self.database = Path()
        self.triton_grpc_url = ""
        self.log_path = Path()
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> ConsoleStack:
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._exit.close()

    def _start(self) -> None:
        from build_engines.serve import EmbeddedTriton, ServeSettings

        s = self.settings
        root = Path(self._exit.enter_context(tempfile.TemporaryDirectory(prefix="hemotriage-")))
        triton = self._exit.enter_context(
            EmbeddedTriton(
                ServeSettings.from_env(
                    http_port=s.http_port,
                    grpc_port=s.grpc_port,
                    metrics_port=s.metrics_port,
                    models=s.models,
                )
            )
        )
        self.triton_grpc_url = triton.grpc_url
        self.database = root / "storage" / "hemotriage.sqlite"
        self.log_path = root / "gunicorn.log"
        env = {
            **os.environ,
            f"{ENV_PREFIX}STORAGE_DIR": str(root / "storage"),
            f"{ENV_PREFIX}DATABASE": str(self.database),
            f"{ENV_PREFIX}CONSOLE_BIND": f"127.0.0.1:{s.console_port}",
            f"{ENV_PREFIX}DICOM_PORT": str(s.dicom_port),
            f"{ENV_PREFIX}TRITON_URL": triton.grpc_url,
            f"{ENV_PREFIX}TRITON_PROTOCOL": "grpc",
            f"{ENV_PREFIX}MODEL_NAME": s.models[0],
            f"{ENV_PREFIX}ADMIN_PASSWORD": secrets.token_urlsafe(16),
        }
        _console_cli(env, "create-admin", "--username", BENCH_USER)
        self.token = _console_cli(
            env, "create-token", "--username", BENCH_USER, "--name", "benchmark", "--scope", "full"
        ).split()[-1]
        log = self._exit.enter_context(self.log_path.open("wb"))
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "console/gunicorn.conf.py"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._exit.callback(_terminate, process)
        _wait_ready(self.url, process, self.log_path, s.ready_timeout_s)


def _console_cli(env: dict[str, str], *args: str) -> str:
    """Run ``python -m console ...`` against the stack's storage; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "console", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"python -m console {args[0]} failed:\n{result.stderr}")
    return result.stdout


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll ``/readyz`` until the database and the classifier answer."""
    start = time.monotonic()
    next_note = start + _PROGRESS_S
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    logger.info("console ready at %s", url)
                    return
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > next_note:
                logger.info("waiting for the console at %s (%s)", url, e)
                next_note += _PROGRESS_S
        time.sleep(0.5)
    raise RuntimeError(f"console not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM gunicorn (it lets the current batch finish); SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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
        lines = [
            f"Load test: {self.users} users (spawn rate {self.spawn_rate:g}/s), "
            f"{self.duration_s:.0f} s (locust's wall clock), {os.cpu_count()} CPU cores, "
            f"1-min load average at the end {self.load_average_1m:.2f}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| series accepted | {self.series_accepted} |",
            f"| slices accepted (locust's 201 answers) | {self.slices_accepted} |",
            f"| sustained scan rate | {self.series_per_min:.2f} series/min, "
            f"{self.slices_per_s:.2f} slices/s |",
            f"| classified while under load | {self.classified_during_load_per_s:.2f} slices/s |",
            f"| drain after the load stopped | {self.drain_s:.1f} s |",
            f"| requests | {self.requests} |",
            f"| failures | {self.failures} |",
            f"| locust exit code (2: an error outside a request) | {self.locust_exit_code} |",
            f"| slices classified | {a.classified} |",
            f"| slices failed with a reason | {a.failed_with_reason} |",
            f"| slices in the database no 201 named | {a.unlogged} |",
            f"| **lost scans** (missing {a.missing}, unfinished {a.unfinished}, "
            f"failed without reason {a.failed_without_reason}) | **{a.lost}** |",
            "",
            "| type | name | requests | failures | p50 ms | p95 ms | p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            "| " + " | ".join(row[c] for c in _STATS_COLUMNS) + " |" for row in self.endpoints
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
    parser.add_argument("--model", default="mobilenet_v2", choices=[s.name for s in list_models()])
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
    (args.results_dir / "loadtest_summary.md").write_text(text + "\n")
    (args.results_dir / "loadtest_summary.json").write_text(
        json.dumps({**asdict(summary), "lost": summary.audit.lost}, indent=2) + "\n"
    )
    return 1 if summary.audit.lost or summary.failures or summary.locust_exit_code else 0


if __name__ == "__main__":
    sys.exit(main())
