"""SQLite storage: studies, slices (the persistent queue), users, API tokens, audit log.

The database runs in WAL mode with ``synchronous=FULL``, so a committed upload
survives a power cut and readers (the worklist, the SSE stream) never block the
worker's writes. Request handlers use one connection per request through
:func:`get_db`; background threads open their own with :func:`connect`.

    flask --app console init-db        # or: python -m console init-db
    db = get_db()                      # inside a request or app context
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import click
from flask import Flask, current_app, g
from flask.cli import with_appcontext

#: Seconds a writer waits for the lock before SQLite raises "database is locked".
_BUSY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL
);

CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_key TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    source TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN
        ('queued', 'processing', 'flagged', 'negative', 'failed', 'acknowledged')),
    score REAL,
    threshold REAL,
    key_slice_id INTEGER,
    model_name TEXT,
    model_version TEXT,
    received_at REAL NOT NULL,
    finished_at REAL,
    flagged_at REAL,
    acknowledged_at REAL,
    acknowledged_by TEXT,
    updated_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    filename TEXT NOT NULL,
    stored_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    sop_uid TEXT,
    instance_number INTEGER,
    slice_position_mm REAL,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN
        ('queued', 'processing', 'classified', 'failed')),
    priority INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    probability REAL,
    head_fraction REAL,
    error TEXT,
    ingest_ms REAL,
    decode_ms REAL,
    preprocess_ms REAL,
    queue_wait_ms REAL,
    inference_ms REAL,
    UNIQUE (study_id, sha256)
);

CREATE INDEX IF NOT EXISTS slices_queue ON slices (status, priority, queued_at, id);
CREATE INDEX IF NOT EXISTS slices_study ON slices (study_id);
-- A SOP instance is one slice of its study however often (and however encoded) it is sent.
CREATE UNIQUE INDEX IF NOT EXISTS slices_sop ON slices (study_id, sop_uid)
    WHERE sop_uid IS NOT NULL;

CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    study_id INTEGER REFERENCES studies (id),
    detail TEXT NOT NULL DEFAULT ''
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open a connection in WAL mode with durable commits and row access by name.

    Args:
        path: The database file; its folder is created if missing.

    Returns:
        A connection whose rows are :class:`sqlite3.Row`. Transactions are
        explicit: use ``with db:`` to commit or roll back.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
    db.row_factory = sqlite3.Row
    # WAL: readers never block the writer (https://sqlite.org/wal.html);
    # synchronous=FULL fsyncs the WAL on every commit, so a 201 means on disk.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def get_db() -> sqlite3.Connection:
    """This request's connection, opened on first use and closed by :func:`close_db`."""
    if "db" not in g:
        g.db = connect(current_app.config["DATABASE"])
    return g.db


def close_db(_error: BaseException | None = None) -> None:
    """Close the request's connection, if one was opened."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_db(path: str | Path) -> None:
    """Create every table that does not exist yet (safe to run on a live database)."""
    db = connect(path)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()


def audit(
    db: sqlite3.Connection,
    username: str,
    action: str,
    study_id: int | None = None,
    detail: str = "",
) -> None:
    """Append one row to the audit log (inside the caller's transaction)."""
    db.execute(
        "INSERT INTO audit_log (at, username, action, study_id, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), username, action, study_id, detail),
    )


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the console's tables (existing data is kept)."""
    init_db(current_app.config["DATABASE"])
    click.echo(f"initialized the database at {current_app.config['DATABASE']}")


def init_app(app: Flask) -> None:
    """Register connection teardown and the ``init-db`` command on ``app``."""
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
