"""Queue throughput without inference: slices claimed and committed per second.

Each worker is its own process with its own connection, as a console node is:
it claims a batch (``console.queue.claim``: ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL), then records every slice's result and refreshes the study in one
transaction, exactly as the console worker commits (``queue.finish`` fenced by
the claim token, ``queue.refresh_study``), until the queue is empty. No model
runs: this measures what the database lets the queue do. The same run measures
PostgreSQL (a throwaway cluster from ``benchmarks/postgres.py``) with 1 and
``--workers`` competing workers and SQLite with one worker (the single box)
and with ``--workers`` (for contrast: SQLite has one writer). Every run checks
that each slice was recorded exactly once.

    python -m benchmarks.bench_queue_claim                 # 4,000 slices, 4 workers
    python -m benchmarks.bench_queue_claim --slices 8000 --workers 8

Writes ``queue_claim.{md,json}`` to ``--results-dir``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.postgres import Postgres
from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from client.registry import get_model
from console import queue
from console.db import begin_write, connect, init_db

#: Slices per study (a study is refreshed after each batch that touched it).
SLICES_PER_STUDY = 40
_TIMINGS = queue.SliceTimings(1.0, 1.0, 0.0, 1.0)


@dataclass(frozen=True)
class Run:
    """One engine and worker count: what the workers did and how fast."""

    engine: str
    workers: int
    slices: int
    recorded: int
    refused: int
    seconds: float

    @property
    def slices_per_s(self) -> float:
        """Slices recorded per second of the run, from the common start to the last worker."""
        return self.recorded / self.seconds


def fill(database: str, slices: int) -> None:
    """A fresh schema with ``slices`` queued slices in studies of :data:`SLICES_PER_STUDY`."""
    init_db(database)
    db = connect(database)
    now = time.time()
    with db:
        begin_write(db)
        for first in range(0, slices, SLICES_PER_STUDY):
            study_id = db.execute(
                "INSERT INTO studies (study_key, label, source, priority, received_at, "
                "updated_at) VALUES (?, ?, 'api', 2, ?, ?) RETURNING id",
                (f"bench-{first}", f"bench {first}", now, now),
            ).fetchone()["id"]
            db.executemany(
                "INSERT INTO slices (study_id, filename, stored_path, sha256, priority, "
                "queued_at) VALUES (?, ?, ?, ?, 2, ?)",
                [
                    (study_id, f"{i}.png", f"bench/{i}.png", f"{i:064x}", now + i * 1e-6)
                    for i in range(first, min(first + SLICES_PER_STUDY, slices))
                ],
            )
    db.close()


def work(database: str, node: str, batch_size: int, start_at: float) -> tuple[int, int, float]:
    """One worker: claim and commit until the queue is empty; (recorded, refused, end time)."""
    spec = get_model("mobilenet_v2")
    db = connect(database)
    recorded = refused = 0
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        with db:
            begin_write(db, row_locks=True)
            rows = queue.claim(db, batch_size, node)
        if not rows:
            break
        with db:
            begin_write(db)
            for row in rows:
                if queue.finish(db, row["id"], 0.1, 0.5, _TIMINGS, row["claim_token"]):
                    recorded += 1
                else:
                    refused += 1
            for study_id in sorted({row["study_id"] for row in rows}):
                queue.refresh_study(db, study_id, spec)
    end = time.time()
    db.close()
    return recorded, refused, end


def measure(engine: str, database: str, slices: int, workers: int, batch_size: int) -> Run:
    """Fill the queue, start ``workers`` processes together, wait for the queue to drain."""
    fill(database, slices)
    start_at = time.time() + 2.0  # every process connected and waiting
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        results = pool.starmap(
            work, [(database, f"node-{i}", batch_size, start_at) for i in range(workers)]
        )
    db = connect(database)
    done = db.execute("SELECT COUNT(*) AS n FROM slices WHERE status = 'classified'").fetchone()
    db.close()
    recorded = sum(r[0] for r in results)
    if recorded != slices or done["n"] != slices:
        raise SystemExit(f"{engine}: {recorded} recorded, {done['n']} classified of {slices}")
    return Run(
        engine=engine,
        workers=workers,
        slices=slices,
        recorded=recorded,
        refused=sum(r[1] for r in results),
        seconds=max(r[2] for r in results) - start_at,
    )


def report(runs: list[Run], args: argparse.Namespace, load: float) -> str:
    """The Markdown table, with PostgreSQL's ratio to the single box."""
    box = next(r for r in runs if r.engine == "sqlite" and r.workers == 1)
    rows = [
        [
            r.engine,
            str(r.workers),
            str(r.recorded),
            str(r.refused),
            f"{r.seconds:.2f}",
            f"{r.slices_per_s:.0f}",
            f"{r.slices_per_s / box.slices_per_s:.2f}",
        ]
        for r in runs
    ]
    return "\n".join(
        [
            f"# Queue claim throughput ({os.cpu_count()} CPU cores, no inference)",
            "",
            f"{args.slices} queued slices in studies of {SLICES_PER_STUDY}, batches of "
            f"{args.batch_size}; each worker a process with its own connection: claim, then "
            "finish every slice and refresh its studies in one transaction, as the console "
            "worker commits. A run fails unless every slice was recorded exactly once; "
            "`refused` counts results a fenced update turned away (a claim another worker "
            "took over). SQLite with `synchronous=FULL` on "
            "this disk; the PostgreSQL cluster is a throwaway one with `fsync=off`, so its "
            "commits cost no disk flush (a production server's do).",
            "",
            f"1-minute load average before the run: {load:.2f} on {platform.platform()}.",
            "",
            markdown_table(
                [
                    "engine",
                    "workers",
                    "recorded",
                    "refused",
                    "seconds",
                    "slices/s",
                    "vs SQLite, 1 worker",
                ],
                rows,
                align="lrrrrrr",
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run SQLite and PostgreSQL with 1 and ``--workers`` workers; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as folder, Postgres() as server:
        for engine, workers in (
            ("sqlite", 1),
            ("sqlite", args.workers),
            ("postgresql", 1),
            ("postgresql", args.workers),
        ):
            database = (
                str(Path(folder) / f"queue-{workers}.sqlite")
                if engine == "sqlite"
                else server.create_database()
            )
            runs.append(measure(engine, database, args.slices, workers, args.batch_size))
            print(f"{engine} x{workers}: {runs[-1].slices_per_s:.0f} slices/s", flush=True)
    text = report(runs, args, load)
    sys.stdout.write(text + "\n")
    write_report(
        args.results_dir,
        "queue_claim",
        text,
        {
            "load_average_1m": load,
            "runs": [asdict(r) | {"slices_per_s": r.slices_per_s} for r in runs],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
