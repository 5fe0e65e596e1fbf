"""Several console nodes on one database: claims, leases, fenced results and live events.

Fenced results are tested on both engines; several nodes need PostgreSQL (the
suite's PostgreSQL run, ``HEMOTRIAGE_TEST_DATABASE=postgresql``, which
``make test`` runs).
"""

import threading
import time

import psycopg
import pytest

from console import queue
from console.db import begin_write, connect
from console.errors import StorageBusyError, storage_error
from console.services import EXTENSION_KEY
from tests.console.conftest import ON_POSTGRES, wait_for

postgres_only = pytest.mark.skipif(
    not ON_POSTGRES, reason="needs PostgreSQL: run with HEMOTRIAGE_TEST_DATABASE=postgresql"
)
_TIMINGS = queue.SliceTimings(1.0, 1.0, 1.0, 1.0)


def _node(app_factory, storage, node_id: str, **overrides):
    """Another console node: the same database and stored files (a shared file system)."""
    return app_factory(storage, NODE_ID=node_id, **overrides)


def _claim(app, batch_size: int, node: str) -> list:
    db = connect(app.config["DATABASE"])
    try:
        with db:
            begin_write(db, row_locks=True)
            return queue.claim(db, batch_size, node)
    finally:
        db.close()


def _statuses(db_rows) -> list[str]:
    return [r["status"] for r in db_rows("SELECT status FROM slices ORDER BY id")]


@postgres_only
def test_two_nodes_claiming_at_once_get_disjoint_batches_without_waiting(
    app, api, upload, phantom_series
):
    upload(api, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(6))])
    first = connect(app.config["DATABASE"])
    try:
        with first:
            begin_write(first, row_locks=True)
            held = queue.claim(first, 3, "node-a")  # node A's transaction stays open...
            other: list = []
            second = threading.Thread(target=lambda: other.extend(_claim(app, 3, "node-b")))
            second.start()
            second.join(10)
            assert not second.is_alive(), "node B waited for node A's claim"  # ...SKIP LOCKED
    finally:
        first.close()
    assert len(held) == len(other) == 3
    assert not {r["id"] for r in held} & {r["id"] for r in other}
    assert {r["claimed_by"] for r in held} == {"node-a"}
    assert {r["claimed_by"] for r in other} == {"node-b"}


@postgres_only
def test_a_starting_node_leaves_live_claims_of_others_and_any_node_requeues_expired_ones(
    app, api, upload, phantom_series, app_factory, storage, drain, db_rows
):
    upload(api, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    claimed = _claim(app, 2, "node-a")  # node A took two slices, then died
    node_b = _node(app_factory, storage, "node-b", CLAIM_LEASE_S=1.0)
    worker_b = node_b.extensions[EXTENSION_KEY].worker
    assert worker_b.requeue_claims(starting=True) == 0  # A's lease still runs: not B's to take
    assert _statuses(db_rows).count("processing") == 2
    time.sleep(1.1)
    assert worker_b.requeue_claims() == 2  # expired: any node takes it back
    assert drain(node_b.extensions[EXTENSION_KEY]) == 3
    assert set(_statuses(db_rows)) == {"classified"}
    rows = db_rows("SELECT attempts, claimed_by FROM slices ORDER BY id")
    assert [r["attempts"] for r in rows] == [2, 2, 1]
    assert {r["claimed_by"] for r in rows} == {"node-b"}
    assert len(claimed) == 2


def test_a_worker_whose_lease_was_taken_back_cannot_record_its_result(
    app, api, upload, phantom_series, db_rows
):
    upload(api, [("0.dcm", phantom_series(1)[0])])
    (stale,) = _claim(app, 1, "node-a")
    db = connect(app.config["DATABASE"])
    try:
        with db:
            begin_write(db)
            queue.requeue_claims(db, max_attempts=5, claimed_before=time.time() + 1)
        (current,) = _claim(app, 1, "node-b")  # the lease ran out; node B took the slice
        assert current["id"] == stale["id"] and current["claim_token"] != stale["claim_token"]
        with db:
            begin_write(db)
            assert not queue.finish(db, stale["id"], 0.99, 1.0, _TIMINGS, stale["claim_token"])
            assert not queue.fail(db, stale["id"], "late", stale["claim_token"])
            queue.release(db, [stale["id"]], claim_token=stale["claim_token"])
            assert queue.finish(db, current["id"], 0.25, 1.0, _TIMINGS, current["claim_token"])
        with db:  # node A, later still: the slice is classified, once, by node B
            begin_write(db)
            assert not queue.finish(db, stale["id"], 0.99, 1.0, _TIMINGS, stale["claim_token"])
    finally:
        db.close()
    (row,) = db_rows("SELECT status, probability, attempts FROM slices")
    assert (row["status"], row["probability"], row["attempts"]) == ("classified", 0.25, 2)


@postgres_only
def test_a_flag_raised_by_one_nodes_worker_reaches_a_screen_on_another_node_once(
    app, api, upload, kaggle_png, app_factory, storage, drain
):
    node_b = _node(app_factory, storage, "node-b")
    broker_a = app.extensions[EXTENSION_KEY].broker
    with broker_a.subscribe() as screen_a, node_b.extensions[EXTENSION_KEY].broker.subscribe():
        study_id = upload(api, [("ich.png", kaggle_png.read_bytes())]).get_json()["study_id"]
        event, data = screen_a.get(timeout_s=10)  # the upload, published by node A itself
        assert (event, data["id"], data["status"]) == ("study", study_id, "queued")
        assert drain(node_b.extensions[EXTENSION_KEY]) == 1  # node B's worker classifies it
        event, data = screen_a.get(timeout_s=10)
        assert (event, data["id"], data["before"]) == ("study", study_id, "queued")
        assert data["status"] in ("flagged", "negative")
        assert data["alert"] is (data["status"] == "flagged")
        assert screen_a.get(timeout_s=0.5) is None  # each event once, however many nodes listen


@postgres_only
def test_a_write_that_waits_past_the_busy_timeout_is_told_to_send_again(app, tmp_path):
    holder = connect(app.config["DATABASE"])
    waiter = connect(app.config["DATABASE"], busy_timeout_s=0.1)
    try:
        begin_write(holder)
        with pytest.raises(psycopg.errors.LockNotAvailable) as locked:
            begin_write(waiter)
        waiter.rollback()
        with pytest.raises(psycopg.errors.UndefinedColumn) as bad_sql:
            waiter.execute("SELECT no_such_column FROM slices")
    finally:
        holder.close()
        waiter.close()
    assert isinstance(storage_error(locked.value, tmp_path), StorageBusyError)
    assert storage_error(bad_sql.value, tmp_path) is None  # a bug stays a 500, never "retry"


@postgres_only
def test_the_event_listener_comes_back_after_its_connection_drops(app):
    broker = app.extensions[EXTENSION_KEY].broker
    with broker.subscribe() as screen:
        db = connect(app.config["DATABASE"])
        try:
            dropped = db.execute(
                "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            ).fetchall()
        finally:
            db.close()
        assert [r["done"] for r in dropped] == [True]

        def delivered() -> bool:  # events sent while it reconnects are lost: send until one lands
            broker.publish("ping", {"n": 1})
            return screen.get(timeout_s=0.2) == ("ping", {"n": 1})

        assert wait_for(delivered, timeout_s=15)
