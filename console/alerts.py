"""Alerts: acknowledging them (page and API), the audit log of who and when, and the event.

:func:`acknowledge_study` is the one way a study becomes acknowledged: the
state check, the audit row and the ``study`` event on the live stream happen
together, whether a clinician clicks on the study page or a client calls
``POST /api/studies/<id>/acknowledge``.

Routes:

    POST /studies/<id>/acknowledge    (form with csrf_token) -> back to the study
    GET  /audit                       the audit log, newest first (administrators only)
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, flash, g, redirect, render_template, url_for

from console.auth import role_required
from console.db import Connection, Row, audit, begin_write, get_db
from console.errors import ConflictError
from console.events import EventBroker, publish_study
from console.queue import FINISHED, StudyChange
from console.services import current_services
from console.studies import get_study

logger = logging.getLogger(__name__)

bp = Blueprint("alerts", __name__)

#: Audit rows shown on one page.
AUDIT_PAGE_ROWS = 500


@bp.post("/studies/<int:study_id>/acknowledge")
def acknowledge_form(study_id: int):
    """Acknowledge a finished study from its page."""
    acknowledge_study(get_db(), current_services().broker, study_id, g.user)
    flash(f"Study {study_id} acknowledged.")
    return redirect(url_for("worklist.study", study_id=study_id))


def acknowledge_study(db: Connection, broker: EventBroker, study_id: int, user: Row) -> Row:
    """Record that ``user`` has seen a finished study's result; audit it and tell every screen.

    Returns:
        The acknowledged study row.

    Raises:
        StudyNotFoundError: no such study.
        ConflictError: the study is still queued or processing, or already acknowledged.
    """
    username = user["username"]
    with db:
        begin_write(db)
        study = get_study(db, study_id)
        if study["status"] == "acknowledged":
            raise ConflictError(
                f"study {study_id} was acknowledged by {study['acknowledged_by']} already"
            )
        if study["status"] not in FINISHED:
            raise ConflictError(f"study {study_id} is still {study['status']}")
        now = time.time()
        db.execute(
            "UPDATE studies SET status = 'acknowledged', acknowledged_at = ?, "
            "acknowledged_by = ?, updated_at = ? WHERE id = ?",
            (now, username, now, study_id),
        )
        score = f"{study['score']:.3f}" if study["score"] is not None else "none"
        audit(db, username, "acknowledge", study_id, f"was {study['status']}, score {score}")
    logger.info("study %d acknowledged by user %d", study_id, user["id"])
    publish_study(broker, StudyChange(study_id, study["status"], "acknowledged", False))
    return get_study(db, study_id)


@bp.get("/audit")
@role_required("admin")
def audit_log():
    """Who acknowledged what and when, logins and account changes."""
    rows = (
        get_db()
        .execute("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (AUDIT_PAGE_ROWS,))
        .fetchall()
    )
    return render_template("alerts/audit.html", rows=rows)
