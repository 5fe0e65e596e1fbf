import io
import json
import sqlite3
import subprocess
import sys
import time

import pytest
from werkzeug.wrappers import Request

from benchmarks.bench_time_to_alert import batch_timeline, worker_stages
from benchmarks.console_api import study_events, upload_body
from benchmarks.loadtest import audit_database
from benchmarks.phantoms import phantom_series
from client.constants import REPO_ROOT
from client.decode import decode_bytes
from console.db import init_db

# Locust monkey-patches the interpreter on import: look at the locustfile in a child process.
_LIST_TASKS = """
import json
import benchmarks.locustfile as f
users = (f.ScannerUser, f.TriageScreenUser, f.TritonUser)
print(json.dumps({u.__name__: sorted({t.__name__ for t in u.tasks}) for u in users}))
"""


def test_locustfile_defines_scanner_screen_and_triton_users_with_tasks():
    result = subprocess.run(
        [sys.executable, "-c", _LIST_TASKS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tasks = json.loads(result.stdout.strip().splitlines()[-1])
    assert tasks == {
        "ScannerUser": ["send_series"],
        "TriageScreenUser": ["open_study", "refresh_worklist"],
        "TritonUser": ["infer"],
    }


def test_phantom_series_is_one_new_dicom_series_per_call_in_slice_order():
    first, second = phantom_series(3, size=96), phantom_series(3, size=96)
    metas = [decode_bytes(data, f"{i}.dcm").dicom for i, data in enumerate(first)]
    assert len({(m.study_uid, m.series_uid) for m in metas}) == 1
    assert len({m.sop_uid for m in metas}) == 3
    assert [m.slice_position_mm for m in metas] == [0.0, 5.0, 10.0]
    assert decode_bytes(second[0], "0.dcm").dicom.study_uid != metas[0].study_uid


def _insert_slices(database, states):
    db = sqlite3.connect(database)
    now = time.time()
    with db:
        db.execute(
            "INSERT INTO studies (id, study_key, label, source, priority, received_at, "
            "updated_at) VALUES (1, 'k', 'l', 'api', 2, ?, ?)",
            (now, now),
        )
        for slice_id, (status, error) in states.items():
            db.execute(
                "INSERT INTO slices (id, study_id, filename, stored_path, sha256, status, "
                "error, priority, queued_at) VALUES (?, 1, 'f', 'p', ?, ?, ?, 2, ?)",
                (slice_id, f"sha{slice_id}", status, error, now),
            )
    db.close()


def test_audit_counts_unfinished_missing_and_reasonless_failures_as_lost(tmp_path):
    database = tmp_path / "console.sqlite"
    init_db(database)
    _insert_slices(
        database,
        {
            1: ("classified", None),
            2: ("failed", "could not read the stored file"),
            3: ("failed", ""),
            4: ("queued", None),
            5: ("processing", None),
            6: ("classified", None),
        },
    )
    audit = audit_database(database, accepted_ids={1, 2, 3, 4, 5, 99})
    assert (audit.accepted, audit.classified, audit.failed_with_reason) == (6, 1, 1)
    assert (audit.failed_without_reason, audit.unfinished, audit.missing) == (1, 2, 1)
    assert audit.unlogged == 1  # slice 6: stored, but no 201 named it
    assert audit.lost == 4


def test_multipart_body_parses_into_files_and_study_label():
    files = [("IM0001.dcm", b"\x00first"), ("IM0002.dcm", b"second\r\n--x")]
    body, content_type = upload_body(files, "label 1")
    request = Request.from_values(
        input_stream=io.BytesIO(body),
        content_length=len(body),
        content_type=content_type,
        method="POST",
    )
    uploaded = request.files.getlist("files")
    assert [(f.filename, f.read()) for f in uploaded] == files
    assert request.form["study"] == "label 1"


def test_worker_stages_count_the_overlap_of_preparation_and_inference():
    """Batch 2 is prepared (100.10-100.30) while batch 1 is inferred (100.10-100.40)."""

    def slice_(started, prepared, handoff_ms, inferred, finished):
        return {
            "started_at": started,
            "prepared_at": prepared,
            "handoff_ms": handoff_ms,
            "inferred_at": inferred,
            "finished_at": finished,
        }

    detail = {
        "received_at": 100.0,
        "finished_at": 100.8,
        "slice_list": [
            slice_(100.02, 100.10, 0.0, 100.40, 100.45),
            slice_(100.02, 100.10, 0.0, 100.40, 100.45),
            slice_(100.10, 100.30, 150.0, 100.75, 100.8),
        ],
    }
    stages = worker_stages(detail)
    assert stages["first_claim_ms"] == pytest.approx(20.0)
    assert stages["prepare_ms"] == pytest.approx(80.0 + 200.0)
    assert stages["inference_ms"] == pytest.approx(300.0 + 300.0)
    assert stages["commit_ms"] == pytest.approx(50.0 + 50.0)
    # 20 + 280 + 600 + 100 = 1000 ms of stages in an 800 ms record.
    assert stages["overlapped_ms"] == pytest.approx(200.0)
    assert [b["slices"] for b in batch_timeline(detail)] == [2, 1]


def test_study_events_yield_the_data_of_study_events_only():
    lines = [
        "retry: 3000",
        "",
        "event: study",
        'data: {"id": 1, "status": "flagged"}',
        "",
        "event: ping",
        'data: {"id": 2}',
        "",
        'data: {"id": 3}',  # no event name: a default "message" event
        "",
        "event: study",
        'data: {"id": 4, "status": "negative"}',
    ]
    assert [e["id"] for e in study_events(lines)] == [1, 4]
