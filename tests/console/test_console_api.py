import io
import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ImplicitVRLittleEndian

from client.constants import PRIORITY_URGENT
from client.registry import get_model
from console.services import EXTENSION_KEY
from tests.console.conftest import ADMIN, api_client_of


def test_png_upload_is_stored_and_committed_before_the_response(
    api, upload, kaggle_png, storage, db_rows
):
    response = upload(api, [("000.png", kaggle_png.read_bytes())])
    assert response.status_code == 201
    body = response.get_json()
    assert body["study_ids"] == [body["study_id"]]
    assert response.headers["Location"] == f"/api/studies/{body['study_id']}"
    (row,) = db_rows("SELECT * FROM slices")
    assert row["status"] == "queued"
    assert row["filename"] == "000.png"
    stored = storage / "uploads" / row["stored_path"]
    assert stored.read_bytes() == kaggle_png.read_bytes()
    (study,) = db_rows("SELECT * FROM studies")
    assert (study["status"], study["source"]) == ("queued", "api")


def test_png_study_is_classified_with_model_threshold_and_timings(
    api, upload, kaggle_png, services, drain, db_rows
):
    study_id = upload(api, [("000.png", kaggle_png.read_bytes())]).get_json()["study_id"]
    assert drain(services) == 1
    detail = api.get(f"/api/studies/{study_id}").get_json()
    spec = get_model("mobilenet_v2")
    assert detail["status"] in ("flagged", "negative")
    assert detail["threshold"] == spec.threshold  # one slice: the slice threshold
    assert detail["model_name"] == "mobilenet_v2"
    assert spec.trained.weights_sha256[:12] in detail["model_version"]
    (slice_,) = detail["slice_list"]
    assert 0.0 <= slice_["probability"] <= 1.0
    assert detail["score"] == pytest.approx(slice_["probability"])
    for key in ("ingest_ms", "decode_ms", "preprocess_ms", "queue_wait_ms", "inference_ms"):
        assert slice_[key] >= 0.0
    assert detail["key_slice_id"] == slice_["id"]


def test_dicom_series_is_one_study_scored_in_anatomical_order(
    api, upload, cq500_series, services, drain, db_rows
):
    files = [(p.name, p.read_bytes()) for p in reversed(cq500_series)]
    body = upload(api, files).get_json()
    assert len(body["study_ids"]) == 1 and len(body["slice_ids"]) == len(cq500_series)
    drain(services)
    detail = api.get(f"/api/studies/{body['study_id']}").get_json()
    assert detail["status"] in ("flagged", "negative")
    assert detail["threshold"] == get_model("mobilenet_v2").series_threshold
    assert detail["study_uid"] and detail["series_uid"]
    assert detail["slice_list"][0]["id"] == detail["key_slice_id"]  # key slice first
    positions = [s["slice_position_mm"] for s in detail["slice_list"][1:]]
    assert positions == sorted(positions)
    assert detail["slices"] == {"classified": len(cq500_series)}


def test_zip_of_a_series_is_expanded_into_one_study(api, upload, phantom_series, zip_bytes):
    series = phantom_series(4)
    archive = zip_bytes(
        {f"series/IM{i}.dcm": data for i, data in enumerate(series)}
        | {"__MACOSX/._IM0.dcm": b"junk", "series/.DS_Store": b"junk"}
    )
    body = upload(api, [("series.zip", archive)]).get_json()
    assert len(body["study_ids"]) == 1 and len(body["slice_ids"]) == 4


def test_two_series_in_one_upload_become_two_studies(api, upload, phantom_series):
    first, second = phantom_series(2), phantom_series(2, lesion=None)
    files = [(f"a{i}.dcm", d) for i, d in enumerate(first)]
    files += [(f"b{i}.dcm", d) for i, d in enumerate(second)]
    body = upload(api, files).get_json()
    assert len(body["study_ids"]) == 2


def test_png_files_are_separate_studies_unless_a_study_label_groups_them(
    api, upload, kaggle_png, normal_png
):
    files = [("a.png", kaggle_png.read_bytes()), ("b.png", normal_png.read_bytes())]
    assert len(upload(api, files).get_json()["study_ids"]) == 2
    grouped = upload(api, files, study="bay 3 patient").get_json()
    assert len(grouped["study_ids"]) == 1
    cut = kaggle_png.read_bytes()[:2000]
    later = upload(api, [("c.png", cut)], study="bay 3 patient")
    # A truncated PNG is refused, and the grouped study is untouched.
    assert later.status_code == 422
    again = upload(api, files, study="bay 3 patient").get_json()
    assert again["study_ids"] == grouped["study_ids"] and again["duplicates"] == 2


def test_duplicate_upload_adds_nothing(api, upload, phantom_series, db_rows):
    series = phantom_series(2)
    files = [(f"{i}.dcm", d) for i, d in enumerate(series)]
    first = upload(api, files).get_json()
    second = upload(api, files).get_json()
    assert second["study_ids"] == first["study_ids"]
    assert second["slice_ids"] == [] and second["duplicates"] == 2
    assert len(db_rows("SELECT * FROM slices")) == 2


def _reencoded(data: bytes) -> bytes:
    """The same SOP instance written again as Implicit VR Little Endian: other bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _stored_files(storage) -> list:
    return [p for p in (storage / "uploads").rglob("*") if p.is_file()]


def test_resent_sop_instance_with_other_bytes_is_a_duplicate(
    api, upload, phantom_series, storage, db_rows
):
    original = phantom_series(1)[0]
    resent = _reencoded(original)
    assert resent != original
    first = upload(api, [("a.dcm", original)]).get_json()
    second = upload(api, [("a-again.dcm", resent)]).get_json()
    assert second["study_ids"] == first["study_ids"]
    assert second["slice_ids"] == [] and second["duplicates"] == 1
    assert len(db_rows("SELECT * FROM slices")) == 1
    assert len(_stored_files(storage)) == 1  # the refused copy is not left in the store


def test_one_sop_instance_twice_in_one_upload_is_stored_once(
    api, upload, phantom_series, storage, db_rows
):
    original = phantom_series(1)[0]
    body = upload(api, [("a.dcm", original), ("b.dcm", _reencoded(original))]).get_json()
    assert len(body["slice_ids"]) == 1 and body["duplicates"] == 1
    (row,) = db_rows("SELECT filename FROM slices")
    assert row["filename"] == "a.dcm"
    assert len(_stored_files(storage)) == 1


def test_urgent_slices_are_claimed_first(api, upload, phantom_series, services, db_rows):
    upload(api, [("r.dcm", phantom_series(1)[0])])
    urgent = upload(api, [("u.dcm", phantom_series(1)[0])], priority="urgent").get_json()
    services.worker.settings = replace(services.worker.settings, batch_size=1)
    services.worker.run_once()
    (first,) = db_rows("SELECT * FROM slices WHERE status = 'classified'")
    assert first["study_id"] == urgent["study_id"]
    assert first["priority"] == PRIORITY_URGENT


def test_worklist_orders_flagged_first_and_explains_the_rule(
    api, upload, phantom_series, services, drain
):
    for _ in range(2):
        upload(api, [("p.dcm", phantom_series(1)[0])])
    drain(services)
    body = api.get("/api/studies").get_json()
    assert "priority" in body["rule"] and "per minute waiting" in body["rule"]
    totals = [s["priority"]["total"] for s in body["studies"]]
    assert totals == sorted(totals, reverse=True)
    for study in body["studies"]:
        terms = study["priority"]
        assert terms["flagged"] == (1000.0 if study["status"] == "flagged" else 0.0)
        assert terms["score"] == pytest.approx(100 * study["score"], abs=1e-3)


def test_acknowledge_records_who_and_when_in_the_audit_log(
    logged_in, auth, upload, phantom_series, services, drain, db_rows
):
    study_id = upload(
        logged_in, [("p.dcm", phantom_series(1)[0])], csrf_token=auth.headers()["X-CSRF-Token"]
    ).get_json()["study_id"]
    early = logged_in.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert early.status_code == 409  # still queued
    drain(services)
    response = logged_in.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert response.status_code == 200
    assert response.get_json()["acknowledged_by"] == "admin"
    again = logged_in.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert again.status_code == 409
    (entry,) = db_rows("SELECT * FROM audit_log WHERE action = 'acknowledge'")
    assert (entry["username"], entry["study_id"]) == ("admin", study_id)
    page = logged_in.get("/audit").get_data(as_text=True)
    assert "acknowledge" in page and f"/studies/{study_id}" in page
    worklist = logged_in.get("/api/studies").get_json()["studies"]
    assert worklist[-1]["status"] == "acknowledged"


def test_acknowledge_form_needs_csrf_and_redirects_to_the_study(
    logged_in, auth, upload, phantom_series, services, drain
):
    study_id = upload(
        logged_in, [("p.dcm", phantom_series(1)[0])], csrf_token=auth.headers()["X-CSRF-Token"]
    ).get_json()["study_id"]
    drain(services)
    assert logged_in.post(f"/studies/{study_id}/acknowledge").status_code == 400
    token = auth.headers()["X-CSRF-Token"]
    response = logged_in.post(f"/studies/{study_id}/acknowledge", data={"csrf_token": token})
    assert response.status_code == 302
    page = logged_in.get(f"/studies/{study_id}").get_data(as_text=True)
    assert "acknowledged" in page and "by admin" in page


def test_study_page_shows_key_slice_first_and_serves_model_view_png(
    logged_in, upload, api, cq500_series, services, drain
):
    files = [(p.name, p.read_bytes()) for p in cq500_series[:4]]
    study_id = upload(api, files).get_json()["study_id"]
    drain(services)
    detail = logged_in.get(f"/api/studies/{study_id}").get_json()
    page = logged_in.get(f"/studies/{study_id}").get_data(as_text=True)
    key = detail["key_slice_id"]
    assert f'data-slice="{key}"' in page.split('id="main-slice"')[1].split(">")[0]
    for needle in ("Threshold", "Model", "Queue wait ms", "Inference ms", "Grad-CAM"):
        assert needle in page
    image = logged_in.get(f"/studies/{study_id}/slices/{key}.png")
    assert image.status_code == 200 and image.mimetype == "image/png"
    size = get_model("mobilenet_v2").input_size
    assert Image.open(io.BytesIO(image.data)).size == (size, size)
    other = logged_in.get(f"/studies/{study_id + 1}/slices/{key}.png")
    assert other.status_code == 404


def test_study_page_draws_the_probability_strip_along_the_series(
    logged_in, upload, api, cq500_series, kaggle_png, services, drain
):
    files = [(p.name, p.read_bytes()) for p in cq500_series[:6]]
    study_id = upload(api, files).get_json()["study_id"]
    drain(services)
    detail = logged_in.get(f"/api/studies/{study_id}").get_json()
    page = logged_in.get(f"/studies/{study_id}").get_data(as_text=True)
    strip = page.split('id="probability-strip"')[1].split("</figure>")[0]
    bars = strip.split("<rect")[1:]
    assert len(bars) == 6
    # Skull base to vertex: the bars follow the anatomical order of the slice table.
    table_order = [
        s["id"] for s in sorted(detail["slice_list"], key=lambda s: s["slice_position_mm"])
    ]
    assert [int(b.split('data-slice="')[1].split('"')[0]) for b in bars] == table_order
    (key_bar,) = [b for b in bars if " key" in b.split('class="')[1].split('"')[0]]
    assert f'data-slice="{detail["key_slice_id"]}"' in key_bar
    assert 'class="threshold"' in strip
    lone = upload(api, [("000.png", kaggle_png.read_bytes())]).get_json()["study_id"]
    drain(services)
    assert 'id="probability-strip"' not in logged_in.get(f"/studies/{lone}").get_data(as_text=True)


def test_a_series_model_decides_the_study_and_the_strip_shows_its_refined_slices(
    app_factory, storage, token_for, logged_in_as, upload, drain, cq500_series
):
    """A site chose the series model: the console decides by it and keeps its refined slices."""
    from client.classify import LocalClassifier, classify_files
    from client.series import SERIES_MODEL_RULE, decide_series

    spec = get_model("resnet18", SERIES_MODEL_RULE)
    app = app_factory(storage, MODEL_NAME=spec.name, SERIES_RULE=SERIES_MODEL_RULE)
    api = api_client_of(app, token_for)
    paths = cq500_series[:6]
    study_id = upload(api, [(p.name, p.read_bytes()) for p in paths]).get_json()["study_id"]
    drain(app.extensions[EXTENSION_KEY])
    detail = api.get(f"/api/studies/{study_id}").get_json()
    # The command line's decision on the same slices, by the same function.
    local = LocalClassifier(spec)
    results = sorted(classify_files(paths, local), key=lambda r: r.order_key)
    expected = decide_series(
        spec, [r.probability for r in results], [r.head_fraction for r in results], local
    )
    assert detail["threshold"] == spec.series_threshold
    assert detail["score"] == pytest.approx(expected.score, abs=1e-5)
    refined = [s["refined_probability"] for s in detail["strip"]]
    assert refined == pytest.approx(list(expected.refined), abs=1e-5)
    assert detail["status"] == ("flagged" if expected.flagged else "negative")
    page = logged_in_as(*ADMIN, on=app).get(f"/studies/{study_id}").get_data(as_text=True)
    strip = page.split('id="probability-strip"')[1].split("</figure>")[0]
    points = strip.split('class="refined" points="')[1].split('"')[0].split()
    assert len(points) == 6
    assert "refined by the series model" in strip


def test_gradcam_overlay_is_a_colour_png(logged_in, api, upload, kaggle_png, services, drain):
    study_id = upload(api, [("000.png", kaggle_png.read_bytes())]).get_json()["study_id"]
    drain(services)
    key = logged_in.get(f"/api/studies/{study_id}").get_json()["key_slice_id"]
    response = logged_in.get(f"/studies/{study_id}/slices/{key}/cam.png")
    assert response.status_code == 200
    rgb = np.asarray(Image.open(io.BytesIO(response.data)))
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.ptp(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 0  # coloured, not gray


def test_stream_sends_study_events(logged_in, services):
    response = logged_in.get("/api/stream", buffered=False)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    chunks = response.response
    assert next(chunks).startswith(b"retry:")
    services.broker.publish("study", {"id": 7, "status": "flagged", "alert": True})
    message = next(chunks).decode()
    while message.startswith(":"):
        message = next(chunks).decode()
    event, data = message.strip().split("\n")
    assert event == "event: study"
    assert json.loads(data.removeprefix("data: "))["alert"] is True
    response.close()
    assert services.broker.subscriber_count == 0


def test_live_streams_are_capped_so_screens_cannot_starve_the_console(app, logged_in, services):
    app.config["MAX_STREAMS"] = 2
    screens = [logged_in.get("/api/stream", buffered=False) for _ in range(2)]
    assert [s.status_code for s in screens] == [200, 200]
    refused = logged_in.get("/api/stream", buffered=False)
    assert refused.status_code == 503
    assert refused.get_json()["error"] == "TooManyStreamsError"
    assert logged_in.get("/healthz").status_code == 200
    screens[0].close()
    again = logged_in.get("/api/stream", buffered=False)
    assert again.status_code == 200
    again.close()
    screens[1].close()
    assert services.broker.subscriber_count == 0


def test_worklist_counts_the_slices_of_the_studies_it_lists(api, upload, phantom_series, app):
    from console.db import connect
    from console.studies import worklist

    upload(api, [(f"a{i}.dcm", d) for i, d in enumerate(phantom_series(3))])
    upload(api, [(f"b{i}.dcm", d) for i, d in enumerate(phantom_series(2))])
    db = connect(app.config["DATABASE"])
    try:
        (newest,) = worklist(db, app.extensions["hemotriage"].rule, limit=1)
    finally:
        db.close()
    assert newest["slices"] == {"queued": 2}


def test_worker_fails_a_slice_whose_stored_file_vanished(
    api, upload, phantom_series, storage, services, drain, db_rows
):
    study_id = upload(api, [("p.dcm", phantom_series(1)[0])]).get_json()["study_id"]
    (row,) = db_rows("SELECT stored_path FROM slices")
    (storage / "uploads" / row["stored_path"]).unlink()
    drain(services)
    (slice_,) = db_rows("SELECT * FROM slices")
    assert slice_["status"] == "failed" and "could not read" in slice_["error"]
    assert api.get(f"/api/studies/{study_id}").get_json()["status"] == "failed"


def test_metrics_report_queue_stages_and_requests(
    api, upload, phantom_series, services, drain, client
):
    upload(api, [("p.dcm", phantom_series(1)[0])])
    queued = client.get("/metrics").get_data(as_text=True)
    assert 'hemotriage_queue_slices{state="queued"} 1.0' in queued
    drain(services)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'hemotriage_queue_slices{state="classified"} 1.0' in text
    for stage in ("ingest", "decode", "preprocess", "queue_wait", "inference"):
        assert f'hemotriage_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert "hemotriage_time_to_alert_seconds_bucket" in text
    assert 'endpoint="api.upload_scans",method="POST",status="201"' in text
