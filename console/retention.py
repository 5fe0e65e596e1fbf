"""Retention: delete stored slice images once their study finished ``RETENTION_DAYS`` ago.

The console is a triage aid, not the archive of record (PACS keeps the
images), so it keeps patients' images only as long as triage needs them. A
study qualifies when it finished more than the retention period ago,
acknowledged or not: an alert nobody acknowledged must not keep images
forever, and the scores, the key slice, the audit trail and the study's page
all remain; its images then read "image purged" (410 for the image routes).
Result objects still waiting for a PACS that never took them (console/outbox.py)
carry the key slice's image too: they are failed with the reason and their
bytes dropped, so a PACS down for weeks cannot keep images past the period.

Files are content-addressed and may be shared: a file is deleted only when no
slice that is not purged (a queued slice of a newer upload, another study)
still refers to it. Purging is two steps, so a crash in between loses
nothing: mark the slices and audit (one transaction), then delete every
purged slice's file nobody else needs (a rerun finishes what a crash left).

    python -m console purge             # HEMOTRIAGE_RETENTION_DAYS (default 30)
    python -m console purge --days 7    # e.g. daily from cron or a systemd timer
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from console.db import Connection, audit, begin_write, connect
from console.filestore import remove, stored_path
from console.queue import FINISHED

logger = logging.getLogger(__name__)

#: Who the audit log names for purges.
PURGE_ACTOR = "retention"
#: Why a result object still pending at the purge was failed.
UNDELIVERED_REASON = "the retention period ended before the PACS took it; dropped unsent"


@dataclass(frozen=True)
class PurgeResult:
    """What one purge did: studies whose slices it marked, slices marked, files deleted."""

    study_ids: list[int]
    slices: int
    files_deleted: int


def purge(db: Connection, storage_dir: Path, retention_days: float) -> PurgeResult:
    """Mark and audit the slices of studies finished over ``retention_days`` ago; delete files.

    Args:
        db: A connection (not inside a transaction).
        storage_dir: ``STORAGE_DIR``, the root of the file store.
        retention_days: Days a finished study keeps its images (0: every finished study).

    Returns:
        The studies purged now, their slices, and the files deleted (including any a
        crashed earlier run left behind).
    """
    now = time.time()
    cutoff = now - retention_days * 86400
    with db:
        begin_write(db)
        studies = db.execute(
            f"SELECT id FROM studies WHERE status IN ({', '.join('?' * len(FINISHED))})"
            " AND finished_at < ? AND EXISTS"
            " (SELECT 1 FROM slices WHERE study_id = studies.id AND purged_at IS NULL)"
            " ORDER BY id",
            (*FINISHED, cutoff),
        ).fetchall()
        marked = 0
        for study in studies:
            count = db.execute(
                "UPDATE slices SET purged_at = ? WHERE study_id = ? AND purged_at IS NULL",
                (now, study["id"]),
            ).rowcount
            marked += count
            undelivered = db.execute(
                "UPDATE outbox SET status = 'failed', dataset = NULL, last_error = ? "
                "WHERE study_id = ? AND status = 'pending'",
                (UNDELIVERED_REASON, study["id"]),
            ).rowcount
            detail = f"{count} slice images, finished over {retention_days:g} days ago"
            if undelivered:
                detail += f"; {undelivered} result objects never delivered, dropped"
            audit(db, PURGE_ACTOR, "purge", study["id"], detail)
    files_deleted = _delete_unneeded_files(db, storage_dir)
    result = PurgeResult([s["id"] for s in studies], marked, files_deleted)
    logger.info(
        "retention purge: %d studies, %d slices, %d files deleted",
        len(result.study_ids),
        result.slices,
        result.files_deleted,
    )
    return result


def _delete_unneeded_files(db: Connection, storage_dir: Path) -> int:
    """Delete the files of purged slices that no unpurged slice refers to; return how many.

    Runs under the write lock, so no upload commits a new reference meanwhile.
    """
    with db:
        begin_write(db)
        relative = [
            row["stored_path"]
            for row in db.execute(
                "SELECT DISTINCT stored_path FROM slices WHERE purged_at IS NOT NULL"
                " EXCEPT SELECT stored_path FROM slices WHERE purged_at IS NULL"
            )
        ]
        paths = [stored_path(storage_dir, r) for r in relative]
        present = [p for p in paths if p.exists()]
        remove(present)
    return len(present)


@click.command("purge")
@with_appcontext
@click.option(
    "--days",
    type=float,
    default=None,
    help="Retention in days (default HEMOTRIAGE_RETENTION_DAYS, 30).",
)
def purge_command(days: float | None) -> None:
    """Delete stored images of studies finished more than the retention period ago."""
    if days is None:
        days = float(current_app.config["RETENTION_DAYS"])
    if days < 0:
        raise click.ClickException("--days must be 0 or more")
    db = connect(current_app.config["DATABASE"])
    try:
        result = purge(db, Path(current_app.config["STORAGE_DIR"]), days)
    finally:
        db.close()
    click.echo(
        f"purged {len(result.study_ids)} studies ({result.slices} slices), "
        f"deleted {result.files_deleted} files"
    )


def init_app(app: Flask) -> None:
    """Register the ``purge`` command."""
    app.cli.add_command(purge_command)
