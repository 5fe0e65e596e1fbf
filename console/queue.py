"""The persistent priority queue: slice rows in SQLite, claimed in batches.

A slice moves ``queued -> processing -> classified | failed``. Claiming, releasing
and finishing are each one transaction, so a crash leaves at worst some rows
``processing``. A claim is a lease: :func:`requeue_claims` takes back every
claim when the worker starts and expired ones on a timer, and a slice that
used up its attempts fails with the reason instead of coming back forever.
A study's status follows from its slices (:func:`refresh_study`).

    with db:
        rows = claim(db, batch_size=16)
    ...
    with db:
        finish(db, row["id"], probability=0.93, head_fraction=0.4, timings)
        refresh_study(db, row["study_id"], spec)
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass

from client.registry import ModelSpec
from client.series import decide_series, early_flag

#: Study states that mean "a person still has to look at the result".
FINISHED = ("flagged", "negative", "failed", "acknowledged")


@dataclass(frozen=True)
class SliceTimings:
    """Per-stage latencies of one slice, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    queue_wait_ms: float
    inference_ms: float


@dataclass(frozen=True)
class StudyChange:
    """A study's status before and after :func:`refresh_study`."""

    study_id: int
    before: str
    after: str
    newly_flagged: bool


def requeue_claims(
    db: sqlite3.Connection, max_attempts: int, claimed_before: float | None = None
) -> tuple[int, list[int]]:
    """Take back claims whose worker is gone: re-queue them, or fail those out of attempts.

    A claim is a lease: a worker that crashed, hung or lost its database
    mid-batch never finishes its slices, so they come back to the queue. A
    slice claimed ``max_attempts`` times without a result fails with that
    reason instead, so one file that kills the worker cannot do so forever.

    Args:
        db: Connection inside the caller's transaction.
        max_attempts: Claims a slice may use up.
        claimed_before: Only claims older than this epoch time (an expired
            lease); None takes every claim (the only worker is starting).

    Returns:
        How many slices went back to the queue, and the studies whose slices failed.
    """
    cutoff = time.time() if claimed_before is None else claimed_before
    stale = db.execute(
        "SELECT id, study_id, attempts FROM slices WHERE status = 'processing' AND started_at <= ?",
        (cutoff,),
    ).fetchall()
    out_of_attempts = [r for r in stale if r["attempts"] >= max_attempts]
    for row in out_of_attempts:
        fail(
            db,
            row["id"],
            f"claimed {row['attempts']} times without a result "
            "(the worker stopped or lost its database each time)",
        )
    release(db, [r["id"] for r in stale if r["attempts"] < max_attempts])
    return len(stale) - len(out_of_attempts), sorted({r["study_id"] for r in out_of_attempts})


def claim(db: sqlite3.Connection, batch_size: int) -> list[sqlite3.Row]:
    """Mark up to ``batch_size`` queued slices ``processing`` and return them.

    The head of the queue is the most urgent priority (1 before 2), then the
    oldest; the batch takes slices of that priority only, oldest study first,
    so whole studies finish together.
    """
    head = db.execute(
        "SELECT priority FROM slices WHERE status = 'queued' "
        "ORDER BY priority, queued_at, id LIMIT 1"
    ).fetchone()
    if head is None:
        return []
    rows = db.execute(
        "SELECT * FROM slices WHERE status = 'queued' AND priority = ? "
        "ORDER BY queued_at, study_id, id LIMIT ?",
        (head["priority"], batch_size),
    ).fetchall()
    now = time.time()
    db.executemany(
        "UPDATE slices SET status = 'processing', started_at = ?, attempts = attempts + 1 "
        "WHERE id = ?",
        [(now, row["id"]) for row in rows],
    )
    return [db.execute("SELECT * FROM slices WHERE id = ?", (r["id"],)).fetchone() for r in rows]


def release(db: sqlite3.Connection, slice_ids: list[int], *, refund: bool = False) -> None:
    """Return claimed slices to the queue.

    Args:
        db: Connection inside the caller's transaction.
        slice_ids: Claimed slices.
        refund: Give the attempt back: the classifier was not there, so the
            slices were never tried (a Triton restart must not use them up).
    """
    db.executemany(
        "UPDATE slices SET status = 'queued', started_at = NULL, "
        "attempts = attempts - ? WHERE id = ? AND status = 'processing'",
        [(int(refund), i) for i in slice_ids],
    )


def finish(
    db: sqlite3.Connection,
    slice_id: int,
    probability: float,
    head_fraction: float,
    timings: SliceTimings,
) -> None:
    """Record a slice's probability and stage timings; it becomes ``classified``."""
    db.execute(
        "UPDATE slices SET status = 'classified', probability = ?, head_fraction = ?, "
        "error = NULL, finished_at = ?, decode_ms = ?, preprocess_ms = ?, queue_wait_ms = ?, "
        "inference_ms = ? WHERE id = ?",
        (
            probability,
            head_fraction,
            time.time(),
            timings.decode_ms,
            timings.preprocess_ms,
            timings.queue_wait_ms,
            timings.inference_ms,
            slice_id,
        ),
    )


def fail(db: sqlite3.Connection, slice_id: int, reason: str) -> None:
    """Mark a claimed slice ``failed`` with the reason shown to users (a finished one stays)."""
    db.execute(
        "UPDATE slices SET status = 'failed', error = ?, finished_at = ? "
        "WHERE id = ? AND status = 'processing'",
        (reason, time.time(), slice_id),
    )


def depth(db: sqlite3.Connection) -> dict[str, int]:
    """Number of slices in each state."""
    counts = dict.fromkeys(("queued", "processing", "classified", "failed"), 0)
    for row in db.execute("SELECT status, COUNT(*) AS n FROM slices GROUP BY status"):
        counts[row["status"]] = row["n"]
    return counts


def ordered_slices(db: sqlite3.Connection, study_id: int) -> list[sqlite3.Row]:
    """A study's slices in anatomical order: DICOM position, instance number, file name."""
    rows = db.execute("SELECT * FROM slices WHERE study_id = ?", (study_id,)).fetchall()
    return sorted(rows, key=_anatomical_key)


def refresh_study(db: sqlite3.Connection, study_id: int, spec: ModelSpec) -> StudyChange:
    """Recompute a study's status, score and key slice from its slices.

    Unfinished slices make it ``queued`` (none started) or ``processing``,
    unless the slices classified so far already flag it for good
    (:func:`client.series.early_flag`: a long series alerts before its last
    slice). Once every slice is done, :func:`client.series.decide_series`
    decides on the classified ones (the same decision as the command line); a
    study with no classified slice is ``failed``. An acknowledged study stays
    acknowledged.

    A flag is never downgraded by a later result (more slices, a re-decision):
    the study stays ``flagged``, first on the worklist, until a person
    acknowledges it. The later score is recorded beside ``flag_score``, the
    highest score that flagged it, so the study page can say it scored lower.

    Returns:
        The status before and after, and whether the study has just been flagged.
    """
    study = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
    slices = ordered_slices(db, study_id)
    states = {s["status"] for s in slices}
    now = time.time()
    score = threshold = key_slice_id = None
    finished_at = flagged_at = None
    scored = [s for s in slices if s["status"] == "classified"]
    probabilities = [s["probability"] for s in scored]
    head_fractions = [s["head_fraction"] for s in scored]
    if states & {"queued", "processing"}:
        started = bool(states - {"queued"})
        status = "processing" if started else "queued"
        early = early_flag(spec, probabilities, head_fractions)
        if early is not None:
            status, score, threshold = "flagged", early.score, early.threshold
            key_slice_id = scored[early.key_index]["id"]
            flagged_at = study["flagged_at"] or now
            if study["acknowledged_at"] is not None:
                status = "acknowledged"
    else:
        finished_at = now
        if not scored:
            status = "failed"
        else:
            decision = decide_series(spec, probabilities, head_fractions)
            score, threshold = decision.score, decision.threshold
            key_slice_id = scored[decision.key_index]["id"]
            status = "flagged" if decision.flagged else "negative"
            if status == "flagged":
                flagged_at = study["flagged_at"] or now
        if study["acknowledged_at"] is not None:
            status = "acknowledged"
    flag_score = study["flag_score"]
    if status == "flagged":
        flag_score = max(score, flag_score or score)
    elif study["flagged_at"] is not None:
        # Only :func:`reopen` clears a flag, after a person acknowledged it.
        flagged_at = study["flagged_at"]
        if study["acknowledged_at"] is None:
            status = "flagged"
            if score is None:  # new slices still in the queue: show what raised the flag
                score, threshold = study["score"], study["threshold"]
                key_slice_id = study["key_slice_id"]
    db.execute(
        "UPDATE studies SET status = ?, score = ?, threshold = ?, key_slice_id = ?, "
        "finished_at = ?, flagged_at = ?, flag_score = ?, model_name = ?, model_version = ?, "
        "updated_at = ? WHERE id = ?",
        (
            status,
            score,
            threshold,
            key_slice_id,
            finished_at,
            flagged_at,
            flag_score,
            spec.name,
            model_version(spec),
            now,
            study_id,
        ),
    )
    newly_flagged = status == "flagged" and study["flagged_at"] is None
    return StudyChange(study_id, study["status"], status, newly_flagged)


def reopen(db: sqlite3.Connection, study_id: int) -> None:
    """New slices arrived: an earlier acknowledgement no longer covers the study.

    A flag a person acknowledged is spent too, so the new slices get a fresh
    decision (and a new flag alerts again); a flag nobody acknowledged yet
    stands (see :func:`refresh_study`).
    """
    db.execute(
        "UPDATE studies SET flagged_at = CASE WHEN acknowledged_at IS NULL THEN flagged_at END, "
        "flag_score = CASE WHEN acknowledged_at IS NULL THEN flag_score END, "
        "acknowledged_at = NULL, acknowledged_by = NULL WHERE id = ?",
        (study_id,),
    )


def model_version(spec: ModelSpec) -> str:
    """Version shown with every result: the Triton version folder and the weights' hash."""
    return f"1 (weights {spec.trained.weights_sha256[:12]})"


def _anatomical_key(row: sqlite3.Row) -> tuple:
    """Sort key after :func:`client.classify._order_key`: position, instance, then name."""
    if row["slice_position_mm"] is not None:
        return (0, row["slice_position_mm"], row["id"])
    if row["instance_number"] is not None:
        return (1, row["instance_number"], row["id"])
    name = tuple(
        (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", row["filename"])
    )
    return (2, name, row["id"])
