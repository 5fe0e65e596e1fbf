"""The JSON API: upload scans, read the worklist, acknowledge, feedback, and the live stream.

    curl -H "Authorization: Bearer $TOKEN" -F files=@a.dcm -F files=@b.dcm localhost:5000/api/scans
    # -> 201 {"study_id": 1, "study_ids": [1], "slice_ids": [1, 2], "duplicates": 0}
    curl -H "Authorization: Bearer $TOKEN" http://localhost:5000/api/studies
    curl -N -H "Authorization: Bearer $TOKEN" http://localhost:5000/api/stream
    curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
        -d '{"verdict": "false", "note": "calcified falx"}' localhost:5000/api/studies/7/feedback
    curl -H "Authorization: Bearer $TOKEN" "http://localhost:5000/api/accuracy?days=30"

``POST /api/scans`` is the one route upload-only tokens (scanners, PACS
bridges) may use; every accepted upload is audited with the token's name (or
the user, for the upload page) and its number of slices. The other routes need
a clinician or a ``full`` token (console/auth.py). It takes multipart files
(any field name; ``files`` by convention), one or many, zips included, an
optional ``study`` label grouping PNG/JPEG files and an optional ``priority``
(``urgent`` or ``routine``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from flask import Blueprint, Response, current_app, g, jsonify, request

from client.constants import PRIORITY_ROUTINE, PRIORITY_URGENT
from console import alerts, feedback
from console.accuracy import accuracy_by_version, parse_window, series_operating_points
from console.auth import role_required
from console.db import get_db
from console.errors import InvalidRequestError, UploadError
from console.events import format_sse
from console.ingest import IncomingFile
from console.services import current_services
from console.shadow import require_results_visible, results_visible
from console.studies import study_detail, worklist

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")

_PRIORITIES = {"urgent": PRIORITY_URGENT, "routine": PRIORITY_ROUTINE}


@bp.post("/scans")
@role_required("uploader")
def upload_scans():
    """Accept an upload: every file decoded first, stored and committed before the 201.

    Returns:
        201 with ``study_id`` (the first study), ``study_ids``, ``slice_ids`` and
        ``duplicates``; or the typed error's 4xx with nothing stored.
    """
    files = [
        IncomingFile(f.filename or "upload", f.read())
        for key in request.files
        for f in request.files.getlist(key)
    ]
    priority_name = request.form.get("priority", "routine")
    if priority_name not in _PRIORITIES:
        raise UploadError(f"priority must be one of {', '.join(_PRIORITIES)}")
    source = "upload" if g.via == "session" else "api"
    via = f"token {g.token_name}" if g.via == "token" else "upload page"
    result = current_services().accept(
        files,
        request.form.get("study"),
        source,
        _PRIORITIES[priority_name],
        actor=g.user["username"],
        via=via,
    )
    body = {
        "study_id": result.study_ids[0],
        "study_ids": result.study_ids,
        "slice_ids": result.slice_ids,
        "duplicates": result.duplicates,
    }
    return jsonify(body), 201, {"Location": f"/api/studies/{result.study_ids[0]}"}


@bp.get("/studies")
def list_studies():
    """The worklist, highest priority first, with the rule that ordered it."""
    services = current_services()
    return jsonify(
        studies=worklist(get_db(), services.rule, show_results=results_visible()),
        rule=services.rule.formula(),
        shadow_mode=services.shadow_mode,
        worker={
            "classifier_ready": services.worker.state.classifier_ready,
            "backoff_s": services.worker.state.backoff_s,
            "last_error": services.worker.state.last_error,
        },
    )


@bp.get("/studies/<int:study_id>")
def get_study(study_id: int):
    """One study with all its slices, probabilities, stage timings and readers' feedback."""
    db = get_db()
    visible = results_visible()
    detail = study_detail(db, study_id, current_services().rule, show_results=visible)
    detail["feedback"] = feedback.history(db, study_id) if visible else []
    return jsonify(detail)


@bp.post("/studies/<int:study_id>/feedback")
def post_feedback(study_id: int):
    """A reader's verdict on the model's result: JSON ``{"verdict": "confirmed"|"false", "note"}``.

    Returns:
        201 with the stored verdict (``outcome``: true/false positive/negative); 400 for a bad
        body or verdict, 409 for a study without a result yet.
    """
    require_results_visible()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequestError(
            'send a JSON object {"verdict": "confirmed" or "false", "note": "..."}'
        )
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidRequestError("note must be text")
    row = feedback.record_feedback(get_db(), study_id, g.user, body.get("verdict"), note)
    return jsonify(dict(row)), 201


@bp.get("/accuracy")
def accuracy():
    """Per model version (``?days=7|30|all``): accuracy, and the series operating point."""
    days = parse_window(request.args.get("days"))
    db, now = get_db(), time.time()
    return jsonify(
        days=days,
        versions=[asdict(r) for r in accuracy_by_version(db, days, now)],
        series_operating_points=[asdict(p) for p in series_operating_points(db, days, now)],
    )


@bp.post("/studies/<int:study_id>/acknowledge")
def acknowledge_study(study_id: int):
    """Record who acknowledged the study and when (audit log)."""
    study = alerts.acknowledge_study(get_db(), current_services().broker, study_id, g.user)
    return jsonify(
        id=study_id,
        status=study["status"],
        acknowledged_by=study["acknowledged_by"],
        acknowledged_at=study["acknowledged_at"],
    )


@bp.get("/stream")
def stream():
    """Server-Sent Events: ``study`` events as they happen, a comment as keepalive.

    The subscription opens before the response is returned, so nothing published
    after this request arrived is missed; the headers are set before the first yield.
    """
    config = current_app.config
    keepalive_s = float(config["SSE_KEEPALIVE_S"])
    subscription = current_services().broker.subscribe(int(config["MAX_STREAMS"]))

    def generate():
        # The server closes this generator when the screen disconnects; `with` unsubscribes.
        # It ends by itself only when the broker closes (shutdown); the screen then reconnects.
        with subscription:
            yield "retry: 3000\n\n"
            while not subscription.ended:
                message = subscription.get(keepalive_s)
                if message is not None:
                    yield format_sse(*message)
                elif not subscription.ended:
                    yield f": keepalive {time.time():.0f}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(generate(), mimetype="text/event-stream", headers=headers)
