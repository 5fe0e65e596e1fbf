"""The results outbox: result objects for the PACS, stored first, sent by C-STORE, retried.

Each object (a series' SR and its secondary capture, :mod:`console.results`)
is one ``outbox`` row, written as DICOM Part 10 bytes in the same transaction
that completes its series (console/completion.py), so a crash never loses a
result nor sends one that was not recorded. The results thread
(:class:`ResultsThread`) then sends the due rows to ``RESULTS_DESTINATION``
over one association per round. What can happen to a row:

- the PACS stores it (success or a warning status): ``sent``, and its bytes are
  dropped (PACS is the archive);
- the PACS cannot be reached, rejects or aborts the association, times out or
  answers "out of resources" (0xA7xx): still ``pending``, retried after an
  exponential backoff (``RESULTS_BACKOFF_INITIAL_S`` doubling up to
  ``RESULTS_BACKOFF_MAX_S``), however long it takes: a PACS that is down loses nothing;
- the PACS refuses the object itself (any other failure status): ``failed``
  with its status, since the same bytes would be refused again;
- the object could not be built (:func:`record_unbuilt`): ``failed`` from the
  start, with the reason, so the study page says why nothing was sent.

Every try counts in ``attempts`` and leaves its reason in ``last_error``; the
study page, the study JSON and ``/metrics`` show them. A crash between the
PACS's answer and the commit sends that object again on restart, with the same
SOP Instance UID, which a PACS keeps once.

    thread = ResultsThread(settings, complete=..., changed=...)
    thread.start()
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from console.db import Connection, begin_write, connect
from console.dicom_node import DicomPeer
from console.threads import LoopThread

logger = logging.getLogger(__name__)

#: Delivery states of an outbox row.
STATES = ("pending", "sent", "failed")
#: Objects sent per association (and per round).
_BATCH = 32
#: Backoff doublings counted at most (2**30 s is far past any RESULTS_BACKOFF_MAX_S).
_MAX_DOUBLINGS = 30
#: C-STORE statuses (PS3.4 Table B.2-1): 0xA7xx out of resources is worth retrying.
_OUT_OF_RESOURCES = 0xA700
_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class OutboxSettings:
    """The results thread's part of the app config.

    Attributes:
        database: The SQLite file or PostgreSQL URL.
        busy_timeout_s: How long a write waits for another writer.
        destination: ``RESULTS_DESTINATION``, or None: results are not made nor sent.
        calling_ae: Our AE title, as the PACS sees us.
        poll_s: Longest wait between rounds.
        backoff_initial_s: Wait after a row's first failed try.
        backoff_max_s: Longest wait between tries.
        timeout_s: Connection, association and DIMSE timeout.
    """

    database: str
    busy_timeout_s: float
    destination: DicomPeer | None
    calling_ae: str
    poll_s: float
    backoff_initial_s: float
    backoff_max_s: float
    timeout_s: float


def destination_name(peer: DicomPeer) -> str:
    """``AE@host:port``, as rows record where they go."""
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def enqueue(
    db: Connection,
    study_id: int,
    version: int,
    kind: str,
    dataset: Dataset,
    destination: DicomPeer,
) -> None:
    """Add one object to the outbox, due now (inside the caller's transaction).

    Args:
        db: Connection inside the completing transaction.
        study_id: The study it reports on.
        version: The series' result version.
        kind: ``sr`` or ``sc``.
        dataset: The object; stored as Part 10 bytes.
        destination: Where it goes.
    """
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    now = time.time()
    db.execute(
        "INSERT INTO outbox (study_id, version, kind, sop_class_uid, sop_uid, destination, "
        "dataset, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            study_id,
            version,
            kind,
            str(dataset.SOPClassUID),
            str(dataset.SOPInstanceUID),
            destination_name(destination),
            buffer.getvalue(),
            now,
            now,
        ),
    )


def record_unbuilt(
    db: Connection,
    study_id: int,
    version: int,
    kind: str,
    error: str,
    destination: DicomPeer,
) -> None:
    """Record an object that could not be built: a ``failed`` row with the reason, no bytes."""
    now = time.time()
    db.execute(
        "INSERT INTO outbox (study_id, version, kind, destination, status, last_error, "
        "next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'failed', ?, ?, ?)",
        (study_id, version, kind, destination_name(destination), error, now, now),
    )


def delivery(db: Connection, study_id: int) -> list[dict]:
    """A study's result objects and their delivery state, newest version first."""
    rows = db.execute(
        "SELECT version, kind, sop_uid, destination, status, attempts, last_error, "
        "created_at, sent_at FROM outbox WHERE study_id = ? ORDER BY version DESC, id",
        (study_id,),
    )
    return [dict(row) for row in rows]


def counts(db: Connection) -> dict[str, int]:
    """Outbox rows in each state (``/metrics``)."""
    found = dict.fromkeys(STATES, 0)
    for row in db.execute("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status"):
        found[row["status"]] = row["n"]
    return found


def deliver_due(db: Connection, settings: OutboxSettings) -> set[int]:
    """Send the rows that are due over one association and record each outcome.

    The rows are taken in a write transaction that moves their next attempt
    past the longest the sending may take, a lease: another node's results
    thread sharing the database passes over them, so each is sent by one node,
    and a node that dies mid-send leaves them due again once the lease ends.

    Args:
        db: A connection (not inside a transaction).
        settings: Where to send, timeouts and backoff.

    Returns:
        The studies whose rows changed state or attempts.
    """
    peer = settings.destination
    if peer is None:
        return set()
    due = (
        "SELECT id, study_id, attempts, dataset FROM outbox WHERE status = 'pending' "
        "AND destination = ? AND next_attempt_at <= ? ORDER BY id LIMIT ?"
    )
    if not db.execute(due, (destination_name(peer), time.time(), 1)).fetchall():
        return set()  # the usual case: no write lock taken
    with db:
        begin_write(db)
        now = time.time()
        rows = db.execute(due, (destination_name(peer), now, _BATCH)).fetchall()
        # Associating, then one C-STORE per row, each bounded by timeout_s.
        lease_until = now + settings.timeout_s * (len(rows) + 2)
        db.executemany(
            "UPDATE outbox SET next_attempt_at = ? WHERE id = ?",
            [(lease_until, row["id"]) for row in rows],
        )
    if not rows:
        return set()
    outcomes = _send(settings, [row["dataset"] for row in rows])
    now = time.time()
    with db:
        for row, (state, error) in zip(rows, outcomes, strict=True):
            attempts = row["attempts"] + 1
            if state == "sent":
                db.execute(
                    "UPDATE outbox SET status = 'sent', attempts = ?, sent_at = ?, "
                    "dataset = NULL WHERE id = ?",
                    (attempts, now, row["id"]),
                )
                continue
            # The exponent is capped: a PACS down for days must not overflow the float.
            doubling = 2 ** min(attempts - 1, _MAX_DOUBLINGS)
            wait_s = min(settings.backoff_initial_s * doubling, settings.backoff_max_s)
            db.execute(
                "UPDATE outbox SET status = ?, attempts = ?, last_error = ?, "
                "next_attempt_at = ? WHERE id = ?",
                (state, attempts, error, now + wait_s, row["id"]),
            )
    sent = sum(state == "sent" for state, _ in outcomes)
    log = logger.info if sent == len(rows) else logger.warning
    log(
        "results to %s: %d of %d sent (%s)",
        destination_name(peer),
        sent,
        len(rows),
        "; ".join(sorted({e for _, e in outcomes if e})) or "all stored",
    )
    return {row["study_id"] for row in rows}


def _send(settings: OutboxSettings, blobs: list[bytes]) -> list[tuple[str, str | None]]:
    """C-STORE each Part 10 object; ``(state, error)`` per object, in order."""
    peer = settings.destination
    ae = AE(ae_title=settings.calling_ae)
    ae.connection_timeout = ae.acse_timeout = settings.timeout_s
    ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "could not be reached"
        return [("pending", f"{destination_name(peer)} {reason}")] * len(blobs)
    outcomes = []
    try:
        for blob in blobs:
            if not assoc.is_established:  # aborted mid-round: the rest wait for the next
                outcomes.append(("pending", f"{destination_name(peer)} aborted the association"))
                continue
            status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(blob)))
            outcomes.append(_outcome(status, peer))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _outcome(status: Dataset, peer: DicomPeer) -> tuple[str, str | None]:
    """What a C-STORE response means for the row: sent, retried, or refused for good."""
    if "Status" not in status:  # no answer: timed out or aborted
        return "pending", f"{destination_name(peer)} did not answer the C-STORE"
    code = int(status.Status)
    if code == 0x0000 or code in _WARNINGS:
        return "sent", None
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    error = f"{destination_name(peer)} answered 0x{code:04X}{comment}"
    return ("pending" if code & 0xFF00 == _OUT_OF_RESOURCES else "failed"), error


class ResultsThread:
    """One thread: complete quiet series (enqueuing their results), then deliver due rows.

    Args:
        settings: Database, destination, backoff and timeouts.
        complete: Completes the quiet series and enqueues their objects; returns their studies.
        changed: Told the studies whose completion or delivery changed (for the screens).
    """

    def __init__(
        self,
        settings: OutboxSettings,
        complete: Callable[[Connection], set[int]],
        changed: Callable[[Connection, set[int]], None],
    ) -> None:
        self.settings = settings
        self._complete = complete
        self._changed = changed
        self._thread = LoopThread("hemotriage-results", self._loop)
        #: The latest failed round, ``Class: message`` ("" before any), for ``/readyz``.
        self.last_error = ""

    def start(self) -> None:
        """Run the loop in a daemon thread (once)."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current round (an association in progress finishes first)."""
        self._thread.stop(timeout_s)

    def is_alive(self) -> bool:
        """The loop thread runs (False before start, after stop, or if it died)."""
        return self._thread.is_alive()

    def run_once(self, db: Connection) -> set[int]:
        """One round: complete quiet series, then send what is due; returns studies changed."""
        changed = self._complete(db)
        changed |= deliver_due(db, self.settings)
        return changed

    def _loop(self, stop: threading.Event) -> None:
        db = connect(self.settings.database, self.settings.busy_timeout_s)
        try:
            while not stop.wait(self.settings.poll_s):
                try:
                    changed = self.run_once(db)
                except Exception as e:
                    # A locked database or a bug in one round must not end the thread
                    # (the rows stay in the outbox): record it, try again next round.
                    logger.exception("results round failed")
                    self.last_error = f"{type(e).__name__}: {e}"
                    continue
                if changed:
                    self._changed(db, changed)
        finally:
            db.close()
