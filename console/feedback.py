"""Radiologist feedback: a reader confirms or refutes the model's result, and the live accuracy.

On the study page a reader (clinician or admin) marks the model's result
``confirmed`` or ``false``. On a flagged study that is a true or a false
positive; on a negative study, ``false`` records a hemorrhage the model missed
(a false negative). An optional short note goes with it. Every mark is a new
``feedback`` row with the model version, score and threshold it judged, and an
audit row: marks can be changed, the last one counts, the history stays.
:func:`record_feedback` is the one way in, for the page and the API.

Routes:

    POST /studies/<id>/feedback    (form: verdict=confirmed|false, note, csrf_token)
    GET  /accuracy?days=7|30|all   PPV, false-positive rate and misses per model version,
                                   and the series operating point on this site's reviewed series
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, flash, g, redirect, render_template, request, url_for

from console.accuracy import (
    MIN_REVIEWED_BLEEDS,
    WINDOWS,
    accuracy_by_version,
    parse_window,
    series_operating_points,
)
from console.db import Connection, Row, audit, begin_write, get_db
from console.errors import ConflictError, InvalidRequestError
from console.shadow import require_results_visible
from console.studies import get_study

logger = logging.getLogger(__name__)

bp = Blueprint("feedback", __name__)

#: What a reader says of the model's result.
VERDICTS = ("confirmed", "false")
#: Longest note kept: a remark, not a report (reports live in the RIS).
MAX_NOTE_CHARS = 500
#: (the model's decision, the reader's verdict) -> the outcome counted.
OUTCOMES = {
    ("flagged", "confirmed"): "true_positive",
    ("flagged", "false"): "false_positive",
    ("negative", "confirmed"): "true_negative",
    ("negative", "false"): "false_negative",
}


@bp.post("/studies/<int:study_id>/feedback")
def feedback_form(study_id: int):
    """Record a reader's verdict from the study page."""
    require_results_visible()
    row = record_feedback(
        get_db(), study_id, g.user, request.form.get("verdict"), request.form.get("note")
    )
    flash(f"Feedback recorded: {row['outcome'].replace('_', ' ')}.")
    return redirect(url_for("worklist.study", study_id=study_id))


@bp.get("/accuracy")
def accuracy():
    """The model's live accuracy on this site's reviewed studies, per version."""
    days = parse_window(request.args.get("days"))
    db, now = get_db(), time.time()
    return render_template(
        "feedback/accuracy.html",
        rows=accuracy_by_version(db, days, now),
        operating_points=series_operating_points(db, days, now),
        min_bleeds=MIN_REVIEWED_BLEEDS,
        days=days,
        windows=WINDOWS,
    )


def model_decision(study: Mapping[str, Any]) -> str | None:
    """What the model decided: ``flagged`` (acknowledged or not), ``negative``, or None yet."""
    if study["flagged_at"] is not None:
        return "flagged"
    return "negative" if study["score"] is not None else None


def record_feedback(
    db: Connection,
    study_id: int,
    user: Row,
    verdict: str | None,
    note: str | None,
) -> Row:
    """Store a reader's verdict on a study's result, with an audit row, in one transaction.

    Args:
        db: The request's connection.
        study_id: The study judged.
        user: The reader.
        verdict: ``confirmed`` or ``false``.
        note: Optional, at most :data:`MAX_NOTE_CHARS` characters.

    Returns:
        The new ``feedback`` row.

    Raises:
        InvalidRequestError: an unknown verdict, or a note that is too long.
        StudyNotFoundError: no such study.
        ConflictError: the study has no result to judge yet (queued, processing, failed).
    """
    if verdict not in VERDICTS:
        raise InvalidRequestError(
            f"verdict must be one of {', '.join(VERDICTS)} (the model's result was right or "
            f"wrong), not {verdict!r}"
        )
    note = (note or "").strip()
    if len(note) > MAX_NOTE_CHARS:
        raise InvalidRequestError(f"note is {len(note)} characters; at most {MAX_NOTE_CHARS}")
    with db:
        begin_write(db)
        study = get_study(db, study_id)
        decision = model_decision(study)
        if decision is None:
            raise ConflictError(f"study {study_id} has no result to review ({study['status']})")
        outcome = OUTCOMES[(decision, verdict)]
        previous = db.execute(
            "SELECT outcome FROM feedback WHERE study_id = ? ORDER BY id DESC LIMIT 1",
            (study_id,),
        ).fetchone()
        cursor = db.execute(
            "INSERT INTO feedback (study_id, at, username, outcome, note, model_name, "
            "model_version, score, threshold) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
            (
                study_id,
                time.time(),
                user["username"],
                outcome,
                note,
                study["model_name"],
                study["model_version"],
                study["score"],
                study["threshold"],
            ),
        )
        row = cursor.fetchone()
        was = previous["outcome"] if previous else "none"
        # The note may name the patient: it stays in the feedback table, out of the audit log.
        audit(db, user["username"], "feedback", study_id, f"{outcome} (was {was})")
    logger.info("feedback on study %d by user %d: %s", study_id, user["id"], outcome)
    return row


def history(db: Connection, study_id: int) -> list[dict]:
    """A study's verdicts, newest (the one that counts) first."""
    rows = db.execute(
        "SELECT * FROM feedback WHERE study_id = ? ORDER BY id DESC", (study_id,)
    ).fetchall()
    return [dict(r) for r in rows]
