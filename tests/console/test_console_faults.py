"""Faults lose no scan: every accepted slice ends classified, or failed with a reason.

Triton killed, the console killed, a full disk, a database locked by another
writer, a batch that fails between claim and commit, a server that answers
every request with an error: each test drives the real parts into that state
and reads the outcome from the database and the console's own reports.
"""

import contextlib
import dataclasses
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from client.classify import LocalClassifier
from client.errors import ServerUnavailableError
from client.registry import get_model
from client.series import SERIES_MODEL_RULE
from console import queue
from console.db import begin_write, connect
from console.services import EXTENSION_KEY
from console.worker import QueueWorker
from tests.console.conftest import ConsoleServer, api_client_of, sqlite_only, wait_for
from tests.console.engines import database_of


def _statuses(db_rows) -> list[str]:
    return [r["status"] for r in db_rows("SELECT status FROM slices ORDER BY id")]


def _stored_files(storage: Path) -> list[Path]:
    return [p for p in (storage / "uploads").rglob("*") if p.is_file()]


class _GatedClassifier:
    """The real in-process classifier, held inside ``predict`` until the test opens the gate."""

    def __init__(self, spec):
        self.spec = spec
        self._inner = LocalClassifier(spec)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def predict(self, batch: np.ndarray, priority: int = 2) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(120)
        return self._inner.predict(batch, priority)


class _BrokenModel:
    """The real classifier with one output broken to NaN, as a corrupt model would give."""

    def __init__(self, spec):
        self.spec = spec
        self._inner = LocalClassifier(spec)

    def predict(self, batch: np.ndarray, priority: int = 2) -> np.ndarray:
        out = self._inner.predict(batch, priority)
        out[0] = np.nan
        return out


class _LockProbingSeriesModel:
    """The real in-process classifier; each series-model call tries to write from elsewhere.

    ``down``: the series model is unreachable (a Triton without it, or down).
    """

    def __init__(self, spec, database: Path, down: bool):
        self.spec = spec
        self._inner = LocalClassifier(spec)
        self._database = database
        self._down = down
        self.calls = 0
        self.calls_while_the_database_was_locked = 0

    def predict(self, batch: np.ndarray, priority: int = 2) -> np.ndarray:
        return self._inner.predict(batch, priority)

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        self.calls += 1
        probe = sqlite3.connect(self._database, timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")  # what an upload does
            probe.rollback()
        except sqlite3.OperationalError:
            self.calls_while_the_database_was_locked += 1
        finally:
            probe.close()
        if self._down:
            raise ServerUnavailableError(f"{self.spec.series_model_name}: connection refused")
        return self._inner.refine_series(features)


def _worker(services, classifier) -> QueueWorker:
    return QueueWorker(services.worker.settings, services.broker, services.metrics, classifier)


def test_batch_that_fails_between_claim_and_commit_goes_back_and_finishes_once(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    app = app_factory(
        storage, DATABASE_BUSY_TIMEOUT_S=0.2, CLAIM_LEASE_S=1.0, LEASE_CHECK_S=0.1, INBOX_DIR=""
    )
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)
    accepted = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    assert accepted.status_code == 201
    gated = _GatedClassifier(services.spec)
    worker = _worker(services, lambda settings: gated)
    worker.start()
    locker = connect(app.config["DATABASE"])
    try:
        assert gated.entered.wait(60)  # the batch is claimed and inside predict
        begin_write(locker)  # another writer takes the database
        gated.gate.set()
        assert wait_for(lambda: "lock" in worker.state.last_error, timeout_s=30)
        assert set(_statuses(db_rows)) == {"processing"}  # held, not lost, not failed
        locker.rollback()
        assert wait_for(lambda: set(_statuses(db_rows)) == {"classified"}, timeout_s=60)
    finally:
        gated.gate.set()
        locker.close()
        worker.stop()
    rows = db_rows("SELECT attempts, probability FROM slices")
    assert [r["attempts"] for r in rows] == [2, 2, 2]  # the expired lease re-queued them once
    assert all(np.isfinite(r["probability"]) for r in rows)
    (study,) = db_rows("SELECT status FROM studies")
    assert study["status"] in ("flagged", "negative")


def test_expired_claim_is_taken_back_by_the_lease_timer(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    app = app_factory(storage, CLAIM_LEASE_S=0.5, LEASE_CHECK_S=0.1, INBOX_DIR="")
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)
    upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    services.start()
    assert wait_for(lambda: set(_statuses(db_rows)) == {"classified"})
    # Two slices claimed by a worker that then hung (another node, a stuck thread).
    db = connect(app.config["DATABASE"])
    with db:
        db.execute(
            "UPDATE slices SET status = 'processing', started_at = ?, probability = NULL "
            "WHERE id IN (1, 2)",
            (time.time(),),
        )
    db.close()
    assert wait_for(lambda: set(_statuses(db_rows)) == {"classified"}, timeout_s=30)
    assert [r["attempts"] for r in db_rows("SELECT attempts FROM slices ORDER BY id")] == [2, 2, 1]


def test_slice_claimed_by_every_crashed_run_fails_after_the_cap_with_its_reason(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    app = app_factory(storage, MAX_INFERENCE_ATTEMPTS=3, INBOX_DIR="")
    client = api_client_of(app, token_for)
    upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(2))])
    db = connect(app.config["DATABASE"])
    for _ in range(2):  # two runs that each died holding the first slice
        with db:
            queue.claim(db, 1, app.config["NODE_ID"])
            db.execute("UPDATE slices SET status = 'queued' WHERE id = 1 AND status = 'processing'")
    with db:
        queue.claim(db, 1, app.config["NODE_ID"])  # a third run died too: claimed three times
    db.close()
    restarted = app_factory(storage, MAX_INFERENCE_ATTEMPTS=3, INBOX_DIR="")
    restarted.extensions[EXTENSION_KEY].start()
    assert wait_for(lambda: _statuses(db_rows) == ["failed", "classified"])
    (failed,) = db_rows("SELECT error FROM slices WHERE status = 'failed'")
    assert "claimed 3 times without a result" in failed["error"]
    (study,) = db_rows("SELECT status FROM studies")
    assert study["status"] in ("flagged", "negative")  # scored on the slice that worked


def test_non_finite_probability_fails_the_slice_instead_of_counting_as_negative(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    app = app_factory(storage, INBOX_DIR="")
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)
    upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    broken = _BrokenModel(services.spec)
    worker = _worker(services, lambda settings: broken)
    while worker.run_once():
        pass
    worker.stop()
    rows = db_rows("SELECT status, probability, error FROM slices ORDER BY id")
    assert [r["status"] for r in rows] == ["failed", "classified", "classified"]
    assert "non-finite probability" in rows[0]["error"]
    assert rows[0]["probability"] is None


@sqlite_only("SQLite's one write lock; PostgreSQL's worker runs the same code")
@pytest.mark.parametrize("down", [False, True], ids=["series-model-up", "series-model-down"])
def test_the_series_model_is_asked_while_uploads_can_still_write(
    app_factory, storage, token_for, upload, cq500_series, db_rows, down
):
    """A Triton call, and its retries while the server is down, never holds the database."""
    spec = get_model("resnet18", SERIES_MODEL_RULE)
    app = app_factory(storage, MODEL_NAME=spec.name, SERIES_RULE=SERIES_MODEL_RULE, INBOX_DIR="")
    services = app.extensions[EXTENSION_KEY]
    upload(api_client_of(app, token_for), [(p.name, p.read_bytes()) for p in cq500_series[:4]])
    model = _LockProbingSeriesModel(spec, app.config["DATABASE"], down)
    worker = _worker(services, lambda settings: model)
    while worker.run_once():
        pass
    worker.stop()
    assert model.calls >= 1
    assert model.calls_while_the_database_was_locked == 0
    (study,) = db_rows("SELECT status, threshold FROM studies")
    assert study["status"] in ("flagged", "negative")
    # Down: decided at once by the fallback (the slice threshold), as the log says.
    assert study["threshold"] == (spec.threshold if down else spec.series_threshold)
    refined = [r["refined_probability"] for r in db_rows("SELECT * FROM slices")]
    assert (None in refined) == down


def test_upload_while_another_writer_locks_the_database_gets_503_and_stores_nothing(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    app = app_factory(storage, DATABASE_BUSY_TIMEOUT_S=0.2, INBOX_DIR="")
    client = api_client_of(app, token_for)
    locker = connect(app.config["DATABASE"])
    begin_write(locker)
    try:
        refused = upload(client, [("a.dcm", phantom_series(1)[0])])
    finally:
        locker.rollback()
        locker.close()
    assert refused.status_code == 503
    assert refused.get_json()["error"] == "StorageBusyError"
    assert db_rows("SELECT * FROM slices") == [] and _stored_files(storage) == []
    assert upload(client, [("a.dcm", phantom_series(1)[0])]).status_code == 201


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB filesystem (tmpfs) to fill up; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write until the filesystem is full; return the filler file."""
    filler = disk / "filler"
    for chunk in (1024 * 1024, 4096, 1):
        with contextlib.suppress(OSError), filler.open("ab", buffering=0) as out:
            while True:
                out.write(b"\0" * chunk)
    return filler


def test_full_disk_refuses_uploads_with_507_and_loses_no_accepted_slice(
    app_factory, small_disk, token_for, upload, phantom_series
):
    storage = small_disk / "storage"
    app = app_factory(storage, INBOX_DIR="", BACKOFF_MAX_S=0.2)
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)

    def db_rows(sql: str) -> list:
        db = connect(app.config["DATABASE"])
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    first = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    assert first.status_code == 201
    files_before = _stored_files(storage)
    filler = _fill(small_disk)
    refused = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    assert refused.status_code == 507, refused.get_data(as_text=True)
    assert refused.get_json()["error"] == "StorageFullError"
    assert _stored_files(storage) == files_before  # nothing half-written is left
    services.start()  # the worker runs on a full disk: it may fail rounds, never lose slices
    filler.unlink()
    assert wait_for(lambda: _statuses(db_rows) == ["classified"] * 3)
    again = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(2))])
    assert again.status_code == 201
    assert wait_for(lambda: _statuses(db_rows) == ["classified"] * 5)


@pytest.mark.integration
def test_triton_killed_with_work_queued_loses_nothing_and_uses_no_attempts(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    from build_engines.serve import EmbeddedTriton, ServeSettings, missing_model_files

    settings = ServeSettings.from_env(models=("mobilenet_v2",)).with_free_ports()
    if missing_model_files(settings):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    app = app_factory(
        storage,
        CLASSIFIER="triton",
        TRITON_URL=settings.grpc_url,
        TRITON_TIMEOUT_S=5.0,
        BATCH_SIZE=2,
        INBOX_DIR="",
    )
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)
    server = EmbeddedTriton(settings).start()
    try:
        services.start()
        upload(client, [(f"a{i}.dcm", d) for i, d in enumerate(phantom_series(4))])
        assert wait_for(lambda: _statuses(db_rows) == ["classified"] * 4)
        server.kill()
        upload(client, [(f"b{i}.dcm", d) for i, d in enumerate(phantom_series(4))])
        assert wait_for(lambda: services.worker.state.backoff_s > 0, timeout_s=60)
        assert client.get("/readyz").status_code == 503
        assert set(_statuses(db_rows)[4:]) <= {"queued", "processing"}
        server = EmbeddedTriton(settings).start()  # the same ports, as a restart would
        assert wait_for(lambda: _statuses(db_rows) == ["classified"] * 8)
    finally:
        services.stop()
        server.stop()
    attempts = [r["attempts"] for r in db_rows("SELECT attempts FROM slices ORDER BY id")]
    assert attempts == [1] * 8  # the outage used no attempt: nothing can fail for it


@pytest.mark.integration
def test_server_error_answers_fail_the_batch_after_the_cap_and_the_queue_flows_on(
    triton_server, app_factory, storage, token_for, upload, phantom_series, db_rows
):
    """A client whose batches Triton always refuses (bigger than the model's max batch size)."""
    from client.triton_client import TritonClassifier

    served = get_model("mobilenet_v2")
    oversized = dataclasses.replace(served, max_batch_size=4 * served.max_batch_size)
    batch = served.max_batch_size + 8
    app = app_factory(
        storage,
        CLASSIFIER="triton",
        TRITON_URL=triton_server.grpc_url,
        BATCH_SIZE=batch,
        MAX_INFERENCE_ATTEMPTS=2,
        INBOX_DIR="",
    )
    services = app.extensions[EXTENSION_KEY]
    client = api_client_of(app, token_for)
    big = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(batch, size=128))])
    small = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3, size=128))])
    assert big.status_code == small.status_code == 201
    worker = _worker(
        services, lambda settings: TritonClassifier(oversized, triton_server.grpc_url, "grpc")
    )
    worker.start()
    try:
        # The small study flows on while the big batch is retried (the worker prepares the
        # next batch while one is in the server, so their order is not fixed).
        assert wait_for(lambda: set(_statuses(db_rows)) <= {"classified", "failed"}, timeout_s=60)
    finally:
        worker.stop()
    statuses = _statuses(db_rows)
    assert statuses == ["failed"] * batch + ["classified"] * 3
    (error,) = {r["error"] for r in db_rows("SELECT error FROM slices WHERE status = 'failed'")}
    assert error.startswith("gave up after 2 attempts; last: InferenceFailedError")
    assert "batch-size must be <=" in error or "batch size" in error
    assert "InferenceFailedError" in worker.state.last_error


def _http_upload(server, token: str, files: list[tuple[str, bytes]]) -> dict:
    import json

    import urllib3

    body, content_type = urllib3.encode_multipart_formdata(
        [("files", (name, data, "application/dicom")) for name, data in files]
    )
    request = urllib.request.Request(
        server.url + "/api/scans",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 201
        return json.loads(response.read())


def _classified(database: str) -> int:
    db = connect(database)
    try:
        return db.execute("SELECT COUNT(*) FROM slices WHERE status = 'classified'").fetchone()[0]
    finally:
        db.close()


def test_console_killed_mid_queue_finishes_every_accepted_slice_after_restart(
    tmp_path, phantom_series
):
    storage = tmp_path / "storage"
    database = database_of(storage)
    server = ConsoleServer(storage).start()
    accepted: list[int] = []
    try:
        token = server.token()
        for series in range(3):
            files = [(f"{series}-{i}.dcm", d) for i, d in enumerate(phantom_series(32))]
            accepted += _http_upload(server, token, files)["slice_ids"]
        assert wait_for(lambda: _classified(database) > 0, timeout_s=120)
        server.kill()
        done_at_kill = _classified(database)
    finally:
        server.stop()
    assert done_at_kill < len(accepted), "the queue finished before the kill; nothing tested"
    restarted = ConsoleServer(storage).start()
    try:
        assert wait_for(lambda: _classified(database) == len(accepted), timeout_s=180)
    finally:
        restarted.stop()
    db = connect(database)
    try:
        rows = db.execute("SELECT id, status, attempts FROM slices ORDER BY id").fetchall()
    finally:
        db.close()
    assert [r["id"] for r in rows] == sorted(accepted)  # every accepted slice, no other
    assert {r["status"] for r in rows} == {"classified"}
    assert max(r["attempts"] for r in rows) <= 2


@sqlite_only("SQLite's own lock and error codes (PostgreSQL's: test_console_nodes.py)")
def test_only_disk_and_lock_failures_are_told_to_send_again(tmp_path):
    from console.errors import StorageBusyError, storage_error

    first, second = connect(tmp_path / "a.sqlite", 0.1), connect(tmp_path / "a.sqlite", 0.1)
    first.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        second.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as bad_sql:
        second.execute("SELECT no_such_column FROM slices")
    first.rollback()
    assert isinstance(storage_error(locked.value, tmp_path), StorageBusyError)
    assert storage_error(bad_sql.value, tmp_path) is None  # a bug stays a 500, never "retry"
