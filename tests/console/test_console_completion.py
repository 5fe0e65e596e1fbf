"""Series completion: final after the quiet period, durable across a restart, re-decided on growth.

Real parts: the DICOM receiver on a free port, pynetdicom as the scanner, the
in-process classifier, SQLite. No destination here (results are the PACS tests').
"""

import pytest

from build_engines.serve import free_ports
from console.db import connect, init_db
from console.services import EXTENSION_KEY
from tests.console.conftest import SCANNER, c_store, sqlite_only, wait_for

QUIET_S = 1.0


def _send(port: int, files: list[bytes]) -> None:
    assert [s.Status for s in c_store(port, files)] == [0x0000] * len(files)


@pytest.fixture
def console(app_factory, storage):
    """A console on `storage` with its receiver listening; quiet period 1 s.

    The tests start the worker and the results thread (``services.start()``) once a
    series is sent, so a slow machine pausing between two C-STOREs for longer than
    the quiet period cannot split a series into two versions.
    """

    def build():
        app = app_factory(
            storage, DICOM_PORT=free_ports(1)[0], DICOM_ALLOWED_AES=SCANNER, DICOM_QUIET_S=QUIET_S
        )
        services = app.extensions[EXTENSION_KEY]
        services.dicom.start()
        return services

    return build


def _study(db_rows):
    (study,) = db_rows("SELECT * FROM studies")
    return study


def test_series_is_completed_after_the_quiet_period_once(console, phantom_series, db_rows):
    services = console()
    _send(services.dicom.settings.port, phantom_series(3))
    services.start()
    assert wait_for(lambda: _study(db_rows)["completed_at"] is not None, timeout_s=60)
    study = _study(db_rows)
    assert study["status"] in ("flagged", "negative")
    assert (study["completed_slices"], study["result_version"]) == (3, 1)
    # Completed no earlier than the quiet period after its last slice was queued.
    (last,) = db_rows("SELECT MAX(queued_at) AS at FROM slices")
    assert study["completed_at"] - last["at"] >= QUIET_S
    assert db_rows("SELECT * FROM outbox") == []  # no destination: nothing to send
    assert services.thread_probes()["results"]()


def test_a_series_that_grows_after_completion_is_decided_again_as_version_2(
    console, phantom_series, db_rows
):
    services = console()
    files = phantom_series(4)
    _send(services.dicom.settings.port, files[:2])
    services.start()
    assert wait_for(lambda: _study(db_rows)["result_version"] == 1, timeout_s=60)
    services.results.stop()  # the late instances arrive together, as in the first test
    _send(services.dicom.settings.port, files[2:])
    services.results.start()
    assert wait_for(lambda: _study(db_rows)["result_version"] == 2, timeout_s=60)
    study = _study(db_rows)
    assert study["completed_slices"] == 4
    assert {r["status"] for r in db_rows("SELECT status FROM slices")} == {"classified"}


def test_completion_survives_a_restart_before_the_quiet_period_ends(
    app_factory, storage, console, phantom_series, db_rows
):
    first = app_factory(
        storage, DICOM_PORT=free_ports(1)[0], DICOM_ALLOWED_AES=SCANNER, DICOM_QUIET_S=3600.0
    ).extensions[EXTENSION_KEY]
    first.dicom.start()
    _send(first.dicom.settings.port, phantom_series(2))
    first.stop()  # stopped with the series received, unclassified and not complete
    assert _study(db_rows)["completed_at"] is None
    console().start()  # the restarted console: same storage, quiet period 1 s
    assert wait_for(lambda: _study(db_rows)["result_version"] == 1, timeout_s=60)


@sqlite_only("upgrades a SQLite file made by a release before schema versions")
def test_upgrading_an_older_database_completes_its_studies_without_sending_them(tmp_path):
    path = tmp_path / "old.sqlite"
    old = connect(path)
    old.executescript(
        "CREATE TABLE studies (id INTEGER PRIMARY KEY, study_key TEXT NOT NULL UNIQUE, "
        "label TEXT NOT NULL, study_uid TEXT, series_uid TEXT, source TEXT NOT NULL, "
        "priority INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'queued', score REAL, "
        "threshold REAL, key_slice_id INTEGER, model_name TEXT, model_version TEXT, "
        "received_at REAL NOT NULL, finished_at REAL, flagged_at REAL, acknowledged_at REAL, "
        "acknowledged_by TEXT, updated_at REAL NOT NULL);"
        "INSERT INTO studies (study_key, label, source, priority, status, received_at, "
        "updated_at) VALUES ('k', 'CT', 'dicom', 2, 'negative', 1.0, 2.0);"
    )
    old.close()
    init_db(path)
    db = connect(path)
    (study,) = db.execute("SELECT * FROM studies").fetchall()
    assert (study["completed_at"], study["completed_slices"], study["result_version"]) == (
        2.0,
        0,
        0,
    )
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    db.close()
