"""Which engine the console suite runs on, and each test console's database.

Test modules import ``tests.console.conftest`` while pytest loads the same file
as ``conftest``: two copies. The state both must share lives here, imported
once under one name.
"""

import os
from pathlib import Path

#: HEMOTRIAGE_TEST_DATABASE=postgresql runs the console suite on a throwaway PostgreSQL
#: cluster (make test runs it on SQLite, then on PostgreSQL); anything else: SQLite.
ON_POSTGRES = os.environ.get("HEMOTRIAGE_TEST_DATABASE", "sqlite") == "postgresql"
#: The session's cluster (benchmarks.postgres.Postgres), on the PostgreSQL run.
CLUSTERS: list = []
#: Each storage folder's database in it: a restarted console finds the same one.
_DATABASES: dict[Path, str] = {}


def database_settings(storage: Path) -> dict[str, str]:
    """The database setting of a console on ``storage`` (none on SQLite: its file there)."""
    if not ON_POSTGRES:
        return {}
    if storage not in _DATABASES:
        _DATABASES[storage] = CLUSTERS[0].create_database()
    return {"DATABASE_URL": _DATABASES[storage]}


def database_of(storage: Path) -> str:
    """What ``connect`` opens for a console on ``storage`` (its URL, or its SQLite file)."""
    return database_settings(storage).get("DATABASE_URL", str(storage / "hemotriage.sqlite"))
