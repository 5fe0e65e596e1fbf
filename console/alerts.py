"""Acknowledging alerts from the page, and the audit log that records who and when.

Routes:

    POST /studies/<id>/acknowledge    (form with csrf_token) -> back to the study
    GET  /audit                       the audit log, newest first
"""

from __future__ import annotations

import logging

from flask import Blueprint, flash, g, redirect, render_template, url_for

from console.db import get_db
from console.services import current_services
from console.studies import acknowledge

logger = logging.getLogger(__name__)

bp = Blueprint("alerts", __name__)

#: Audit rows shown on one page.
AUDIT_PAGE_ROWS = 500


@bp.post("/studies/<int:study_id>/acknowledge")
def acknowledge_form(study_id: int):
    """Acknowledge a finished study from its page."""
    acknowledge(get_db(), study_id, g.user["username"])
    logger.info("study %d acknowledged by user %d", study_id, g.user["id"])
    current_services().broker.publish(
        "study", {"id": study_id, "status": "acknowledged", "alert": False}
    )
    flash(f"Study {study_id} acknowledged.")
    return redirect(url_for("worklist.study", study_id=study_id))


@bp.get("/audit")
def audit_log():
    """Who acknowledged what and when, logins and account changes."""
    rows = (
        get_db()
        .execute("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (AUDIT_PAGE_ROWS,))
        .fetchall()
    )
    return render_template("alerts/audit.html", rows=rows)
