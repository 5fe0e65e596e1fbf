import os
import threading

import pytest

from build_engines.serve import free_ports
from console import queue
from console.db import connect
from console.services import EXTENSION_KEY
from tests.console.conftest import wait_for


def test_restart_requeues_processing_slices_and_finishes_them(
    app, api, upload, phantom_series, app_factory, storage, db_rows
):
    study_id = upload(api, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(3))]).get_json()[
        "study_id"
    ]
    db = connect(app.config["DATABASE"])
    with db:
        claimed = queue.claim(db, 2, app.config["NODE_ID"])  # the "crashed" worker took two slices
    db.close()
    assert len(claimed) == 2
    assert {r["status"] for r in db_rows("SELECT status FROM slices")} == {"processing", "queued"}

    restarted = app_factory(storage)  # a new process on the same database
    restarted.extensions[EXTENSION_KEY].start()
    assert wait_for(
        lambda: {r["status"] for r in db_rows("SELECT status FROM slices")} == {"classified"}
    )
    (study,) = db_rows("SELECT * FROM studies WHERE id = ?", study_id)
    assert study["status"] in ("flagged", "negative")
    attempts = [r["attempts"] for r in db_rows("SELECT attempts FROM slices ORDER BY id")]
    assert sorted(attempts) == [1, 2, 2]


def _triton_app(app_factory, storage, port: int):
    return app_factory(
        storage,
        CLASSIFIER="triton",
        TRITON_URL=f"localhost:{port}",
        TRITON_PROTOCOL="grpc",
        TRITON_TIMEOUT_S=5.0,
    )


def test_worker_backs_off_while_triton_is_unreachable_and_keeps_the_queue(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    console = _triton_app(app_factory, storage, free_ports(1)[0])
    services = console.extensions[EXTENSION_KEY]
    client = console.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(console)}"
    assert upload(client, [("p.dcm", phantom_series(1)[0])]).status_code == 201
    services.start()
    assert wait_for(lambda: services.worker.state.backoff_s >= 0.2, timeout_s=30)
    assert not services.worker.state.classifier_ready
    assert "Triton" in services.worker.state.last_error
    assert [r["status"] for r in db_rows("SELECT status FROM slices")] == ["queued"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["database"] == "ok"
    assert ready.get_json()["checks"]["classifier"].startswith("error")
    worklist = client.get("/api/studies").get_json()
    assert worklist["worker"]["classifier_ready"] is False
    assert ready.get_json()["worker"]["last_error"].startswith("ServerUnavailableError")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "hemotriage_classifier_up 0.0" in metrics
    assert 'hemotriage_worker_errors_total{error="ServerUnavailableError"}' in metrics
    assert "hemotriage_worker_last_error_timestamp_seconds 0.0" not in metrics


@pytest.mark.integration
def test_worker_resumes_by_itself_when_triton_comes_up(
    app_factory, storage, token_for, upload, phantom_series, db_rows
):
    from build_engines.serve import (
        EmbeddedTriton,
        ServeSettings,
        TritonNotInstalledError,
        missing_model_files,
    )

    settings = ServeSettings.from_env(models=("mobilenet_v2",)).with_free_ports()
    if missing_model_files(settings):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    console = _triton_app(app_factory, storage, settings.grpc_port)
    services = console.extensions[EXTENSION_KEY]
    client = console.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(console)}"
    upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(2))])
    services.start()
    assert wait_for(lambda: services.worker.state.backoff_s > 0, timeout_s=30)
    try:
        server = EmbeddedTriton(settings).start()
    except TritonNotInstalledError as e:
        pytest.skip(str(e))
    try:
        assert wait_for(
            lambda: {r["status"] for r in db_rows("SELECT status FROM slices")} == {"classified"},
            timeout_s=60,
        )
        assert services.worker.state.classifier_ready
        assert client.get("/readyz").status_code == 200
    finally:
        services.stop()
        server.stop()


def test_inbox_ingests_files_and_folders_and_rejects_bad_entries(
    app, services, phantom_series, kaggle_png, db_rows
):
    inbox = services.inbox.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    series = inbox / "CT_SERIES"
    series.mkdir()
    for i, data in enumerate(phantom_series(3)):
        (series / f"{i}.dcm").write_bytes(data)
    (inbox / "single.png").write_bytes(kaggle_png.read_bytes())
    (inbox / "notes.txt").write_text("not an image")
    (inbox / ".partial").write_bytes(b"still copying")
    assert services.inbox.scan_once() == 3
    studies = db_rows("SELECT source, label FROM studies ORDER BY id")
    assert [s["source"] for s in studies] == ["inbox", "inbox"]
    assert len(db_rows("SELECT * FROM slices")) == 4
    assert not series.exists() and not (inbox / "single.png").exists()
    rejected = sorted(p.name for p in (inbox / "rejected").iterdir())
    assert any(n.endswith("-notes.txt") for n in rejected)
    reason = next((inbox / "rejected").glob("*.reason.txt")).read_text()
    assert reason.startswith("InvalidImageError")
    assert (inbox / ".partial").exists()


def _drop(inbox, name: str, data: bytes) -> None:
    """Arrive whole, as a copier should: write under a hidden name, then rename.

    The tests run with no settle time, so a file written in place could be read
    while still empty by the running watcher (and rightly rejected).
    """
    partial = inbox / f".{name}.part"
    partial.write_bytes(data)
    partial.rename(inbox / name)


def test_inbox_thread_picks_up_a_dropped_file(app, services, phantom_series, db_rows):
    services.inbox.start()
    _drop(services.inbox.inbox, "drop.dcm", phantom_series(1)[0])
    assert wait_for(lambda: len(db_rows("SELECT * FROM slices")) == 1, timeout_s=10)


def test_inbox_thread_survives_poisoned_entries_and_ingests_the_next_file(
    app, services, phantom_series, poisoned_dicom, db_rows, caplog
):
    inbox, rejected = services.inbox.inbox, services.inbox.inbox / "rejected"
    services.inbox.start()
    # A damaged zip whose name is not UTF-8 (Latin-1 from a Windows share; os.fsdecode keeps
    # the byte as a surrogate), and a DICOM with a poisoned field.
    _drop(inbox, os.fsdecode(b"M\xfcller.zip"), b"PK\x03\x04 not a zip")
    _drop(inbox, "poisoned.dcm", poisoned_dicom("InstanceNumber", "IS", b"abc"))
    assert wait_for(lambda: len(list(rejected.glob("*.reason.txt"))) == 2, timeout_s=10)
    _drop(inbox, "good.dcm", phantom_series(1)[0])
    assert wait_for(lambda: len(db_rows("SELECT * FROM slices")) == 1, timeout_s=10)
    assert [t for t in threading.enumerate() if t.name == "hemotriage-inbox" and t.is_alive()]
    reasons = sorted(p.read_text() for p in rejected.glob("*.reason.txt"))
    assert reasons[0].startswith("BadArchiveError: M\\udcfcller.zip")
    assert reasons[1].startswith("InvalidDicomFieldError: poisoned.dcm: InstanceNumber")
    # File names can carry a patient's name: the log has the error class only.
    assert "BadArchiveError" in caplog.text
    assert "ller" not in caplog.text and "poisoned" not in caplog.text


def test_inbox_leaves_an_entry_for_a_retry_when_the_store_fails(
    app, services, phantom_series, storage, db_rows
):
    inbox = services.inbox.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "slice.dcm").write_bytes(phantom_series(1)[0])
    (storage / "uploads").write_bytes(b"")  # the store's folder is a file: writing fails
    assert services.inbox.scan_once() == 0
    assert (inbox / "slice.dcm").exists()
    assert not any((inbox / "rejected").iterdir())
    (storage / "uploads").unlink()
    assert services.inbox.scan_once() == 1
    assert len(db_rows("SELECT * FROM slices")) == 1


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_default_triton_classifier_scores_a_real_series(
    triton_server, app_factory, storage, token_for, upload, cq500_series, drain, protocol
):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    console = app_factory(storage, CLASSIFIER="triton", TRITON_URL=url, TRITON_PROTOCOL=protocol)
    client = console.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(console)}"
    study_id = upload(client, [(p.name, p.read_bytes()) for p in cq500_series])
    study_id = study_id.get_json()["study_id"]
    assert drain(console.extensions[EXTENSION_KEY]) == len(cq500_series)
    detail = client.get(f"/api/studies/{study_id}").get_json()
    assert detail["status"] in ("flagged", "negative")
    assert detail["slices"] == {"classified": len(cq500_series)}


@pytest.mark.integration
def test_worker_prepares_the_next_batch_while_triton_computes_one_and_urgent_goes_next(
    triton_server, app_factory, storage, token_for, upload, phantom_series, db_rows
):
    """Decoding overlaps inference, one batch ahead: with the server held inside batch 1,
    batch 2 is claimed and decoded, batch 3 is not; an urgent study sent then is the next
    batch claimed; each slice is classified once."""
    app = app_factory(
        storage,
        CLASSIFIER="triton",
        TRITON_URL=triton_server.grpc_url,
        BATCH_SIZE=4,
        INBOX_DIR="",
    )
    services = app.extensions[EXTENSION_KEY]
    client = app.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app)}"
    services.start()
    assert wait_for(lambda: services.worker.state.classifier_ready)

    def statuses() -> list[str]:
        return [r["status"] for r in db_rows("SELECT status FROM slices ORDER BY id")]

    triton_server.pause()
    try:
        routine = upload(client, [(f"{i}.dcm", d) for i, d in enumerate(phantom_series(12))])
        assert routine.status_code == 201
        assert wait_for(lambda: statuses() == ["processing"] * 8 + ["queued"] * 4, timeout_s=60)
        urgent = upload(
            client, [(f"u{i}.dcm", d) for i, d in enumerate(phantom_series(4))], priority="urgent"
        )
        assert urgent.status_code == 201
    finally:
        triton_server.resume()
    assert wait_for(lambda: statuses() == ["classified"] * 16, timeout_s=60)
    rows = db_rows(
        "SELECT study_id, attempts, prepared_at, handoff_ms, inferred_at FROM slices ORDER BY id"
    )
    assert [r["attempts"] for r in rows] == [1] * 16
    batches = sorted({(r["prepared_at"], r["inferred_at"], r["study_id"]) for r in rows})
    assert len(batches) == 4
    (_, first_inferred, _), (second_prepared, *_), (*_, third_study), _ = batches
    assert second_prepared < first_inferred  # ready before the server answered batch 1
    assert third_study == urgent.get_json()["study_id"]  # ahead of routine batch 3
    assert all(r["handoff_ms"] >= 0 for r in rows)
