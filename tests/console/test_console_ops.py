import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.console.conftest import sqlite_only


def test_healthz_is_open_and_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_checks_database_classifier_and_both_threads(client, services):
    before = client.get("/readyz")
    assert before.status_code == 503  # gunicorn's hook has not started the threads
    assert before.get_json()["checks"]["worker"] == "error: thread not running"
    services.start()
    response = client.get("/readyz")
    assert response.status_code == 200
    checks = {"database": "ok", "classifier": "ok", "worker": "ok", "inbox": "ok"}
    assert response.get_json()["checks"] == checks
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'hemotriage_thread_up{thread="worker"} 1.0' in metrics
    assert 'hemotriage_thread_up{thread="inbox"} 1.0' in metrics


def test_readyz_and_metrics_see_a_dead_inbox_watcher(client, services):
    services.start()
    services.inbox.stop()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["inbox"] == "error: thread not running"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'hemotriage_thread_up{thread="inbox"} 0.0' in metrics


def test_config_comes_from_prefixed_env_then_test_config(monkeypatch, tmp_path):
    from console import create_app

    monkeypatch.setenv("HEMOTRIAGE_BATCH_SIZE", "8")
    monkeypatch.setenv("HEMOTRIAGE_TRITON_URL", "triton.internal:9001")
    monkeypatch.setenv("HEMOTRIAGE_PRIORITY_WEIGHT_SCORE", "10")
    app = create_app({"STORAGE_DIR": str(tmp_path), "PRIORITY_WEIGHT_SCORE": 20.0})
    assert app.config["BATCH_SIZE"] == 8
    assert app.config["TRITON_URL"] == "triton.internal:9001"
    assert app.config["PRIORITY_WEIGHT_SCORE"] == 20.0
    assert app.config["CLASSIFIER"] == "triton" and app.config["TRITON_PROTOCOL"] == "grpc"
    assert Path(app.config["DATABASE"]) == tmp_path / "hemotriage.sqlite"
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    again = create_app({"STORAGE_DIR": str(tmp_path)})
    assert again.config["SECRET_KEY"] == app.config["SECRET_KEY"]  # sessions survive restarts


def test_consoles_starting_together_on_one_storage_folder_share_one_session_key(tmp_path):
    """Several nodes mount one folder: a session signed by one must be valid on the others."""
    from console import create_app

    start = threading.Barrier(6)

    def start_console(_):
        start.wait()
        return create_app({"STORAGE_DIR": str(tmp_path), "DICOM_PORT": 0}).config["SECRET_KEY"]

    with ThreadPoolExecutor(6) as pool:
        keys = set(pool.map(start_console, range(6)))
    assert keys == {(tmp_path / "secret_key").read_text()}
    assert len(keys.pop()) == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".secret_key")] == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CLASSIFIER", "cloud"),
        ("TRITON_PROTOCOL", "udp"),
        ("SERIES_THRESHOLD", "1.5"),
        ("SERIES_THRESHOLD", "high"),
    ],
)
def test_invalid_settings_fail_at_start(tmp_path, key, value):
    from console import create_app

    with pytest.raises(ValueError, match=key):
        create_app({"STORAGE_DIR": str(tmp_path), key: value})


def test_init_db_records_the_schema_version_and_refuses_a_newer_database(app, runner, db_rows):
    from console.db import SCHEMA_VERSION, connect, init_db

    assert "(schema version 4)" in runner.invoke(args=["init-db"]).output
    assert [r["version"] for r in db_rows("SELECT version FROM schema_version")] == [4]
    assert SCHEMA_VERSION == 4
    db = connect(app.config["DATABASE"])
    with db:
        db.execute("UPDATE schema_version SET version = 5")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this release's 4"):
        init_db(app.config["DATABASE"])
    assert [r["version"] for r in db_rows("SELECT version FROM schema_version")] == [5]


@sqlite_only("SQLite's journal mode")
def test_database_runs_in_wal_mode(app, db_rows):
    assert db_rows("PRAGMA journal_mode")[0][0] == "wal"


def test_gunicorn_runs_one_worker_thread_that_classifies_uploads(console_server, kaggle_png):
    import json

    import urllib3

    body, content_type = urllib3.encode_multipart_formdata(
        {"files": ("a.png", kaggle_png.read_bytes(), "image/png")}
    )
    request = urllib.request.Request(
        console_server.url + "/api/scans",
        data=body,
        method="POST",
        headers={
            "Content-Type": content_type,
            "Authorization": f"Bearer {console_server.token()}",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        study_id = json.load(response)["study_id"]
    deadline = time.monotonic() + 90
    status = "queued"
    while time.monotonic() < deadline and status in ("queued", "processing"):
        time.sleep(0.3)
        get = urllib.request.Request(
            console_server.url + f"/api/studies/{study_id}",
            headers={"Authorization": request.headers["Authorization"]},
        )
        with urllib.request.urlopen(get, timeout=10) as response:
            status = json.load(response)["status"]
    assert status in ("flagged", "negative")
    console_server.stop()
    log = console_server.log.read_text()
    assert log.count("console services started") == 1
    assert "000.png" not in log and "a.png" not in log  # file names (possible PHI) stay out


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_gunicorn_stops_cleanly_while_screens_hold_live_streams(console_server, stop_signal):
    """An open SSE stream ends on shutdown instead of holding the worker until SIGKILL."""
    request = urllib.request.Request(
        console_server.url + "/api/stream",
        headers={"Authorization": f"Bearer {console_server.token()}"},
    )
    with urllib.request.urlopen(request, timeout=60) as stream:
        assert stream.readline() == b"retry: 3000\n"
        console_server.process.send_signal(stop_signal)
        stream.read()  # returns once the server has ended the stream
    assert console_server.process.wait(timeout=60) == 0
    assert "SIGKILL" not in console_server.log.read_text()
