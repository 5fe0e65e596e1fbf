"""The retention purge (console/retention.py) on real stored uploads."""

import io

import cv2
import numpy as np
import pydicom
import pytest

from benchmarks.phantoms import head_phantom
from console.db import connect
from console.dicom_node import DicomPeer
from console.outbox import enqueue
from console.retention import UNDELIVERED_REASON


@pytest.fixture
def png_bytes() -> bytes:
    """A phantom slice in the brain window (L40/W80: 0 to 80 HU) as PNG, the same every call."""
    hu = head_phantom(256)
    ok, encoded = cv2.imencode(".png", np.clip(hu * 255 / 80, 0, 255).astype(np.uint8))
    assert ok
    return encoded.tobytes()


def _stored(storage, db_rows, study_id: int) -> list:
    rows = db_rows("SELECT stored_path FROM slices WHERE study_id = ?", study_id)
    return [storage / "uploads" / r["stored_path"] for r in rows]


def test_purge_deletes_images_of_finished_studies_and_keeps_scores_and_audit(
    runner, api, logged_in, upload, phantom_series, services, drain, storage, db_rows
):
    body = upload(api, [(f"{i}.dcm", b) for i, b in enumerate(phantom_series(3))]).get_json()
    study_id, slice_id = body["study_id"], body["slice_ids"][0]
    drain(services)
    before = api.get(f"/api/studies/{study_id}").get_json()
    files = _stored(storage, db_rows, study_id)
    assert all(f.exists() for f in files)

    recent = runner.invoke(args=["purge", "--days", "1"])  # finished seconds ago: kept
    assert recent.exit_code == 0 and "purged 0 studies" in recent.output
    result = runner.invoke(args=["purge", "--days", "0"])
    assert result.exit_code == 0, result.output
    assert "purged 1 studies (3 slices), deleted 3 files" in result.output

    assert not any(f.exists() for f in files)
    after = api.get(f"/api/studies/{study_id}").get_json()
    assert (after["status"], after["score"]) == (before["status"], before["score"])
    assert [s["probability"] for s in after["slice_list"]] == [
        s["probability"] for s in before["slice_list"]
    ]
    assert all(s["purged_at"] for s in after["slice_list"])
    image = api.get(f"/studies/{study_id}/slices/{slice_id}.png")
    assert image.status_code == 410 and image.get_json()["error"] == "ImagePurgedError"
    assert api.get(f"/studies/{study_id}/slices/{slice_id}/cam.png").status_code == 410
    page = logged_in.get(f"/studies/{study_id}")
    assert page.status_code == 200 and "Image purged" in page.get_data(as_text=True)
    (entry,) = db_rows("SELECT * FROM audit_log WHERE action = 'purge'")
    assert (entry["username"], entry["study_id"]) == ("retention", study_id)
    assert "3 slice images" in entry["detail"]
    again = runner.invoke(args=["purge", "--days", "0"])
    assert "purged 0 studies (0 slices), deleted 0 files" in again.output


def test_purge_never_deletes_a_file_an_unfinished_slice_still_needs(
    runner, api, upload, png_bytes, services, drain, storage, db_rows
):
    old = upload(api, [("a.png", png_bytes)], study="first visit").get_json()["study_id"]
    drain(services)
    # The same bytes in a newer study: the content-addressed store keeps one file for both.
    new = upload(api, [("a.png", png_bytes)], study="second visit").get_json()["study_id"]
    (shared,) = _stored(storage, db_rows, old)
    assert _stored(storage, db_rows, new) == [shared]

    result = runner.invoke(args=["purge", "--days", "0"])
    assert "purged 1 studies (1 slices), deleted 0 files" in result.output
    assert shared.exists()
    drain(services)  # the queued slice still reads its file
    assert api.get(f"/api/studies/{new}").get_json()["status"] in ("flagged", "negative")

    result = runner.invoke(args=["purge", "--days", "0"])
    assert "purged 1 studies (1 slices), deleted 1 files" in result.output
    assert not shared.exists()


def test_purge_takes_the_retention_period_from_the_config(
    app, runner, api, upload, phantom_series, services, drain, db_rows
):
    upload(api, [("a.dcm", phantom_series(1)[0])])
    drain(services)
    upload(api, [("b.dcm", phantom_series(1)[0])])  # queued: never purged
    assert "purged 0 studies" in runner.invoke(args=["purge"]).output  # 30 days by default
    app.config["RETENTION_DAYS"] = 0
    assert "purged 1 studies (1 slices)" in runner.invoke(args=["purge"]).output
    rows = db_rows("SELECT status, purged_at FROM slices ORDER BY id")
    assert [(r["status"], r["purged_at"] is not None) for r in rows] == [
        ("classified", True),
        ("queued", False),
    ]
    assert runner.invoke(args=["purge", "--days", "-1"]).exit_code != 0


def test_purge_drops_result_objects_the_pacs_never_took(
    runner, api, upload, phantom_series, services, drain, db_rows, app
):
    files = phantom_series(2)
    study_id = upload(api, [(f"{i}.dcm", b) for i, b in enumerate(files)]).get_json()["study_id"]
    drain(services)
    pacs = DicomPeer("PACS", "127.0.0.1", 104)
    db = connect(app.config["DATABASE"])
    with db:  # the PACS took the SR of version 1; the secondary capture is still pending
        enqueue(db, study_id, 1, "sr", pydicom.dcmread(io.BytesIO(files[0])), pacs)
        enqueue(db, study_id, 1, "sc", pydicom.dcmread(io.BytesIO(files[1])), pacs)
        db.execute("UPDATE outbox SET status = 'sent', dataset = NULL WHERE kind = 'sr'")
    db.close()

    result = runner.invoke(args=["purge", "--days", "0"])
    assert result.exit_code == 0, result.output

    rows = {r["kind"]: r for r in db_rows("SELECT * FROM outbox")}
    assert (rows["sr"]["status"], rows["sr"]["last_error"]) == ("sent", None)
    assert rows["sc"]["status"] == "failed" and rows["sc"]["dataset"] is None
    assert rows["sc"]["last_error"] == UNDELIVERED_REASON
    delivery = api.get(f"/api/studies/{study_id}").get_json()["results"]
    assert {r["kind"]: r["status"] for r in delivery} == {"sr": "sent", "sc": "failed"}
    (entry,) = db_rows("SELECT detail FROM audit_log WHERE action = 'purge'")
    assert "1 result objects never delivered" in entry["detail"]
