"""Series completion: a DICOM series is final once no instance arrived for the quiet period.

Slices are classified as they arrive, so a study's status and score follow its
slices all along (:func:`console.queue.refresh_study`); what completion adds is
the moment the series decision is final and its results go to the PACS. A
series received by DICOM is complete when its newest slice was queued at least
``DICOM_QUIET_S`` ago and none of its slices waits for the classifier. The fact
is kept in the study row (``completed_at``, ``completed_slices``,
``result_version``), so nothing of it lives only in memory: after a restart the
next check finds every quiet series not yet completed. A series that grows after
completion (a late instance, a resend with new slices) no longer matches its
``completed_slices`` and is completed again as the next ``result_version``.

With a ``RESULTS_DESTINATION``, :class:`ResultMaker` builds the series' SR and
Grad-CAM secondary capture (:mod:`console.results`) before the completing
transaction, and :func:`complete_quiet_series` commits the completion and the
outbox rows together (console/outbox.py sends them).

    completed = complete_quiet_series(db, quiet_s=10.0, make=ResultMaker(...), destination=peer)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from client.registry import ModelSpec
from console.db import Connection, begin_write
from console.dicom_node import DicomPeer
from console.filestore import stored_path
from console.outbox import enqueue, record_unbuilt
from console.render import CamRenderer
from console.results import SeriesResult, secondary_capture, structured_report

logger = logging.getLogger(__name__)

#: Builds a due series' result objects.
MakeObjects = Callable[[Connection, "DueSeries"], list["ResultObject"]]


@dataclass(frozen=True)
class DueSeries:
    """A quiet series whose decision is to be made final.

    Attributes:
        study_id: Its study (one per series).
        slices: Its slices now.
        version: The result version completing it now makes (1 the first time).
    """

    study_id: int
    slices: int
    version: int


def due_series(db: Connection, quiet_s: float, now: float) -> list[DueSeries]:
    """DICOM series quiet for ``quiet_s``, every slice finished, not completed at this size.

    Args:
        db: A connection.
        quiet_s: The quiet period, seconds.
        now: Epoch seconds to judge by (slices' ``queued_at`` is epoch time).

    Returns:
        The due series, oldest study first.
    """
    # A study changed since its completion (updated_at moved) is the only candidate for a
    # new version, so completed, untouched studies are skipped without counting slices.
    rows = db.execute(
        "SELECT s.id, s.result_version, s.completed_slices, COUNT(sl.id) AS n, "
        "MAX(sl.queued_at) AS last_at, "
        "SUM(CASE WHEN sl.status IN ('queued', 'processing') THEN 1 ELSE 0 END) AS unfinished "
        "FROM studies s JOIN slices sl ON sl.study_id = s.id "
        "WHERE s.source = 'dicom' AND (s.completed_at IS NULL OR s.updated_at > s.completed_at) "
        "GROUP BY s.id ORDER BY s.id"
    ).fetchall()
    return [
        DueSeries(row["id"], row["n"], row["result_version"] + 1)
        for row in rows
        if row["unfinished"] == 0
        and row["last_at"] <= now - quiet_s
        and row["completed_slices"] != row["n"]
    ]


def mark_complete(db: Connection, series: DueSeries) -> bool:
    """Record the completion, unless the series changed since :func:`due_series` saw it.

    Args:
        db: Connection inside the caller's transaction (with the outbox rows it adds).
        series: As returned by :func:`due_series`.

    Returns:
        Whether it was recorded (False: a slice arrived or another completion won).
    """
    cursor = db.execute(
        "UPDATE studies SET completed_at = ?, completed_slices = ?, result_version = ? "
        "WHERE id = ? AND result_version = ? AND "
        "(SELECT COUNT(*) FROM slices WHERE study_id = ?) = ? AND NOT EXISTS "
        "(SELECT 1 FROM slices WHERE study_id = ? AND status IN ('queued', 'processing'))",
        (
            time.time(),
            series.slices,
            series.version,
            series.study_id,
            series.version - 1,
            series.study_id,
            series.slices,
            series.study_id,
        ),
    )
    return cursor.rowcount == 1


def complete_quiet_series(
    db: Connection,
    quiet_s: float,
    make: MakeObjects,
    destination: DicomPeer | None,
) -> set[int]:
    """Complete every due series; with a destination, enqueue its result objects too.

    The objects are built first (Grad-CAM takes a moment) and committed in the same
    transaction as the completion; a series that changed meanwhile is left for the
    next round, and its objects are dropped unsent.

    Args:
        db: A connection (not inside a transaction).
        quiet_s: ``DICOM_QUIET_S``.
        make: Builds a series' objects (only called with a destination).
        destination: ``RESULTS_DESTINATION``, or None (completion only).

    Returns:
        The studies completed.
    """
    completed = set()
    for series in due_series(db, quiet_s, time.time()):
        objects = make(db, series) if destination is not None else []
        with db:
            begin_write(db)
            if not mark_complete(db, series):
                continue
            for made in objects:
                if made.dataset is None:
                    record_unbuilt(
                        db, series.study_id, series.version, made.kind, made.error, destination
                    )
                else:
                    enqueue(
                        db, series.study_id, series.version, made.kind, made.dataset, destination
                    )
        logger.info(
            "series complete: study %d, %d slices, result version %d, %d objects queued",
            series.study_id,
            series.slices,
            series.version,
            len(objects),
        )
        completed.add(series.study_id)
    return completed


@dataclass(frozen=True)
class ResultObject:
    """One result object of a series, or why it could not be built.

    Attributes:
        kind: ``sr`` or ``sc``.
        dataset: The object, or None when building it failed.
        error: Why it could not be built (None when it was).
    """

    kind: str
    dataset: Dataset | None
    error: str | None = None


@dataclass(frozen=True)
class ResultMaker:
    """Builds a completed series' SR and Grad-CAM secondary capture from its study row.

    Attributes:
        spec: The configured model (name, version, weights hash, thresholds).
        storage_dir: ``STORAGE_DIR``: the key slice is read from the store.
        cam: The console's Grad-CAM renderer (shared with the study page).
    """

    spec: ModelSpec
    storage_dir: Path
    cam: CamRenderer

    def __call__(self, db: Connection, series: DueSeries) -> list[ResultObject]:
        """The series' objects; none for a study with no classified slice (nothing to report)."""
        study = db.execute("SELECT * FROM studies WHERE id = ?", (series.study_id,)).fetchone()
        if study["score"] is None:
            logger.warning("study %d: no classified slice, no results to send", study["id"])
            return []
        key = db.execute(
            "SELECT stored_path FROM slices WHERE id = ?", (study["key_slice_id"],)
        ).fetchone()
        path = stored_path(self.storage_dir, key["stored_path"])
        result = SeriesResult(
            model_name=self.spec.name,
            model_version=study["model_version"],
            weights_sha256=self.spec.trained.weights_sha256,
            score=study["score"],
            threshold=study["threshold"],
            flagged=study["score"] >= study["threshold"],
            slices=series.slices,
            version=series.version,
        )

        def key_slice() -> Dataset:
            # The attributes only: the secondary capture's pixels are the Grad-CAM overlay.
            return pydicom.dcmread(path, stop_before_pixels=True)

        return [
            _built("sr", study["id"], lambda: structured_report(result, key_slice())),
            _built(
                "sc",
                study["id"],
                lambda: secondary_capture(result, key_slice(), self.cam.overlay_rgb(path)),
            ),
        ]


def _built(kind: str, study_id: int, build: Callable[[], Dataset]) -> ResultObject:
    """Build one object; a failure becomes its recorded reason, so the other still goes."""
    try:
        return ResultObject(kind, build())
    except Exception as e:
        # Whatever went wrong (a key slice file gone, weights missing for Grad-CAM, an
        # attribute highdicom refuses) is logged and kept on the object's outbox row as
        # 'failed', where the study page shows it; the series still completes.
        logger.exception("study %d: the %s result object could not be built", study_id, kind)
        return ResultObject(kind, None, f"could not be built: {type(e).__name__}: {e}")
