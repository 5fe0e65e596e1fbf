"""The results outbox (console/outbox.py): C-STORE answers, and backoff while the PACS is down."""

import time

import pytest
from pydicom.dataset import Dataset

from benchmarks.phantoms import SeriesIds, head_phantom, phantom_dicom
from build_engines.serve import free_ports
from console.db import connect, init_db
from console.dicom_node import DicomPeer
from console.outbox import OutboxSettings, _outcome, deliver_due, enqueue
from console.results import SeriesResult, structured_report

PACS = DicomPeer("PACS", "127.0.0.1", 104)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (0x0000, "sent"),
        (0xB000, "sent"),  # a warning: stored, with coercion
        (0xA700, "pending"),  # out of resources: retried
        (0xA7FF, "pending"),
        (0xC000, "failed"),  # cannot understand: the same bytes would be refused again
        (0xA900, "failed"),
        (None, "pending"),  # no answer (timed out, aborted)
    ],
)
def test_c_store_answers_map_to_sent_retried_or_failed(status, state):
    answer = Dataset()
    if status is not None:
        answer.Status = status
    outcome, error = _outcome(answer, PACS)
    assert outcome == state
    assert (error is None) == (state == "sent")


def test_a_pacs_down_for_days_is_still_retried_at_the_longest_backoff(tmp_path):
    database = tmp_path / "db.sqlite"
    init_db(database)
    db = connect(database)
    with db:
        study_id = db.execute(
            "INSERT INTO studies (study_key, label, source, priority, received_at, updated_at) "
            "VALUES ('k', 'CT', 'dicom', 2, 0, 0)"
        ).lastrowid
        key = phantom_dicom(head_phantom(64), SeriesIds.new())
        result = SeriesResult("mobilenet_v2", "1", "ab" * 32, 0.9, 0.5, True, 1, 1)
        down = DicomPeer("PACS", "127.0.0.1", free_ports(1)[0])  # nothing listens there
        enqueue(db, study_id, 1, "sr", structured_report(result, key), down)
        db.execute("UPDATE outbox SET attempts = 5000")  # days of failed tries
    settings = OutboxSettings(database, 1.0, down, "HEMOTRIAGE", 1.0, 2.0, 300.0, 5.0)
    assert deliver_due(db, settings) == {study_id}
    (row,) = db.execute("SELECT * FROM outbox").fetchall()
    assert (row["status"], row["attempts"]) == ("pending", 5001)
    assert "could not be reached" in row["last_error"]
    assert row["next_attempt_at"] - time.time() == pytest.approx(300.0, abs=5.0)
    assert row["dataset"] is not None  # kept until the PACS takes it
    db.close()
