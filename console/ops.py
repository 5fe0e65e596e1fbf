"""Operations endpoints, open without login: liveness, readiness, Prometheus metrics.

Routes:

    GET /healthz   200 while the process answers
    GET /readyz    200 when the database takes writes, the classifier answers and the
                   worker, inbox, DICOM receiver and results threads run (the worker's
                   loop not stalled), else 503; with Triton, each server's state under
                   "triton"
    GET /metrics   Prometheus text format
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from client.errors import HemoTriageError
from console.db import DATABASE_ERRORS, begin_write, get_db
from console.services import current_services

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process serves requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: the database takes a write lock, the classifier answers, the threads run.

    The body also carries the worker's latest error (and the results thread's),
    so an operator sees why without reading logs, and each Triton server's state
    (after health-checking those due for it, so an idle console notices a
    restarted server too).
    """
    checks: dict[str, str] = {}
    try:
        db = get_db()
        begin_write(db)  # takes the write lock: proves the database takes writes
        db.rollback()
        checks["database"] = "ok"
    except DATABASE_ERRORS as e:
        checks["database"] = f"error: {e}"
    services = current_services()
    worker = services.worker
    classifier = None
    try:
        classifier = worker.classifier()
        checks["classifier"] = "ok"
    except HemoTriageError as e:
        checks["classifier"] = f"error: {e}"
    for name, alive in services.thread_probes().items():
        checks[name] = "ok" if alive() else "error: thread not running"
    heartbeat_age_s = time.time() - worker.state.heartbeat_at
    if checks["worker"] == "ok" and heartbeat_age_s > worker.settings.lease_s:
        checks["worker"] = f"error: loop stalled for {heartbeat_age_s:.0f} s"
    ready = all(v == "ok" for v in checks.values())
    state = worker.state
    body = {
        "ready": ready,
        "checks": checks,
        "worker": {
            "last_error": state.last_error,
            "last_error_at": state.last_error_at or None,
            "backoff_s": state.backoff_s,
        },
    }
    if services.results is not None:
        body["results"] = {"last_error": services.results.last_error}
    # Several Triton servers: one that is down does not make the console unready.
    check_servers = getattr(classifier, "check_servers", None)
    if check_servers is not None:
        body["triton"] = {s.url: "up" if s.up else f"down: {s.reason}" for s in check_servers()}
    return jsonify(body), 200 if ready else 503


@bp.get("/metrics")
def metrics():
    """Prometheus exposition of this console's metrics."""
    return Response(
        generate_latest(current_services().metrics.registry), mimetype=CONTENT_TYPE_LATEST
    )


def count_request(response):
    """Count every response by method, endpoint and status (``after_request`` hook)."""
    endpoint = request.endpoint or "unmatched"
    current_services().metrics.requests.labels(
        request.method, endpoint, str(response.status_code)
    ).inc()
    return response
