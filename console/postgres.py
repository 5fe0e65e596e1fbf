"""PostgreSQL behind the sqlite3 interface the console's modules use (psycopg 3).

Every query in the console is written once, with ``?`` placeholders, and run
through ``db.execute(sql, params)``. :class:`PgConnection` offers that same
subset of :class:`sqlite3.Connection` over a psycopg connection, so the modules
do not care which engine they talk to: ``?`` becomes ``%s``, rows work by name
and by index (and ``dict(row)``), ``with db:`` is one transaction, and
:meth:`PgConnection.begin_write` is the counterpart of ``BEGIN IMMEDIATE``.
:class:`Listener` carries events between nodes with LISTEN/NOTIFY.

    db = connect("postgresql://hemotriage@db/hemotriage", busy_timeout_s=10)
    with db:
        db.begin_write()
        db.execute("UPDATE slices SET status = ? WHERE id = ?", ("queued", 7))
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.types.numeric import FloatLoader
from psycopg_pool import ConnectionPool

logger = logging.getLogger(__name__)

#: Errors of the engine, as ``sqlite3.Error`` is SQLite's.
Error = psycopg.Error
#: The key of the transaction-scoped advisory lock every writer takes (see :meth:`begin_write`).
_WRITE_LOCK_KEY = 0x48454D4F  # "HEMO"
#: NOTIFY refuses payloads of 8000 bytes or more (https://www.postgresql.org/docs/15/sql-notify.html).
MAX_NOTIFY_BYTES = 7999
#: A string literal (its ``?`` is not a placeholder) or a character psycopg would read.
_SQL_TOKENS = re.compile(r"'(?:[^']|'')*'|\?|%")


def translate(sql: str) -> str:
    """The sqlite3-style query in psycopg's style: ``?`` to ``%s``, a literal ``%`` doubled."""

    def replace(match: re.Match) -> str:
        token = match.group()
        if token == "?":
            return "%s"
        return token.replace("%", "%%")

    return _SQL_TOKENS.sub(replace, sql)


class Row(Sequence):
    """One result row, by column name or index, like :class:`sqlite3.Row`."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence, index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and self._values == other._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))!r})"

    def keys(self) -> list[str]:
        """Column names, in order (``dict(row)`` uses them)."""
        return list(self._index)


def _row_factory(cursor: psycopg.Cursor) -> Callable[[Sequence], Row]:
    names = [column.name for column in cursor.description or ()]
    index = {name: i for i, name in enumerate(names)}
    return lambda values: Row(values, index)


class Cursor:
    """The result of one :meth:`PgConnection.execute`: fetch, iterate, ``rowcount``."""

    def __init__(self, cursor: psycopg.Cursor) -> None:
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Row | None:
        """The next row, or None."""
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[Row]:
        """Every remaining row."""
        return self._cursor.fetchall() if self._cursor.description else []

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class PgConnection:
    """A psycopg connection with the console's sqlite3 subset; see the module docstring.

    The connection runs in autocommit: a statement outside ``with db:`` commits
    by itself (as a read outside a transaction does on SQLite), and ``with db:``
    opens a transaction that commits on success and rolls back on an exception.

    Args:
        connection: An open psycopg connection in autocommit mode.
        release: Called instead of closing it (a pool's ``putconn``); None closes it.
    """

    engine = "postgresql"

    def __init__(
        self,
        connection: psycopg.Connection,
        release: Callable[[psycopg.Connection], None] | None = None,
    ) -> None:
        self._connection = connection
        self._release = release

    def execute(self, sql: str, params: Sequence | None = ()) -> Cursor:
        """Run one statement with ``?`` placeholders."""
        cursor = self._connection.cursor(row_factory=_row_factory)
        cursor.execute(translate(sql), tuple(params or ()))
        return Cursor(cursor)

    def executemany(self, sql: str, seq_of_params: Sequence[Sequence]) -> Cursor:
        """Run one statement once per parameter tuple."""
        cursor = self._connection.cursor(row_factory=_row_factory)
        cursor.executemany(translate(sql), [tuple(p) for p in seq_of_params])
        return Cursor(cursor)

    @property
    def broken(self) -> bool:
        """The server or the network dropped the connection: open a new one."""
        return self._connection.broken or self._connection.closed

    @property
    def in_transaction(self) -> bool:
        """A transaction is open (as :attr:`sqlite3.Connection.in_transaction`)."""
        return self._connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def begin_write(self, row_locks: bool = False) -> None:
        """Start the write transaction, as ``BEGIN IMMEDIATE`` does on SQLite.

        Writers take one transaction-scoped advisory lock, so every
        read-then-write the console does (counting failed logins, deciding a
        study from its slices) sees no other writer in between, exactly as under
        SQLite's single write lock; ``lock_timeout`` bounds the wait as SQLite's
        busy timeout does. A writer that locks its own rows (the queue's claim,
        ``FOR UPDATE SKIP LOCKED``) passes ``row_locks`` and skips it, so nodes
        claim work concurrently.
        """
        if not self.in_transaction:
            self._connection.execute("BEGIN")
        if not row_locks:
            self._connection.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))

    def commit(self) -> None:
        """Commit the open transaction, if any."""
        if self.in_transaction:
            self._connection.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back the open transaction, if any."""
        if self.in_transaction:
            self._connection.execute("ROLLBACK")

    def notify(self, channel: str, payload: dict) -> None:
        """Send ``payload`` (JSON) to every listener of ``channel``, once this transaction commits.

        Raises:
            ValueError: the JSON is too long for NOTIFY.
        """
        text = json.dumps(payload, separators=(",", ":"))
        if len(text.encode()) > MAX_NOTIFY_BYTES:
            raise ValueError(f"event payload of {len(text.encode())} bytes is too long for NOTIFY")
        self._connection.execute("SELECT pg_notify(%s, %s)", (channel, text))

    def close(self) -> None:
        """Roll back what is open, then close the connection (or give it back to its pool)."""
        if self._connection.closed:
            return
        if self._release is None:
            self._connection.close()
            return
        if not self._connection.broken:
            self.rollback()
        self._release(self._connection)

    def __enter__(self) -> PgConnection:
        if not self.in_transaction:
            self._connection.execute("BEGIN")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._connection.broken:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _configure(connection: psycopg.Connection, busy_timeout_s: float) -> None:
    """Autocommit, numerics as floats (``AVG``), the busy timeout as ``lock_timeout``."""
    connection.autocommit = True
    connection.adapters.register_loader("numeric", FloatLoader)
    connection.execute(f"SET lock_timeout = {int(busy_timeout_s * 1000)}")


def connect(url: str, busy_timeout_s: float) -> PgConnection:
    """A dedicated connection (background threads, commands).

    Args:
        url: ``postgresql://user@host:port/database`` (libpq's URI form).
        busy_timeout_s: How long a write waits for another writer's lock.
    """
    connection = psycopg.connect(url, connect_timeout=max(1, int(busy_timeout_s)))
    _configure(connection, busy_timeout_s)
    return PgConnection(connection)


def open_pool(url: str, busy_timeout_s: float, max_size: int) -> ConnectionPool:
    """The connection pool request handlers borrow from (see :func:`borrow`)."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        configure=lambda connection: _configure(connection, busy_timeout_s),
        timeout=busy_timeout_s,
        name="hemotriage",
        open=True,
    )


def borrow(pool: ConnectionPool) -> PgConnection:
    """A pooled connection; its :meth:`~PgConnection.close` gives it back."""
    return PgConnection(pool.getconn(), release=pool.putconn)


class Listener:
    """One LISTEN connection per process: hands every NOTIFY on ``channel`` to ``deliver``.

    It runs in a daemon thread with its own connection, and reconnects (with
    a growing pause, up to 5 s) when the connection drops; events sent while
    it was away are lost, and the screens redraw on the next one.

    Args:
        url: The database.
        channel: The NOTIFY channel.
        deliver: Called with the decoded JSON payload of each notification.
    """

    def __init__(self, url: str, channel: str, deliver: Callable[[Any], None]) -> None:
        self._url = url
        self._channel = channel
        self._deliver = deliver
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start listening (once) and wait until LISTEN is in place, so no event is missed.

        Raises:
            TimeoutError: the database did not take the LISTEN within ``timeout_s``.
        """
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hemotriage-listen", daemon=True
                )
                self._thread.start()
        if not self._listening.wait(timeout_s):
            raise TimeoutError(f"LISTEN {self._channel} not in place after {timeout_s} s")

    def stop(self) -> None:
        """Stop the thread (within about a second)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        pause_s = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f'LISTEN "{self._channel}"')
                    self._listening.set()
                    pause_s = 0.1
                    while not self._stop.is_set():
                        for notify in connection.notifies(timeout=1.0):
                            self._deliver(json.loads(notify.payload))
            except psycopg.Error as e:
                logger.warning("event listener lost the database (%s); reconnecting", e)
                self._stop.wait(pause_s)
                pause_s = min(pause_s * 2, 5.0)
