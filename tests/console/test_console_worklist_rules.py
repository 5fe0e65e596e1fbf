"""Worklist rules from practice: a flag is never downgraded, and shadow mode alerts nobody."""

from pathlib import Path

import pytest

from build_engines.data import index_records
from client.classify import LocalClassifier, classify_files
from client.registry import get_model
from console import create_app
from console.auth import create_user
from console.db import connect
from console.services import EXTENSION_KEY
from tests.console.conftest import ADMIN, NURSE, ON_POSTGRES, csrf, sqlite_only

NORMALS = ("150.png", "151.png")  # label 0: p < 0.16 with the committed MobileNetV2


@pytest.fixture(scope="module")
def hemorrhage(shared_data) -> str:
    """A kaggle bleed the console's model scores midway between its two thresholds.

    Alone it is flagged (slice threshold); in a study beside normal slices it is
    not (series threshold). Chosen through the model at test time, so a
    retraining cannot leave the test without such a bleed.
    """
    spec = get_model("mobilenet_v2")  # the test console's MODEL_NAME
    bleeds = [
        r.path for r in index_records(shared_data) if r.source == "kaggle_head_ct" and r.label == 1
    ]
    results = classify_files(bleeds, LocalClassifier(spec))
    middle = (spec.threshold + spec.series_threshold) / 2
    chosen = min(results, key=lambda r: abs(r.probability - middle))
    assert spec.threshold + 0.05 < chosen.probability < spec.series_threshold - 0.05
    return chosen.path.name


def _files(shared_data, *names: str) -> list[tuple[str, bytes]]:
    folder = shared_data / "kaggle_head_ct" / "head_ct"
    return [(name, (folder / name).read_bytes()) for name in names]


def _events(subscription) -> list[dict]:
    """Every study event published so far.

    SQLite's broker delivers synchronously; on PostgreSQL events come back
    through LISTEN, so read until none arrives for half a second.
    """
    events = []
    while (message := subscription.get(timeout_s=0.5 if ON_POSTGRES else 0)) is not None:
        events.append(message[1])
    return events


def test_a_flag_stays_until_acknowledged_when_a_later_result_scores_lower(
    api, upload, shared_data, hemorrhage, services, drain, logged_in, auth, db_rows
):
    bay = "bay 1"
    study_id = upload(api, _files(shared_data, hemorrhage), study=bay).get_json()["study_id"]
    other = upload(api, _files(shared_data, "152.png")).get_json()["study_id"]
    with services.broker.subscribe() as subscription:
        drain(services)
        first = api.get(f"/api/studies/{study_id}").get_json()
        assert first["status"] == "flagged" and first["flag_score"] == first["score"]
        assert services.spec.threshold <= first["score"] < services.spec.series_threshold
        assert [e["alert"] for e in _events(subscription) if e["id"] == study_id] == [True]

        # More slices arrive: while they wait, and after the lower re-decision, it stays flagged.
        upload(api, _files(shared_data, *NORMALS), study=bay)
        waiting = api.get(f"/api/studies/{study_id}").get_json()
        assert waiting["status"] == "flagged" and waiting["slices"] == {
            "classified": 1,
            "queued": 2,
        }
        assert waiting["score"] == first["score"]  # what raised the flag, until the new result
        drain(services)
        later = api.get(f"/api/studies/{study_id}").get_json()
        assert [e["alert"] for e in _events(subscription) if e["id"] == study_id] == [False, False]

    assert later["slices"] == {"classified": 3}
    assert later["score"] <= first["score"]
    assert later["score"] < later["threshold"]  # the new decision alone is negative
    assert later["status"] == "flagged" and later["scored_lower"] is True
    assert later["flag_score"] == first["score"] and later["flagged_at"] == first["flagged_at"]
    assert later["priority"]["flagged"] == 1000.0
    assert later["priority"]["score"] == pytest.approx(100 * first["score"], abs=1e-3)
    worklist = api.get("/api/studies").get_json()["studies"]
    assert [s["id"] for s in worklist] == [study_id, other]
    page = logged_in.get(f"/studies/{study_id}").get_data(as_text=True)
    assert 'id="scored-lower"' in page and "below the threshold" in page
    (row,) = db_rows("SELECT status, score, flag_score FROM studies WHERE id = ?", study_id)
    assert (row["status"], row["score"]) == ("flagged", later["score"])

    ack = logged_in.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert ack.status_code == 200
    # Once a person has seen the flag, new slices get a fresh decision: negative this time.
    upload(api, _files(shared_data, "153.png"), study=bay)
    drain(services)
    after = api.get(f"/api/studies/{study_id}").get_json()
    assert after["status"] == "negative"
    assert after["flagged_at"] is None and after["flag_score"] is None
    assert after["scored_lower"] is False


@pytest.fixture
def shadow_app(app_factory, tmp_path):
    app = app_factory(tmp_path / "shadow", SHADOW_MODE=True)
    db = connect(app.config["DATABASE"])
    create_user(db, *ADMIN, role="admin")
    create_user(db, *NURSE)
    db.close()
    return app


def test_shadow_mode_records_results_but_alerts_nobody_and_shows_them_to_admins_only(
    shadow_app, shared_data, hemorrhage, upload, drain, logged_in_as
):
    services = shadow_app.extensions[EXTENSION_KEY]
    assert services.shadow_mode is True  # the predicate outward paths check
    admin = logged_in_as(*ADMIN, on=shadow_app)
    nurse = logged_in_as(*NURSE, on=shadow_app)
    token = csrf(admin)
    body = upload(admin, _files(shared_data, hemorrhage), csrf_token=token).get_json()
    study_id = body["study_id"]
    waiting = upload(admin, _files(shared_data, "150.png"), csrf_token=token).get_json()
    with services.broker.subscribe() as subscription:
        drain(services)
        events = _events(subscription)
    assert {e["id"] for e in events} == {study_id, waiting["study_id"]}
    assert all(e == {"id": e["id"], "alert": False} for e in events)  # no status to screens
    metrics = admin.get("/metrics").get_data(as_text=True)
    assert "hemotriage_time_to_alert_seconds_count 0.0" in metrics  # flagged, never alerted

    db = connect(shadow_app.config["DATABASE"])
    study = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
    db.close()
    assert study["status"] == "flagged" and study["score"] > study["threshold"]  # recorded

    seen = admin.get(f"/api/studies/{study_id}").get_json()
    assert (seen["status"], seen["score"], seen["result_hidden"]) == (
        "flagged",
        study["score"],
        False,
    )
    assert seen["priority"]["flagged"] == 0.0 and seen["priority"]["score"] == 0.0
    listing = admin.get("/api/studies").get_json()
    assert listing["shadow_mode"] is True
    assert [s["id"] for s in listing["studies"]] == [study_id, waiting["study_id"]]  # by age

    hidden = nurse.get(f"/api/studies/{study_id}").get_json()
    assert (hidden["status"], hidden["score"], hidden["key_slice_id"]) == ("classified", None, None)
    assert hidden["result_hidden"] is True
    assert [s["probability"] for s in hidden["slice_list"]] == [None]
    assert {s["status"] for s in nurse.get("/api/studies").get_json()["studies"]} == {"classified"}
    slice_id = hidden["slice_list"][0]["id"]
    assert nurse.get(f"/studies/{study_id}/slices/{slice_id}/cam.png").status_code == 403
    assert nurse.get(f"/studies/{study_id}/slices/{slice_id}.png").status_code == 200
    refused = nurse.post(
        f"/api/studies/{study_id}/feedback",
        json={"verdict": "false"},
        headers={"X-CSRF-Token": csrf(nurse)},
    )
    assert refused.status_code == 403

    for client, who in ((nurse, "administrators only"), (admin, "as an administrator")):
        page = client.get("/").get_data(as_text=True)
        assert 'id="shadow-banner"' in page and "Shadow mode" in page and who in page
    nurse_page = nurse.get(f"/studies/{study_id}").get_data(as_text=True)
    assert 'id="result-hidden"' in nurse_page and 'id="feedback"' not in nurse_page
    assert 'id="feedback"' in admin.get(f"/studies/{study_id}").get_data(as_text=True)


def test_normal_mode_shows_no_shadow_banner(logged_in, api):
    assert "shadow-banner" not in logged_in.get("/").get_data(as_text=True)
    assert api.get("/api/studies").get_json()["shadow_mode"] is False


@pytest.mark.parametrize("value", ["maybe", 2, "alerts off"])
def test_a_mistyped_shadow_mode_setting_stops_the_console(tmp_path, value):
    with pytest.raises(ValueError, match="SHADOW_MODE must be true or false"):
        create_app({"STORAGE_DIR": str(tmp_path), "SHADOW_MODE": value, "DICOM_PORT": 0})


def test_shadow_mode_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEMOTRIAGE_SHADOW_MODE", "true")
    app = create_app({"STORAGE_DIR": str(tmp_path), "DICOM_PORT": 0, "CLASSIFIER": "local"})
    try:
        assert app.config["SHADOW_MODE"] is True
        assert app.extensions[EXTENSION_KEY].broker.alerts is False
    finally:
        app.extensions[EXTENSION_KEY].stop()


@sqlite_only("upgrades a SQLite file made by a release before schema versions")
def test_an_upgraded_database_keeps_the_score_that_flagged_each_study(tmp_path, app_factory):
    storage = tmp_path / "old"
    storage.mkdir()
    db = connect(storage / "hemotriage.sqlite")
    db.executescript((Path(__file__).parents[1] / "assets" / "console_schema_v1.sql").read_text())
    with db:
        for status, score, flagged_at in (("flagged", 0.8, 5.0), ("negative", 0.1, None)):
            db.execute(
                "INSERT INTO studies (study_key, label, source, priority, status, score, "
                "flagged_at, received_at, updated_at) VALUES (?, 'CT', 'api', 2, ?, ?, ?, 0, 0)",
                (status, status, score, flagged_at),
            )
    db.close()
    app = app_factory(storage)
    db = connect(app.config["DATABASE"])
    try:
        rows = db.execute("SELECT flag_score FROM studies ORDER BY id").fetchall()
        assert [r["flag_score"] for r in rows] == [0.8, None]
        assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0  # the new table
    finally:
        db.close()


def test_a_long_series_is_flagged_as_soon_as_no_later_slice_can_clear_it(
    app_factory, tmp_path, token_for, upload, shared_data, drain
):
    """Two bleeding slices read first: the alert goes out while the rest still wait."""
    app = app_factory(tmp_path / "early", BATCH_SIZE=2)
    services = app.extensions[EXTENSION_KEY]
    api = app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app)}"
    files = _files(shared_data, "000.png", "001.png", *NORMALS, "152.png", "153.png")
    study_id = upload(api, files, study="bay 4").get_json()["study_id"]
    with services.broker.subscribe() as subscription:
        assert services.worker.run_once() == 2  # one batch: the two bleeding slices
        early = api.get(f"/api/studies/{study_id}").get_json()
        assert early["status"] == "flagged" and early["slices"] == {"classified": 2, "queued": 4}
        assert early["score"] >= early["threshold"] == services.spec.series_threshold
        drain(services)
        final = api.get(f"/api/studies/{study_id}").get_json()
        alerts = [e["alert"] for e in _events(subscription) if e["id"] == study_id]
    assert alerts.count(True) == 1 and alerts[0] is True  # alerted once, at the early flag
    assert final["slices"] == {"classified": 6}
    assert final["status"] == "flagged" and final["flagged_at"] == early["flagged_at"]
    assert final["score"] == early["score"]  # the whole series decides as the part did
