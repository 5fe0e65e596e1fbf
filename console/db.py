"""SQLite storage: studies, slices (queue), users, tokens, audit log, feedback, outbox.

The database runs in WAL mode with ``synchronous=FULL``, so a committed upload
survives a power cut and readers (the worklist, the SSE stream) never block the
worker's writes. Request handlers use one connection per request through
:func:`get_db`; background threads open their own with :func:`connect`.

    flask --app console init-db        # or: python -m console init-db
    db = get_db()                      # inside a request or app context

:func:`init_db` also upgrades a database made by an earlier release: columns
added since (``users.role``, ``api_tokens.scope`` and ``expires_at``,
``audit_log.client_addr``, ``slices.purged_at``, ``studies.flag_score``,
``completed_at``, ``completed_slices`` and ``result_version``) are added in place,
and new tables (``feedback``, ``outbox``) created, so data is never rebuilt or lost.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import click
from flask import Flask, current_app, g
from flask.cli import with_appcontext

#: Seconds a writer waits for the lock before SQLite raises "database is locked"
#: (the app's ``DATABASE_BUSY_TIMEOUT_S``).
BUSY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'clinician' CHECK (role IN ('clinician', 'admin')),
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL DEFAULT 'upload' CHECK (scope IN ('upload', 'full')),
    created_at REAL NOT NULL,
    expires_at REAL,
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
    updated_at REAL NOT NULL,
    flag_score REAL,
    completed_at REAL,
    completed_slices INTEGER,
    result_version INTEGER NOT NULL DEFAULT 0
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
    purged_at REAL,
    UNIQUE (study_id, sha256)
);

CREATE INDEX IF NOT EXISTS slices_queue ON slices (status, priority, queued_at, id);
CREATE INDEX IF NOT EXISTS slices_study ON slices (study_id);

CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    study_id INTEGER REFERENCES studies (id),
    detail TEXT NOT NULL DEFAULT '',
    client_addr TEXT
);

CREATE INDEX IF NOT EXISTS audit_action ON audit_log (action, at);

CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    at REAL NOT NULL,
    username TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN
        ('true_positive', 'false_positive', 'true_negative', 'false_negative')),
    note TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    score REAL NOT NULL,
    threshold REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS feedback_study ON feedback (study_id, id);

CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    version INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('sr', 'sc')),
    sop_class_uid TEXT,
    sop_uid TEXT UNIQUE,
    destination TEXT NOT NULL,
    dataset BLOB,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL
);

CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_study ON outbox (study_id);
"""

#: Columns added since the first release: (table, column, definition as in SCHEMA).
_ADDED_COLUMNS = (
    ("users", "role", "TEXT NOT NULL DEFAULT 'clinician' CHECK (role IN ('clinician', 'admin'))"),
    ("api_tokens", "scope", "TEXT NOT NULL DEFAULT 'upload' CHECK (scope IN ('upload', 'full'))"),
    ("api_tokens", "expires_at", "REAL"),
    ("audit_log", "client_addr", "TEXT"),
    ("slices", "purged_at", "REAL"),
    ("studies", "flag_score", "REAL"),
    ("studies", "completed_at", "REAL"),
    ("studies", "completed_slices", "INTEGER"),
    ("studies", "result_version", "INTEGER NOT NULL DEFAULT 0"),
)
#: Lifetime given to API tokens issued before tokens expired (the default of ``create-token``).
LEGACY_TOKEN_LIFETIME_S = 365 * 86400


def connect(path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open a connection in WAL mode with durable commits and row access by name.

    Args:
        path: The database file; its folder is created if missing.
        busy_timeout_s: How long a write waits for another writer's lock.

    Returns:
        A connection whose rows are :class:`sqlite3.Row`. Transactions are
        explicit: use ``with db:`` to commit or roll back.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)
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
        config = current_app.config
        g.db = connect(config["DATABASE"], float(config["DATABASE_BUSY_TIMEOUT_S"]))
    return g.db


def close_db(_error: BaseException | None = None) -> None:
    """Close the request's connection, if one was opened."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_db(path: str | Path) -> None:
    """Create every table that does not exist yet and upgrade older ones (idempotent).

    Safe on a live database: the upgrade runs in one ``BEGIN IMMEDIATE``
    transaction, so two processes starting together add each column once.
    """
    db = connect(path)
    try:
        db.executescript(SCHEMA)
        with db:
            db.execute("BEGIN IMMEDIATE")
            _add_missing_columns(db)
            _index_sop_instances(db)
    finally:
        db.close()


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """``ALTER TABLE ADD COLUMN`` what an older schema lacks, carrying old meanings over.

    Administrators of the old ``is_admin`` flag keep the admin role. A study
    flagged before flags were held keeps its score as the one that raised it.
    Tokens of the old schema become upload-only (closed by default: issue a
    ``--scope full`` token where a client reads) and expire a year after they
    were made.
    """
    for table, column, definition in _ADDED_COLUMNS:
        present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
        if column in present:
            continue
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        if (table, column) == ("users", "role") and "is_admin" in present:
            db.execute("UPDATE users SET role = 'admin' WHERE is_admin")
        if (table, column) == ("studies", "flag_score"):
            db.execute("UPDATE studies SET flag_score = score WHERE flagged_at IS NOT NULL")
        if (table, column) == ("api_tokens", "expires_at"):
            db.execute(
                "UPDATE api_tokens SET expires_at = created_at + ?", (LEGACY_TOKEN_LIFETIME_S,)
            )
        if (table, column) == ("studies", "completed_slices"):
            # Studies decided by a release without results: complete as they are, so
            # upgrading does not send every past study's results to the PACS at once.
            db.execute(
                "UPDATE studies SET completed_at = updated_at, completed_slices = "
                "(SELECT COUNT(*) FROM slices WHERE slices.study_id = studies.id)"
            )


def _index_sop_instances(db: sqlite3.Connection) -> None:
    """One slice per SOP instance of a study, however often (and however encoded) it is sent.

    Databases of earlier releases may hold the same SOP instance twice in a
    study (and empty UIDs, all merged into one study): those later copies keep
    their rows and results but lose the UID, so the unique index can be built.
    """
    db.execute("UPDATE slices SET sop_uid = NULL WHERE sop_uid = ''")
    db.execute(
        "UPDATE slices SET sop_uid = NULL WHERE sop_uid IS NOT NULL AND id NOT IN "
        "(SELECT MIN(id) FROM slices WHERE sop_uid IS NOT NULL GROUP BY study_id, sop_uid)"
    )
    db.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS slices_sop ON slices (study_id, sop_uid) "
        "WHERE sop_uid IS NOT NULL"
    )


def audit(
    db: sqlite3.Connection,
    username: str,
    action: str,
    study_id: int | None = None,
    detail: str = "",
    client_addr: str | None = None,
) -> None:
    """Append one row to the audit log (inside the caller's transaction).

    ``client_addr`` is the requesting address of logins, which throttling counts per address.
    """
    db.execute(
        "INSERT INTO audit_log (at, username, action, study_id, detail, client_addr)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), username, action, study_id, detail, client_addr),
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
