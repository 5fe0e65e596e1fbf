"""Operations endpoints, open without login: liveness, readiness, Prometheus metrics.

Routes:

    GET /healthz   200 while the process answers
    GET /readyz    200 when the database takes writes and the classifier answers, else 503
    GET /metrics   Prometheus text format
"""

from __future__ import annotations

import sqlite3

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from client.errors import HemoTriageError
from console.db import get_db
from console.services import current_services

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process serves requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: the database accepts a write lock and the classifier can be reached."""
    checks: dict[str, str] = {}
    try:
        db = get_db()
        db.execute("BEGIN IMMEDIATE")  # takes the write lock: proves the file is writable
        db.rollback()
        checks["database"] = "ok"
    except sqlite3.Error as e:
        checks["database"] = f"error: {e}"
    worker = current_services().worker
    try:
        worker.classifier()
        checks["classifier"] = "ok"
    except HemoTriageError as e:
        checks["classifier"] = f"error: {e}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify(ready=ready, checks=checks), 200 if ready else 503


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
