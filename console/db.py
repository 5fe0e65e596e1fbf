"""Storage for every engine: studies, slices (queue), users, tokens, audit log, feedback, outbox.

One database layer, two engines, chosen by the app's ``DATABASE``: a file path
opens SQLite (the default, ``instance/hemotriage.sqlite``), a
``postgresql://`` URL (``HEMOTRIAGE_DATABASE_URL``) opens PostgreSQL through
:mod:`console.postgres`, which offers the same sqlite3-style interface, so each
query is written once. What differs between the engines lives here (the DDL
types, :func:`begin_write`, :data:`DATABASE_ERRORS`) or beside the one queue
operation that needs it (:func:`console.queue.claim`).

SQLite runs in WAL mode with ``synchronous=FULL``, so a committed upload
survives a power cut and readers (the worklist, the SSE stream) never block the
worker's writes. Request handlers use one connection per request through
:func:`get_db` (borrowed from a pool on PostgreSQL); background threads open
their own with :func:`connect`.

    flask --app console init-db        # or: python -m console init-db
    db = get_db()                      # inside a request or app context

:func:`init_db` creates or upgrades either engine to :data:`SCHEMA_VERSION`
(the ``schema_version`` table records where a database stands; each step of
:data:`_MIGRATIONS` runs once). A SQLite database of a release before versions
is upgraded in place: columns added since (``users.role``, ``api_tokens.scope``
and ``expires_at``, ``audit_log.client_addr``, ``slices.purged_at``,
``studies.flag_score``, ``completed_at``, ``completed_slices`` and
``result_version``) are added, and new tables (``feedback``, ``outbox``)
created, so data is never rebuilt or lost.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click
from flask import Flask, current_app, g
from flask.cli import with_appcontext

from console import postgres

#: Seconds a writer waits for the lock before SQLite raises "database is locked"
#: (the app's ``DATABASE_BUSY_TIMEOUT_S``; PostgreSQL's ``lock_timeout``).
BUSY_TIMEOUT_S = 10.0
#: Errors of either engine, where code catches a failed database call.
DATABASE_ERRORS = (sqlite3.Error, postgres.Error)
#: The app extension holding the PostgreSQL connection pool of request handlers.
POOL_KEY = "hemotriage.db_pool"

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

#: Columns added before schema versions: (table, column, definition as in SCHEMA).
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


class SqliteConnection(sqlite3.Connection):
    """A :class:`sqlite3.Connection` that names its engine and starts writes like PostgreSQL's."""

    engine = "sqlite"
    #: A file connection does not drop (PostgreSQL's may: see ``PgConnection.broken``).
    broken = False

    def begin_write(self, row_locks: bool = False) -> None:
        """``BEGIN IMMEDIATE``: take SQLite's one write lock now (``row_locks`` changes nothing)."""
        self.execute("BEGIN IMMEDIATE")


#: A connection of either engine; both offer the sqlite3 subset the console uses.
Connection = SqliteConnection | postgres.PgConnection
#: A row of either engine: by column name, by index, and ``dict(row)``.
Row = sqlite3.Row | postgres.Row


def is_postgresql(database: str | Path) -> bool:
    """``database`` is a PostgreSQL URL (anything else is a SQLite file)."""
    return str(database).startswith(("postgresql://", "postgres://"))


def connect(database: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Connection:
    """Open a connection of the engine ``database`` names.

    SQLite runs in WAL mode with durable commits and row access by name.

    Args:
        database: A SQLite file (its folder is created if missing) or a PostgreSQL URL.
        busy_timeout_s: How long a write waits for another writer's lock.

    Returns:
        A connection whose rows work by name and index. Transactions are
        explicit: use ``with db:`` to commit or roll back, and
        :func:`begin_write` first where the transaction writes.
    """
    if is_postgresql(database):
        return postgres.connect(str(database), busy_timeout_s)
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        database, timeout=busy_timeout_s, check_same_thread=False, factory=SqliteConnection
    )
    db.row_factory = sqlite3.Row
    # WAL: readers never block the writer (https://sqlite.org/wal.html);
    # synchronous=FULL fsyncs the WAL on every commit, so a 201 means on disk.
    _enable_wal(db, busy_timeout_s)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _enable_wal(db: sqlite3.Connection, timeout_s: float) -> None:
    """Switch a SQLite connection to WAL, waiting out other connections doing the same.

    Turning a new file to WAL takes an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy timeout, where waiting
    could deadlock: several consoles starting together on one storage folder
    race here (before this, 1 run in 30 of the test that starts six failed).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def begin_write(db: Connection, row_locks: bool = False) -> None:
    """Start a write transaction inside ``with db:`` (SQLite's ``BEGIN IMMEDIATE``).

    Args:
        db: A connection, inside ``with db:``.
        row_locks: The transaction locks the rows it writes itself (``FOR UPDATE``),
            so on PostgreSQL it need not wait for other writers (see
            :meth:`console.postgres.PgConnection.begin_write`).
    """
    db.begin_write(row_locks)


class RequestPool:
    """The app's PostgreSQL pool for request handlers, opened on first use.

    Args:
        url: The database.
        busy_timeout_s: Lock wait, and the longest wait for a free connection.
        max_size: Connections held at most (one per gunicorn thread is enough).
    """

    def __init__(self, url: str, busy_timeout_s: float, max_size: int) -> None:
        self._args = (url, busy_timeout_s, max_size)
        self._pool = None
        self._lock = threading.Lock()

    def connection(self) -> postgres.PgConnection:
        """A borrowed connection; closing it gives it back."""
        with self._lock:
            if self._pool is None:
                self._pool = postgres.open_pool(*self._args)
        return postgres.borrow(self._pool)

    def close(self) -> None:
        """Close every pooled connection (the app is shutting down)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def get_db() -> Connection:
    """This request's connection, opened on first use and closed by :func:`close_db`."""
    if "db" not in g:
        config = current_app.config
        pool = current_app.extensions.get(POOL_KEY)
        if pool is not None:
            g.db = pool.connection()
        else:
            g.db = connect(config["DATABASE"], float(config["DATABASE_BUSY_TIMEOUT_S"]))
    return g.db


def close_db(_error: BaseException | None = None) -> None:
    """Close the request's connection (back to the pool), if one was opened."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def _statements(schema: str, engine: str) -> list[str]:
    """``schema``'s statements in the engine's DDL: the one place the two dialects differ.

    PostgreSQL's ``REAL`` is 4 bytes, which would round epoch timestamps to
    minutes, so SQLite's ``REAL`` becomes ``DOUBLE PRECISION``; an
    ``INTEGER PRIMARY KEY`` (SQLite's rowid) becomes an identity column.
    """
    if engine == "postgresql":
        for sqlite_type, pg_type in (
            (r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
            (r"\bINTEGER\b", "BIGINT"),
            (r"\bREAL\b", "DOUBLE PRECISION"),
            (r"\bBLOB\b", "BYTEA"),
        ):
            schema = re.sub(sqlite_type, pg_type, schema)
    return [s.strip() for s in schema.split(";") if s.strip()]


def _baseline(db: Connection) -> None:
    """Version 1: every table of the last release before versions, old SQLite files upgraded."""
    for statement in _statements(SCHEMA, db.engine):
        db.execute(statement)
    if db.engine == "sqlite":
        _add_missing_columns(db)
    _index_sop_instances(db)


def _claim_owners(db: Connection) -> None:
    """Version 2: a claim names its node and carries a token that fences its result.

    With several nodes a starting one takes back only its own old claims (and
    expired ones), and a worker whose lease ran out cannot overwrite the
    result of the node that took the slice over (see :mod:`console.queue`).
    """
    for statement in _statements(_CLAIM_COLUMNS, db.engine):
        db.execute(statement)


_CLAIM_COLUMNS = """
ALTER TABLE slices ADD COLUMN claimed_by TEXT;
ALTER TABLE slices ADD COLUMN claim_token TEXT
"""


def _stage_times(db: Connection) -> None:
    """Version 3: when a slice's batch was prepared and inferred, and its wait in between.

    The worker decodes the next batch while the classifier computes the current
    one, so the stages of a series overlap; these times draw its timeline.
    """
    for statement in _statements(_STAGE_TIME_COLUMNS, db.engine):
        db.execute(statement)


_STAGE_TIME_COLUMNS = """
ALTER TABLE slices ADD COLUMN prepared_at REAL;
ALTER TABLE slices ADD COLUMN handoff_ms REAL;
ALTER TABLE slices ADD COLUMN inferred_at REAL
"""


def _refined_probabilities(db: Connection) -> None:
    """Version 4: each slice's probability as the series model refined it, for the study page."""
    for statement in _statements(
        "ALTER TABLE slices ADD COLUMN refined_probability REAL", db.engine
    ):
        db.execute(statement)


#: Schema steps in order: a database at version ``n`` has run the first ``n``.
_MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _baseline,
    _claim_owners,
    _stage_times,
    _refined_probabilities,
)
#: The version :func:`init_db` brings every database to.
SCHEMA_VERSION = len(_MIGRATIONS)


def init_db(database: str | Path) -> None:
    """Create the schema, or upgrade it to :data:`SCHEMA_VERSION` (idempotent).

    Safe on a live database and with several nodes starting together: the
    upgrade runs in one write transaction (SQLite's ``BEGIN IMMEDIATE``,
    PostgreSQL's writer lock, and both engines' DDL is transactional), so each
    step runs once and a failed one leaves the database as it was.

    Args:
        database: A SQLite file or a PostgreSQL URL.

    Raises:
        RuntimeError: the database is at a newer version than this release knows.
    """
    db = connect(database)
    try:
        with db:
            begin_write(db)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            before = 0 if row is None else row["version"]
            if before > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the database is at schema version {before}, newer than this "
                    f"release's {SCHEMA_VERSION}: run the newer release"
                )
            for migration in _MIGRATIONS[before:]:
                migration(db)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    finally:
        db.close()


def _add_missing_columns(db: Connection) -> None:
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


def _index_sop_instances(db: Connection) -> None:
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
    db: Connection,
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
    """Create the console's tables, or upgrade them to the current version (data is kept)."""
    init_db(current_app.config["DATABASE"])
    click.echo(
        f"initialized the database at {_shown(current_app)} (schema version {SCHEMA_VERSION})"
    )


def _shown(app: Flask) -> str:
    """The database for messages: the file, or the URL without its password."""
    database = str(app.config["DATABASE"])
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", database)


def init_app(app: Flask) -> None:
    """Register connection teardown, the ``init-db`` command and, on PostgreSQL, the pool."""
    config = app.config
    if is_postgresql(config["DATABASE"]):
        app.extensions[POOL_KEY] = RequestPool(
            str(config["DATABASE"]),
            float(config["DATABASE_BUSY_TIMEOUT_S"]),
            int(config["DATABASE_POOL_SIZE"]),
        )
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
