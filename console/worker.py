"""The queue worker: one thread that turns queued slices into scores.

Each round claims a batch from :mod:`console.queue`, decodes and preprocesses
the stored files with :mod:`client.preprocess`, sends the batch to the
classifier in one ``predict`` call (Triton by default, see
:func:`build_classifier`) and commits the results.

Nothing can hold the queue: while the classifier is unreachable
(:class:`~client.errors.ServerUnavailableError`, or a model that is not
ready) the claimed slices go back to the queue with their attempt refunded
and the worker waits with exponential backoff, then resumes by itself. Any
other failure between claim and commit (a timeout, an error answer from the
server, a full disk, a locked database, a bug) gives the batch back too, but
uses up an attempt: after ``MAX_INFERENCE_ATTEMPTS`` a slice is ``failed``
with the reason and the studies behind it keep flowing. Claims are leases:
on start (this node's earlier claims), and every ``LEASE_CHECK_S`` (any
node's claims older than ``CLAIM_LEASE_S``), :func:`console.queue.requeue_claims`
takes back work nobody finished. Several nodes may share a PostgreSQL
database: each claims its own batches, and a result whose lease was taken
back is refused, never recorded twice.

    worker = QueueWorker(settings, broker, metrics, build_classifier)
    worker.start()        # or worker.run_once() from a test
    ...
    worker.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.classify import Classifier, LocalClassifier
from client.decode import decode_file
from client.errors import (
    HemoTriageError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from client.preprocess import head_fraction, model_input, model_view
from client.registry import ModelSpec, get_model
from client.triton_pool import ServerStatus
from console import queue
from console.db import begin_write, connect
from console.events import EventBroker, publish_study
from console.filestore import stored_path
from console.metrics import ConsoleMetrics

logger = logging.getLogger(__name__)

#: Failures that mean "the server is not there yet": wait and retry, without using attempts.
_UNAVAILABLE = (ServerUnavailableError, ModelNotReadyError)
#: Kinds of classifier :func:`build_classifier` can make.
CLASSIFIER_KINDS = ("triton", "local")


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's part of the app config (see :func:`console.create_app`)."""

    database: str
    busy_timeout_s: float
    storage_dir: Path
    model_name: str
    classifier: str
    triton_url: str
    triton_protocol: str
    triton_timeout_s: float
    batch_size: int
    poll_s: float
    backoff_initial_s: float
    backoff_max_s: float
    max_attempts: int
    lease_s: float
    lease_check_s: float
    node_id: str = ""

    @classmethod
    def from_config(cls, config: dict) -> WorkerSettings:
        """Read the ``create_app`` config keys."""
        return cls(
            database=str(config["DATABASE"]),
            busy_timeout_s=float(config["DATABASE_BUSY_TIMEOUT_S"]),
            storage_dir=Path(config["STORAGE_DIR"]),
            model_name=config["MODEL_NAME"],
            classifier=config["CLASSIFIER"],
            triton_url=config["TRITON_URL"],
            triton_protocol=config["TRITON_PROTOCOL"],
            triton_timeout_s=float(config["TRITON_TIMEOUT_S"]),
            batch_size=int(config["BATCH_SIZE"]),
            poll_s=float(config["WORKER_POLL_S"]),
            backoff_initial_s=float(config["BACKOFF_INITIAL_S"]),
            backoff_max_s=float(config["BACKOFF_MAX_S"]),
            max_attempts=int(config["MAX_INFERENCE_ATTEMPTS"]),
            lease_s=float(config["CLAIM_LEASE_S"]),
            lease_check_s=float(config["LEASE_CHECK_S"]),
            node_id=str(config["NODE_ID"]),
        )


def build_classifier(settings: WorkerSettings) -> Classifier:
    """The configured classifier: Triton (``url`` + ``protocol``) or in-process torch.

    Raises:
        ServerUnavailableError, ModelNotReadyError: Triton is down or lacks the model.
        UnknownModelError: ``model_name`` is not registered.
        ValueError: an unknown classifier kind.
    """
    spec = get_model(settings.model_name)
    if settings.classifier == "triton":
        from client.triton_client import TritonClassifier

        return TritonClassifier(
            spec,
            url=settings.triton_url,
            protocol=settings.triton_protocol,
            timeout_s=settings.triton_timeout_s,
        )
    if settings.classifier == "local":
        return LocalClassifier(spec)
    raise ValueError(f"CLASSIFIER must be one of {CLASSIFIER_KINDS}, got {settings.classifier!r}")


@dataclass
class WorkerState:
    """What ``/readyz``, ``/metrics`` and the status bar show about the worker.

    Attributes:
        classifier_ready: The classifier answered last time it was asked.
        last_error: The latest failure, ``Class: message`` ("" before any).
        last_error_at: When it happened (epoch seconds; 0 before any).
        backoff_s: The wait after the latest failure (0 while all is well).
        heartbeat_at: When the loop last came round (a stalled loop stops it).
    """

    classifier_ready: bool = False
    last_error: str = ""
    last_error_at: float = 0.0
    backoff_s: float = 0.0
    heartbeat_at: float = 0.0


class QueueWorker:
    """Background batch classification of the persistent queue.

    Args:
        settings: Paths, model and batching.
        broker: Where study updates are published for the SSE stream.
        metrics: Stage latencies, outcomes and time-to-alert are recorded here.
        classifier_factory: Builds the classifier; called again after it failed.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        broker: EventBroker,
        metrics: ConsoleMetrics,
        classifier_factory: Callable[[WorkerSettings], Classifier] = build_classifier,
    ):
        self.settings = settings
        self.spec: ModelSpec = get_model(settings.model_name)
        self.state = WorkerState()
        self._broker = broker
        self._metrics = metrics
        self._factory = classifier_factory
        self._classifier: Classifier | None = None
        self._classifier_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db = None
        self._next_lease_check = 0.0
        self._took_back_earlier_claims = False
        metrics.watch_triton(self.triton_servers)

    def start(self) -> None:
        """Run the loop in a daemon thread (once).

        Its first round takes back every claim an earlier run of this node
        left (a node runs one worker, so none of its claims can be live then)
        and expired ones of other nodes; it runs in the loop, so a database
        that is locked or on a full disk at start delays it instead of
        stopping the console from starting.
        """
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="hemotriage-worker", daemon=True)
        self.state.heartbeat_at = time.time()
        self._thread.start()

    def is_alive(self) -> bool:
        """The loop thread runs (False before start, after stop, or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def requeue_claims(self, starting: bool = False) -> int:
        """Take back leases that ran out (older than ``lease_s``), of any node.

        Args:
            starting: This node is starting: take back its own claims of any age too.
                A SQLite queue has one node, so then every claim (a container that
                came back under a new host name still finds its claims at once).

        Returns:
            How many slices went back to the queue.
        """
        db = self._connection()
        now = time.time()
        only_node = starting and db.engine == "sqlite"
        with db:
            begin_write(db)
            requeued, failed_studies = queue.requeue_claims(
                db,
                self.settings.max_attempts,
                claimed_before=now if only_node else now - self.settings.lease_s,
                node=self.settings.node_id if starting else None,
            )
            changes = [queue.refresh_study(db, sid, self.spec) for sid in failed_studies]
        if requeued or failed_studies:
            logger.warning(
                "took back unfinished claims: %d slices re-queued, %d studies with failed slices",
                requeued,
                len(failed_studies),
            )
        for change in changes:
            publish_study(self._broker, change)
        return requeued

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current batch, stop the thread and close the classifier."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._classifier_lock:
            classifier, self._classifier = self._classifier, None
        # TritonClassifier holds connections (and gRPC threads); LocalClassifier holds none.
        close = getattr(classifier, "close", None)
        if close is not None:
            close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def wake(self) -> None:
        """New work arrived: skip the idle poll wait (not the backoff)."""
        self._wake.set()

    def classifier(self) -> Classifier:
        """The classifier, built on first use and after a failure.

        Raises:
            ServerUnavailableError, ModelNotReadyError: it cannot be built now.
        """
        with self._classifier_lock:
            if self._classifier is None:
                try:
                    self._classifier = self._factory(self.settings)
                except _UNAVAILABLE as e:
                    self._mark_unavailable(e)
                    raise
                self.state.classifier_ready = True
                self._metrics.classifier_up.set(1)
            return self._classifier

    def triton_servers(self) -> tuple[ServerStatus, ...]:
        """Each Triton server's state in the current classifier (none while unbuilt or local)."""
        servers = getattr(self._classifier, "servers", None)  # no lock: a scrape never waits
        return servers() if servers is not None else ()

    def run_once(self) -> int:
        """Classify one batch; return how many slices it finished (0: queue empty).

        Raises:
            ServerUnavailableError, ModelNotReadyError: the classifier is
                unreachable; the batch went back to the queue, attempts refunded.
            Exception: anything else between claim and commit; the batch went
                back to the queue (or failed, for slices out of attempts).
        """
        classifier = self.classifier()
        db = self._connection()
        with db:
            begin_write(db, row_locks=True)
            rows = queue.claim(db, self.settings.batch_size, self.settings.node_id)
        if not rows:
            return 0
        try:
            return self._classify(db, classifier, rows)
        except _UNAVAILABLE as e:
            self._drop_classifier(e)
            self._give_back(rows, e, refund=True)
            raise
        except BaseException as e:
            if isinstance(e, HemoTriageError):
                self._drop_classifier(e)  # rebuilt next round: checks the model again
            self._give_back(rows, e, refund=False)
            raise

    def _classify(self, db, classifier: Classifier, rows) -> int:
        claimed_at = time.time()
        prepared, failed = self._prepare(rows)
        probabilities = np.empty(0, dtype=np.float32)
        inference_ms = 0.0
        if prepared:
            batch = np.stack([p[1] for p in prepared])
            priority = min(r["priority"] for r, *_ in prepared)
            start = time.perf_counter()
            probabilities = classifier.predict(batch, priority=priority)
            inference_ms = (time.perf_counter() - start) * 1000 / len(prepared)
        self._commit(db, rows, prepared, failed, probabilities, inference_ms, claimed_at)
        return len(rows)

    def _give_back(self, rows, error: BaseException, refund: bool) -> None:
        """Return a batch that did not finish: re-queued, or failed once out of attempts.

        If even this fails (the database is locked or gone), the claims stay
        ``processing`` and the lease timer takes them back later.
        """
        reason = f"{type(error).__name__}: {error}"
        retry = [r["id"] for r in rows if refund or r["attempts"] < self.settings.max_attempts]
        give_up = [
            (r, f"gave up after {r['attempts']} attempts; last: {reason}")
            for r in rows
            if not refund and r["attempts"] >= self.settings.max_attempts
        ]
        try:
            db = self._connection()
            with db:
                begin_write(db)
                queue.release(db, retry, refund=refund, claim_token=rows[0]["claim_token"])
                failed = self._finish_failed(db, give_up)
                changes = [
                    queue.refresh_study(db, sid, self.spec)
                    for sid in sorted({r["study_id"] for r, _ in give_up})
                ]
        except Exception:
            logger.exception("could not give back %d claimed slices; their lease will", len(rows))
            return
        logger.warning(
            "batch not finished (%s): %d slices re-queued, %d failed",
            type(error).__name__,
            len(retry),
            len(give_up),
        )
        self._metrics.slices.labels("failed").inc(failed)
        for change in changes:
            publish_study(self._broker, change)

    def _prepare(self, rows):
        """Decode and preprocess claimed slices; a file that no longer decodes fails alone."""
        prepared, failed = [], []
        for row in rows:
            try:
                start = time.perf_counter()
                image = decode_file(stored_path(self.settings.storage_dir, row["stored_path"]))
                decoded = time.perf_counter()
                view = model_view(image, self.spec)
                tensor = model_input(view)
                done = time.perf_counter()
            except (HemoTriageError, OSError) as e:
                logger.warning(
                    "slice %d of study %d failed to preprocess: %s",
                    row["id"],
                    row["study_id"],
                    type(e).__name__,
                )
                failed.append((row, f"could not read the stored file: {e}"))
                continue
            timings = ((decoded - start) * 1000, (done - decoded) * 1000)
            prepared.append((row, tensor, head_fraction(view), timings))
        return prepared, failed

    def _commit(self, db, rows, prepared, failed, probabilities, inference_ms, claimed_at):
        """Record the batch's results in one transaction, then tell the screens.

        A non-finite probability (a broken model or input) fails its slice: it
        must never count as a negative.
        """
        scored = []
        for item, p in zip(prepared, probabilities, strict=True):
            if np.isfinite(p):
                scored.append((item, p))
            else:
                failed.append((item[0], f"the model returned a non-finite probability ({p})"))
        classified = 0
        with db:
            begin_write(db)
            for (row, _, head, (decode_ms, preprocess_ms)), p in scored:
                wait_ms = (row["started_at"] - row["queued_at"]) * 1000
                timings = queue.SliceTimings(decode_ms, preprocess_ms, wait_ms, inference_ms)
                if not queue.finish(db, row["id"], float(p), head, timings, row["claim_token"]):
                    continue
                classified += 1
                for stage, ms in (
                    ("decode", decode_ms),
                    ("preprocess", preprocess_ms),
                    ("queue_wait", wait_ms),
                    ("inference", inference_ms),
                ):
                    self._metrics.stage_seconds.labels(stage).observe(ms / 1000)
            failed_count = self._finish_failed(db, failed)
            changes = [
                queue.refresh_study(db, sid, self.spec)
                for sid in sorted({r["study_id"] for r in rows})
            ]
        if classified + failed_count < len(rows):
            logger.warning(
                "%d results refused: their lease ran out and the slices were taken back",
                len(rows) - classified - failed_count,
            )
        self._metrics.slices.labels("classified").inc(classified)
        self._metrics.slices.labels("failed").inc(failed_count)
        for change in changes:
            study = db.execute("SELECT * FROM studies WHERE id = ?", (change.study_id,)).fetchone()
            if change.newly_flagged:
                alert_s = study["flagged_at"] - study["received_at"]
                if self._broker.alerts:  # shadow mode flags without alerting anyone
                    self._metrics.time_to_alert_seconds.observe(alert_s)
                logger.warning(
                    "study %d (%s) FLAGGED: score %.3f >= %.3f, %.2f s after upload",
                    study["id"],
                    study["study_uid"] or "no UID",
                    study["score"],
                    study["threshold"],
                    alert_s,
                )
            publish_study(self._broker, change)
        logger.info(
            "classified %d slices (%d failed) in %.1f ms/slice, claimed %.0f ms ago",
            classified,
            failed_count,
            inference_ms,
            (time.time() - claimed_at) * 1000,
        )

    def _finish_failed(self, db, failed) -> int:
        """Fail each slice under its claim; how many were still held by it."""
        return sum(queue.fail(db, row["id"], reason, row["claim_token"]) for row, reason in failed)

    def _drop_classifier(self, error: Exception) -> None:
        with self._classifier_lock:
            self._classifier = None
        self._mark_unavailable(error)

    def _mark_unavailable(self, error: Exception) -> None:
        self.state.classifier_ready = False
        self._record_error(error)
        self._metrics.classifier_up.set(0)

    def _record_error(self, error: BaseException) -> None:
        self.state.last_error = f"{type(error).__name__}: {error}"
        self.state.last_error_at = time.time()
        self._metrics.worker_errors.labels(type(error).__name__).inc()
        self._metrics.worker_last_error.set(self.state.last_error_at)

    def _connection(self):
        """The worker thread's own connection (request connections live in ``g``).

        A PostgreSQL connection the server dropped is replaced on the next round.
        """
        if self._db is not None and self._db.broken:
            self._db.close()
            self._db = None
        if self._db is None:
            self._db = connect(self.settings.database, self.settings.busy_timeout_s)
        return self._db

    def _loop(self) -> None:
        delay_s = self.settings.backoff_initial_s
        while not self._stop.is_set():
            self.state.heartbeat_at = time.time()
            try:
                self._check_leases()
                done = self.run_once()
            except _UNAVAILABLE as e:
                logger.warning(
                    "classifier unavailable (%s); retrying in %.1f s", type(e).__name__, delay_s
                )
            except Exception as e:
                # A timeout, an error answer, a full disk or a bug must not kill the only
                # worker thread: record it for /readyz and /metrics, back off, go on.
                logger.exception("worker round failed; retrying in %.1f s", delay_s)
                self._record_error(e)
            else:
                delay_s = self.settings.backoff_initial_s
                self.state.backoff_s = 0.0
                if done == 0:
                    self._wake.wait(self.settings.poll_s)
                    self._wake.clear()
                continue
            self.state.backoff_s = delay_s
            self._stop.wait(delay_s)
            delay_s = min(delay_s * 2, self.settings.backoff_max_s)

    def _check_leases(self) -> None:
        """First this node's claims of an earlier run, then every ``lease_check_s`` expired ones."""
        if not self._took_back_earlier_claims:
            self.requeue_claims(starting=True)
            self._took_back_earlier_claims = True
            self._next_lease_check = time.time() + self.settings.lease_check_s
        now = time.time()
        if now >= self._next_lease_check:
            self._next_lease_check = now + self.settings.lease_check_s
            self.requeue_claims()
