"""Pages: the live worklist, the upload page, the study view and its slice images.

The worklist page renders an empty table and fills it from ``/api/studies``;
``static/console/live.js`` refreshes it on every ``/api/stream`` event and
raises the alert for a newly flagged study on any open page.

    GET /                                   worklist
    GET /upload                             drag-and-drop upload
    GET /studies/<id>                       study view, key slice first
    GET /studies/<id>/slices/<sid>.png      model view of one slice
    GET /studies/<id>/slices/<sid>/cam.png  Grad-CAM overlay
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, render_template

from console.db import get_db
from console.errors import ImagePurgedError, StudyNotFoundError
from console.feedback import MAX_NOTE_CHARS, history, model_decision
from console.filestore import stored_path
from console.render import slice_png
from console.services import current_services
from console.shadow import require_results_visible, results_visible
from console.studies import study_detail

bp = Blueprint("worklist", __name__)


@bp.app_template_filter("utc")
def format_utc(epoch_s: float | None) -> str:
    """Seconds since the epoch as ``YYYY-MM-DD HH:MM:SS`` in UTC ("–" when missing)."""
    if epoch_s is None:
        return "–"
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


@bp.get("/")
def index():
    """The worklist (rows come from the API and the live stream)."""
    return render_template("worklist/index.html", rule=current_services().rule.formula())


@bp.get("/upload")
def upload():
    """Drag-and-drop upload of files, folders' contents or zips."""
    return render_template("worklist/upload.html")


@bp.get("/studies/<int:study_id>")
def study(study_id: int):
    """One study: key slice first, every slice browsable, with scores, timings and feedback."""
    services = current_services()
    db = get_db()
    visible = results_visible()
    detail = study_detail(db, study_id, services.rule, show_results=visible)
    return render_template(
        "worklist/study.html",
        study=detail,
        spec=services.spec,
        feedback=history(db, study_id) if visible else [],
        decision=model_decision(detail) if visible else None,
        max_note_chars=MAX_NOTE_CHARS,
    )


@bp.get("/studies/<int:study_id>/slices/<int:slice_id>.png")
def slice_image(study_id: int, slice_id: int):
    """The slice as the model saw it (cropped, windowed, resized), as PNG."""
    path = _slice_path(study_id, slice_id)
    return _png(slice_png(path, current_services().spec))


@bp.get("/studies/<int:study_id>/slices/<int:slice_id>/cam.png")
def slice_cam(study_id: int, slice_id: int):
    """The Grad-CAM overlay of the slice (computed on the PyTorch weights)."""
    require_results_visible()
    path = _slice_path(study_id, slice_id)
    return _png(current_services().cam.overlay_png(path))


def _slice_path(study_id: int, slice_id: int):
    """The stored file of a slice that still has one (console/retention.py purges them)."""
    row = (
        get_db()
        .execute(
            "SELECT stored_path, purged_at FROM slices WHERE id = ? AND study_id = ?",
            (slice_id, study_id),
        )
        .fetchone()
    )
    if row is None:
        raise StudyNotFoundError(f"no slice {slice_id} in study {study_id}")
    if row["purged_at"] is not None:
        raise ImagePurgedError(f"image purged: slice {slice_id} is past the retention period")
    return stored_path(current_services().storage_dir, row["stored_path"])


def _png(data: bytes) -> Response:
    # Images of patients: never cached by shared caches, kept briefly by this browser.
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=300"})
