"""A real PostgreSQL for tests and benchmarks: Debian's server in a temporary cluster.

``initdb`` makes a cluster in a folder of its own and ``pg_ctl`` starts it on a
free loopback port with its socket in that folder (never the system service);
:meth:`Postgres.stop` shuts it down and removes the folder. Databases are made
on demand, one per console under test. ``initdb`` and ``postgres`` refuse to
run as root, so as root they run as Debian's ``postgres`` user on a folder it
owns. ``make postgres`` installs the package (``apt-get install postgresql``).

    with Postgres() as server:
        url = server.create_database()     # postgresql://hemotriage@127.0.0.1:PORT/db_1
        create_app({"DATABASE_URL": url})
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from build_engines.serve import free_ports

#: The cluster's superuser (trust authentication on loopback: a throwaway test cluster).
USER = "hemotriage"
#: Debian's system user that owns clusters when we run as root.
_SYSTEM_USER = "postgres"
_START_TIMEOUT_S = 60


class PostgresError(RuntimeError):
    """PostgreSQL is not installed, or the cluster did not start."""


def bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them out of PATH).

    Raises:
        PostgresError: no PostgreSQL server is installed.
    """
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not candidates:
        raise PostgresError("PostgreSQL is not installed: run 'make postgres' (apt-get)")
    return Path(candidates[-1]).parent


class Postgres:
    """One throwaway PostgreSQL cluster on a free port.

    Args:
        max_connections: Connections the server allows (each console under test holds a few).

    Attributes:
        port: The TCP port on 127.0.0.1.
        folder: The cluster, its socket and its log (removed by :meth:`stop`).
    """

    def __init__(self, max_connections: int = 400) -> None:
        self._bin = bindir()
        (self.port,) = free_ports(1)
        self.folder = Path(tempfile.mkdtemp(prefix="hemotriage-pg-"))
        self._data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._max_connections = max_connections
        self._names = itertools.count(1)
        self._started = False

    def url(self, database: str = "postgres") -> str:
        """The libpq URL of one of the cluster's databases."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> Postgres:
        """``initdb`` and ``pg_ctl start``; waits until the server takes connections.

        The cluster trades durability for speed (``fsync=off``): it is thrown away.

        Raises:
            PostgresError: initdb or the server failed (log tail included).
        """
        if os.geteuid() == 0:
            shutil.chown(self.folder, _SYSTEM_USER, _SYSTEM_USER)
        self._run("initdb", "-D", self._data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self._max_connections} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        try:
            self._run(
                "pg_ctl", "-D", self._data, "-l", self.log, "-o", options,
                "-w", "-t", str(_START_TIMEOUT_S), "start",
            )  # fmt: skip
        except PostgresError as e:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
            raise PostgresError(f"{e}\n{log}") from e
        self._started = True
        return self

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"db_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        if self._started:
            self._started = False
            self._run("pg_ctl", "-D", self._data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self, program: str, *args) -> None:
        command = [str(self._bin / program), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", _SYSTEM_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if result.returncode != 0:
            raise PostgresError(f"{program} failed ({result.returncode}): {result.stderr[-2000:]}")
