"""The persistent priority queue: slice rows in the database, claimed in batches.

A slice moves ``queued -> processing -> classified | failed``. Claiming, releasing
and finishing are each one transaction, so a crash leaves at worst some rows
``processing``. A claim is a lease held by one node: :func:`requeue_claims`
takes back a starting node's own claims and, on any node, expired ones; a
slice that used up its attempts fails with the reason instead of coming back
forever, and a result is recorded only under the claim that was taken for it.
A study's status follows from its slices (:func:`refresh_study`).

    with db:
        begin_write(db, row_locks=True)
        rows = claim(db, batch_size=16, node="ct-node-1")
    ...
    with db:
        begin_write(db)
        finish(db, row["id"], 0.93, 0.4, timings, claim_token=row["claim_token"])
        refresh_study(db, row["study_id"], spec)

A model that decides series with its series model asks Triton for it: do that
before the write transaction (:func:`prefetch_series`), never inside it.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from client.errors import HemoTriageError
from client.registry import ModelSpec
from client.series import (
    SERIES_MODEL_RULE,
    SeriesRefiner,
    decide_series,
    early_flag,
    series_features,
)
from console.db import Connection, Row

#: Study states that mean "a person still has to look at the result".
FINISHED = ("flagged", "negative", "failed", "acknowledged")


@dataclass(frozen=True)
class SliceTimings:
    """Per-stage latencies of one slice (milliseconds) and when its batch passed each stage.

    ``handoff_ms`` is how long the prepared batch waited for the classifier
    (busy with the batch before); ``prepared_at`` and ``inferred_at`` (epoch
    seconds) place the batch's preparation and inference on a timeline.
    """

    decode_ms: float
    preprocess_ms: float
    queue_wait_ms: float
    inference_ms: float
    handoff_ms: float = 0.0
    prepared_at: float | None = None
    inferred_at: float | None = None


@dataclass(frozen=True)
class StudyChange:
    """A study's status before and after :func:`refresh_study`."""

    study_id: int
    before: str
    after: str
    newly_flagged: bool


def requeue_claims(
    db: Connection, max_attempts: int, claimed_before: float, node: str | None = None
) -> tuple[int, list[int]]:
    """Take back claims whose worker is gone: re-queue them, or fail those out of attempts.

    A claim is a lease: a worker that crashed, hung or lost its database
    mid-batch never finishes its slices, so they come back to the queue. Any
    node takes back expired leases; a starting node also takes back its own
    earlier claims (and those of releases before claims named their node),
    never another live node's. A slice claimed ``max_attempts`` times without
    a result fails with that reason instead, so one file that kills the
    worker cannot do so forever.

    Args:
        db: Connection inside the caller's write transaction.
        max_attempts: Claims a slice may use up.
        claimed_before: Claims older than this epoch time have expired.
        node: A starting node's id: its claims are taken back whatever their age.

    Returns:
        How many slices went back to the queue, and the studies whose slices failed.
    """
    stale = expired_claims(db, claimed_before, node)
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


def expired_claims(db: Connection, claimed_before: float, node: str | None = None) -> list[Row]:
    """The claims :func:`requeue_claims` would take back: each slice's id, study and attempts."""
    return db.execute(
        "SELECT id, study_id, attempts FROM slices WHERE status = 'processing' AND "
        "(started_at <= ? OR COALESCE(claimed_by, ?) = ?)",
        (claimed_before, node, node),
    ).fetchall()


def has_queued(db: Connection) -> bool:
    """Whether any slice waits, read without taking the write lock an idle poll does not need."""
    with db:
        return (
            db.execute("SELECT 1 FROM slices WHERE status = 'queued' LIMIT 1").fetchone()
            is not None
        )


def claim(db: Connection, batch_size: int, node: str) -> list[Row]:
    """Mark up to ``batch_size`` queued slices ``processing`` and return them.

    The head of the queue is the most urgent priority (1 before 2), then the
    oldest; the batch takes slices of that priority only, oldest study first,
    so whole studies finish together. Each claim carries ``node`` and a new
    ``claim_token``; pass the token to :func:`finish`, :func:`fail` and
    :func:`release`, so a worker whose lease was taken back changes nothing.

    On PostgreSQL several nodes claim at once: ``FOR UPDATE SKIP LOCKED``
    passes over rows another transaction is claiming, so batches are disjoint
    without a database-wide lock (call inside ``with db:`` after
    ``begin_write(db, row_locks=True)``). SQLite has one writer anyway.
    """
    head = db.execute(
        "SELECT priority FROM slices WHERE status = 'queued' "
        "ORDER BY priority, queued_at, id LIMIT 1"
    ).fetchone()
    if head is None:
        return []
    lock = " FOR UPDATE SKIP LOCKED" if db.engine == "postgresql" else ""
    rows = db.execute(
        "SELECT id FROM slices WHERE status = 'queued' AND priority = ? "
        f"ORDER BY queued_at, study_id, id LIMIT ?{lock}",
        (head["priority"], batch_size),
    ).fetchall()
    now = time.time()
    token = uuid.uuid4().hex
    db.executemany(
        "UPDATE slices SET status = 'processing', started_at = ?, attempts = attempts + 1, "
        "claimed_by = ?, claim_token = ? WHERE id = ?",
        [(now, node, token, row["id"]) for row in rows],
    )
    return [db.execute("SELECT * FROM slices WHERE id = ?", (r["id"],)).fetchone() for r in rows]


#: The fence of a claimed slice's update: still claimed, and (with a token) by this claim.
_CLAIMED = "status = 'processing' AND (CAST(? AS TEXT) IS NULL OR claim_token = ?)"


def release(
    db: Connection, slice_ids: list[int], *, refund: bool = False, claim_token: str | None = None
) -> None:
    """Return claimed slices to the queue.

    Args:
        db: Connection inside the caller's transaction.
        slice_ids: Claimed slices.
        refund: Give the attempt back: the classifier was not there, so the
            slices were never tried (a Triton restart must not use them up).
        claim_token: Only slices still held by this claim (None: any claim).
    """
    db.executemany(
        "UPDATE slices SET status = 'queued', started_at = NULL, claimed_by = NULL, "
        f"claim_token = NULL, attempts = attempts - ? WHERE id = ? AND {_CLAIMED}",
        [(int(refund), i, claim_token, claim_token) for i in slice_ids],
    )


def finish(
    db: Connection,
    slice_id: int,
    probability: float,
    head_fraction: float,
    timings: SliceTimings,
    claim_token: str | None = None,
) -> bool:
    """Record a slice's probability and stage timings; it becomes ``classified``.

    Args:
        db: Connection inside the caller's write transaction.
        slice_id: The claimed slice.
        probability: The model's output for it.
        head_fraction: Share of the image that is head (near-blank slices are ignored).
        timings: Its stage latencies.
        claim_token: The claim's token: a lease taken back since (the slice
            re-queued, or claimed by another worker) refuses the result, so a
            slice is never classified twice. None: any claim.

    Returns:
        Whether the result was recorded.
    """
    return (
        db.execute(
            "UPDATE slices SET status = 'classified', probability = ?, head_fraction = ?, "
            "error = NULL, finished_at = ?, decode_ms = ?, preprocess_ms = ?, "
            "queue_wait_ms = ?, inference_ms = ?, handoff_ms = ?, prepared_at = ?, "
            f"inferred_at = ? WHERE id = ? AND {_CLAIMED}",
            (
                probability,
                head_fraction,
                time.time(),
                timings.decode_ms,
                timings.preprocess_ms,
                timings.queue_wait_ms,
                timings.inference_ms,
                timings.handoff_ms,
                timings.prepared_at,
                timings.inferred_at,
                slice_id,
                claim_token,
                claim_token,
            ),
        ).rowcount
        == 1
    )


def fail(db: Connection, slice_id: int, reason: str, claim_token: str | None = None) -> bool:
    """Mark a claimed slice ``failed`` with the reason shown to users (a finished one stays).

    Returns:
        Whether it was marked (False: not claimed, or not by ``claim_token``'s claim).
    """
    return (
        db.execute(
            f"UPDATE slices SET status = 'failed', error = ?, finished_at = ? "
            f"WHERE id = ? AND {_CLAIMED}",
            (reason, time.time(), slice_id, claim_token, claim_token),
        ).rowcount
        == 1
    )


def depth(db: Connection) -> dict[str, int]:
    """Number of slices in each state."""
    counts = dict.fromkeys(("queued", "processing", "classified", "failed"), 0)
    for row in db.execute("SELECT status, COUNT(*) AS n FROM slices GROUP BY status"):
        counts[row["status"]] = row["n"]
    return counts


def ordered_slices(db: Connection, study_id: int) -> list[Row]:
    """A study's slices in anatomical order: DICOM position, instance number, file name."""
    rows = db.execute("SELECT * FROM slices WHERE study_id = ?", (study_id,)).fetchall()
    return sorted(rows, key=_anatomical_key)


def refresh_study(
    db: Connection, study_id: int, spec: ModelSpec, refiner: SeriesRefiner | None = None
) -> StudyChange:
    """Recompute a study's status, score and key slice from its slices.

    Unfinished slices make it ``queued`` (none started) or ``processing``,
    unless the slices classified so far already flag it for good
    (:func:`client.series.early_flag`: a long series alerts before its last
    slice). Once every slice is done, :func:`client.series.decide_series`
    decides on the classified ones (the same decision as the command line),
    through ``refiner`` (the worker's classifier) where the model's rule is its
    series model, whose refined slice probabilities are kept for the study page;
    a study with no classified slice is ``failed``. An acknowledged study stays
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
            decision = decide_series(spec, probabilities, head_fractions, refiner)
            score, threshold = decision.score, decision.threshold
            if any(s["refined_probability"] is not None for s in scored):
                db.execute(  # an earlier decision's line, if the rule or its outcome changed
                    "UPDATE slices SET refined_probability = NULL WHERE study_id = ?", (study_id,)
                )
            if decision.refined is not None:  # only the series model writes per slice
                db.executemany(
                    "UPDATE slices SET refined_probability = ? WHERE id = ?",
                    [(r, s["id"]) for r, s in zip(decision.refined, scored, strict=True)],
                )
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


class PrefetchedSeries:
    """A series refiner whose answers were fetched before the write transaction.

    The series model is a call to Triton, retried while the server is down
    (seconds). Made inside the commit, it would hold the database's write lock
    that long: on SQLite every upload and claim would wait for it. The answer
    (or the error, so that a fallback inside is immediate) is kept per series
    features; features that changed in between (another batch finished a slice
    of the study) are asked for inside after all, so a decision always reads
    the committed slices.
    """

    def __init__(self, refiner: SeriesRefiner) -> None:
        self._refiner = refiner
        self._answers: dict[tuple, tuple[np.ndarray, float] | HemoTriageError] = {}

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """The series model's answer for ``features``, asked once."""
        key = (features.shape, features.tobytes())
        if key not in self._answers:
            try:
                self._answers[key] = self._refiner.refine_series(features)
            except HemoTriageError as e:
                self._answers[key] = e
        answer = self._answers[key]
        if isinstance(answer, HemoTriageError):
            raise answer
        return answer


def asks_series_model(spec: ModelSpec, refiner: SeriesRefiner | None) -> bool:
    """Whether deciding ``spec``'s studies calls its series model (else nothing to prefetch)."""
    return refiner is not None and spec.series_rule == SERIES_MODEL_RULE


def prefetch_series(
    db: Connection,
    spec: ModelSpec,
    refiner: SeriesRefiner | None,
    study_ids: Iterable[int],
    outcomes: Mapping[int, tuple[float, float] | None],
) -> SeriesRefiner | None:
    """Ask the series model, outside any transaction, about the studies these outcomes finish.

    Args:
        db: Connection with no transaction open (the slices are read in their own).
        spec: The model; other rules than :data:`client.series.SERIES_MODEL_RULE`
            need no series model, and ``refiner`` comes back as it is.
        refiner: The worker's classifier, or None.
        study_ids: Studies the coming transaction will refresh.
        outcomes: Slice id to the (probability, head fraction) about to be
            recorded, or None for a slice about to fail.

    Returns:
        The refiner to pass to :func:`refresh_study` inside the transaction.
    """
    if not asks_series_model(spec, refiner):
        return refiner
    prefetched = PrefetchedSeries(refiner)
    for study_id in study_ids:
        with db:
            slices = ordered_slices(db, study_id)
        classified = []
        for s in slices:
            if s["id"] in outcomes:
                if outcomes[s["id"]] is not None:
                    classified.append(outcomes[s["id"]])
            elif s["status"] in ("queued", "processing"):
                break  # not finished by this transaction: nothing to decide yet
            elif s["status"] == "classified":
                classified.append((s["probability"], s["head_fraction"]))
        else:
            if len(classified) > 1:  # a lone image keeps its slice probability
                probabilities, head_fractions = zip(*classified, strict=True)
                features = series_features(probabilities, head_fractions)
                with contextlib.suppress(HemoTriageError):  # kept: refresh_study falls back
                    prefetched.refine_series(features)
    return prefetched


def reopen(db: Connection, study_id: int) -> None:
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


def _anatomical_key(row: Row) -> tuple:
    """Sort key after :func:`client.classify._order_key`: position, instance, then name."""
    if row["slice_position_mm"] is not None:
        return (0, row["slice_position_mm"], row["id"])
    if row["instance_number"] is not None:
        return (1, row["instance_number"], row["id"])
    name = tuple(
        (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", row["filename"])
    )
    return (2, name, row["id"])
