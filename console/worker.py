"""The queue worker: one thread that turns queued slices into scores.

Each round claims a batch from :mod:`console.queue`, decodes and preprocesses
the stored files with :mod:`client.preprocess`, sends the batch to the
classifier in one ``predict`` call (Triton by default, see
:func:`build_classifier`) and commits the results. Two threads share the work
as a pipeline: a preparer claims and decodes the next batch while the
classifier thread waits on Triton for the current one, so a series costs
about the slower of the two stages instead of their sum. The hand-off holds
one prepared batch and the preparer claims only when it is free, so it never
runs more than a batch ahead: an urgent study waits at most for the batch in
the classifier and the one prepared (claims take the most urgent slices first).

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
    worker.start()        # or worker.run_once() from a test: one batch, no pipeline
    ...
    worker.stop()
"""

from __future__ import annotations

import logging
import queue as handoff_queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    prepare_threads: int
    max_attempts: int
    lease_s: float
    lease_check_s: float
    node_id: str = ""
    series_rule: str = ""
    series_threshold: float | None = None

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
            prepare_threads=int(config["PREPARE_THREADS"]),
            max_attempts=int(config["MAX_INFERENCE_ATTEMPTS"]),
            lease_s=float(config["CLAIM_LEASE_S"]),
            lease_check_s=float(config["LEASE_CHECK_S"]),
            node_id=str(config["NODE_ID"]),
            series_rule=str(config["SERIES_RULE"] or ""),
            series_threshold=config["SERIES_THRESHOLD"],
        )

    @property
    def spec(self) -> ModelSpec:
        """The served model, deciding series by the site's rule and threshold where set."""
        return get_model(self.model_name, self.series_rule, self.series_threshold)


def build_classifier(settings: WorkerSettings) -> Classifier:
    """The configured classifier: Triton (``url`` + ``protocol``) or in-process torch.

    Raises:
        ServerUnavailableError, ModelNotReadyError: Triton is down or lacks the model.
        UnknownModelError: ``model_name`` is not registered.
        ValueError: an unknown classifier kind.
    """
    spec = settings.spec
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


@dataclass(frozen=True)
class PreparedBatch:
    """A claimed batch, decoded and preprocessed, on its way to the classifier.

    Attributes:
        rows: The claimed slice rows (all under one claim token).
        prepared: ``(row, model input, head fraction, (decode ms, preprocess ms))``.
        failed: ``(row, reason)`` for slices whose stored file no longer decodes.
        prepared_at: When preparation ended (epoch seconds).
    """

    rows: list
    prepared: list
    failed: list
    prepared_at: float


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
        self.spec: ModelSpec = settings.spec
        self.state = WorkerState()
        self._broker = broker
        self._metrics = metrics
        self._factory = classifier_factory
        self._classifier: Classifier | None = None
        self._classifier_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._preparer: threading.Thread | None = None
        #: One prepared batch waits here while the classifier works on the one before.
        self._handoff: handoff_queue.Queue[PreparedBatch] = handoff_queue.Queue(maxsize=1)
        #: The preparer claims only while the hand-off is free: it never holds a
        #: second prepared batch that an urgent study would have to wait behind.
        self._slot = threading.Semaphore(1)
        self._decode_pool: ThreadPoolExecutor | None = None  # made on first use, shut on stop
        #: Each thread's own connection: "classify" (commits) and "prepare" (claims).
        self._dbs: dict[str, object] = {}
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
        self._preparer = threading.Thread(
            target=self._prepare_loop, name="hemotriage-preparer", daemon=True
        )
        self.state.heartbeat_at = time.time()
        self._thread.start()
        self._preparer.start()

    def is_alive(self) -> bool:
        """Both threads run (False before start, after stop, or if either died)."""
        return all(t is not None and t.is_alive() for t in (self._thread, self._preparer))

    def requeue_claims(self, starting: bool = False) -> int:
        """Take back leases that ran out (older than ``lease_s``), of any node.

        Args:
            starting: This node is starting: take back its own claims of any age too.
                A SQLite queue has one node, so then every claim (a container that
                came back under a new host name still finds its claims at once).

        Returns:
            How many slices went back to the queue.
        """
        db = self._connection("classify")
        now = time.time()
        only_node = starting and db.engine == "sqlite"
        claimed_before = now if only_node else now - self.settings.lease_s
        node = self.settings.node_id if starting else None
        to_fail = []
        if queue.asks_series_model(self.spec, self._classifier):  # else one read saved per check
            with db:
                to_fail = [
                    r
                    for r in queue.expired_claims(db, claimed_before, node)
                    if r["attempts"] >= self.settings.max_attempts
                ]
        refiner = queue.prefetch_series(
            db,
            self.spec,
            self._classifier,
            sorted({r["study_id"] for r in to_fail}),
            {r["id"]: None for r in to_fail},
        )
        with db:
            begin_write(db)
            requeued, failed_studies = queue.requeue_claims(
                db, self.settings.max_attempts, claimed_before, node
            )
            changes = [queue.refresh_study(db, sid, self.spec, refiner) for sid in failed_studies]
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
        """Finish the current batch, stop the threads and close the classifier.

        A batch prepared but not yet classified goes back to the queue with its
        attempt refunded: it was never tried.
        """
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._preparer):
            if thread is not None:
                thread.join(timeout_s)
        self._thread = self._preparer = None
        if self._decode_pool is not None:
            self._decode_pool.shutdown()
            self._decode_pool = None
        self._give_back_prepared()
        with self._classifier_lock:
            classifier, self._classifier = self._classifier, None
        # TritonClassifier holds connections (and gRPC threads); LocalClassifier holds none.
        close = getattr(classifier, "close", None)
        if close is not None:
            close()
        for db in self._dbs.values():
            db.close()
        self._dbs.clear()

    def wake(self) -> None:
        """New work arrived: the preparer skips its idle poll wait (not the backoff)."""
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
                self._wake.set()  # the preparer waits for a classifier before it claims
            return self._classifier

    def triton_servers(self) -> tuple[ServerStatus, ...]:
        """Each Triton server's state in the current classifier (none while unbuilt or local)."""
        servers = getattr(self._classifier, "servers", None)  # no lock: a scrape never waits
        return servers() if servers is not None else ()

    def run_once(self) -> int:
        """Claim, prepare and classify one batch in this thread; how many slices it finished.

        The loop started by :meth:`start` runs the same steps as a pipeline.

        Raises:
            ServerUnavailableError, ModelNotReadyError: the classifier is
                unreachable; the batch went back to the queue, attempts refunded.
            Exception: anything else between claim and commit; the batch went
                back to the queue (or failed, for slices out of attempts).
        """
        classifier = self.classifier()
        batch = self._claim_and_prepare("classify")
        return 0 if batch is None else self._classify(classifier, batch)

    def _claim_and_prepare(self, role: str) -> PreparedBatch | None:
        """Claim the head of the queue and decode it (None: nothing queued)."""
        db = self._connection(role)
        if not queue.has_queued(db):
            return None
        with db:
            begin_write(db, row_locks=True)
            rows = queue.claim(db, self.settings.batch_size, self.settings.node_id)
        if not rows:
            return None
        try:
            prepared, failed = self._prepare(rows)
        except BaseException as e:
            self._give_back(rows, e, refund=False, role=role)
            raise
        return PreparedBatch(rows, prepared, failed, time.time())

    def _classify(self, classifier: Classifier, batch: PreparedBatch) -> int:
        """Infer and commit a prepared batch; on failure give it back (see :meth:`run_once`)."""
        try:
            return self._infer_and_commit(classifier, batch)
        except _UNAVAILABLE as e:
            self._drop_classifier(e)
            self._give_back(batch.rows, e, refund=True)
            raise
        except BaseException as e:
            if isinstance(e, HemoTriageError):
                self._drop_classifier(e)  # rebuilt next round: checks the model again
            self._give_back(batch.rows, e, refund=False)
            raise

    def _infer_and_commit(self, classifier: Classifier, batch: PreparedBatch) -> int:
        started_at = time.time()
        probabilities = np.empty(0, dtype=np.float32)
        inference_ms = 0.0
        if batch.prepared:
            tensors = np.stack([p[1] for p in batch.prepared])
            priority = min(r["priority"] for r, *_ in batch.prepared)
            start = time.perf_counter()
            probabilities = classifier.predict(tensors, priority=priority)
            inference_ms = (time.perf_counter() - start) * 1000 / len(batch.prepared)
        times = {
            "handoff_ms": (started_at - batch.prepared_at) * 1000,
            "prepared_at": batch.prepared_at,
            "inferred_at": time.time(),
        }
        self._commit(classifier, batch, probabilities, inference_ms, times)
        return len(batch.rows)

    def _give_back(self, rows, error: BaseException, refund: bool, role: str = "classify") -> None:
        """Return a batch that did not finish: re-queued, or failed once out of attempts.

        If even this fails (the database is locked or gone), the claims stay
        ``processing`` and the lease timer takes them back later. ``role`` names
        the calling thread's connection.
        """
        reason = f"{type(error).__name__}: {error}"
        retry = [r["id"] for r in rows if refund or r["attempts"] < self.settings.max_attempts]
        give_up = [
            (r, f"gave up after {r['attempts']} attempts; last: {reason}")
            for r in rows
            if not refund and r["attempts"] >= self.settings.max_attempts
        ]
        try:
            db = self._connection(role)
            study_ids = sorted({r["study_id"] for r, _ in give_up})
            outcomes = {r["id"]: None for r, _ in give_up}
            refiner = queue.prefetch_series(db, self.spec, self._classifier, study_ids, outcomes)
            with db:
                begin_write(db)
                queue.release(db, retry, refund=refund, claim_token=rows[0]["claim_token"])
                failed = self._finish_failed(db, give_up)
                changes = [queue.refresh_study(db, sid, self.spec, refiner) for sid in study_ids]
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
        """Decode and preprocess claimed slices, ``prepare_threads`` at a time.

        OpenCV and NumPy release the GIL for most of a slice's work, so on a
        second core the threads shorten the batch. A file that no longer
        decodes fails alone.
        """
        prepared, failed = [], []
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(
                max(1, self.settings.prepare_threads), thread_name_prefix="hemotriage-prepare"
            )
        outcomes = self._decode_pool.map(self._prepare_slice, rows)
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, str):
                failed.append((row, outcome))
            else:
                prepared.append((row, *outcome))
        return prepared, failed

    def _prepare_slice(self, row):
        """``(model input, head fraction, (decode ms, preprocess ms))``, or why it failed."""
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
            return f"could not read the stored file: {e}"
        return tensor, head_fraction(view), ((decoded - start) * 1000, (done - decoded) * 1000)

    def _commit(
        self,
        classifier: Classifier,
        batch: PreparedBatch,
        probabilities,
        inference_ms: float,
        times: dict,
    ):
        """Record the batch's results in one transaction, then tell the screens.

        ``classifier`` runs the series model of a finished study whose model decides
        series with one (:func:`client.series.decide_series`), before the
        transaction (:func:`console.queue.prefetch_series`): a Triton call and its
        retries never hold the database's write lock.

        A non-finite probability (a broken model or input) fails its slice: it
        must never count as a negative. ``times`` holds the batch's
        :class:`~console.queue.SliceTimings` hand-off wait and timestamps.
        """
        db = self._connection("classify")
        rows, failed = batch.rows, list(batch.failed)
        scored = []
        for item, p in zip(batch.prepared, probabilities, strict=True):
            if np.isfinite(p):
                scored.append((item, p))
            else:
                failed.append((item[0], f"the model returned a non-finite probability ({p})"))
        outcomes = {row["id"]: (float(p), float(head)) for (row, _, head, _), p in scored}
        outcomes.update((row["id"], None) for row, _ in failed)
        study_ids = sorted({r["study_id"] for r in rows})
        refiner = queue.prefetch_series(db, self.spec, classifier, study_ids, outcomes)
        classified = 0
        with db:
            begin_write(db)
            for (row, _, head, (decode_ms, preprocess_ms)), p in scored:
                wait_ms = (row["started_at"] - row["queued_at"]) * 1000
                timings = queue.SliceTimings(
                    decode_ms, preprocess_ms, wait_ms, inference_ms, **times
                )
                if not queue.finish(db, row["id"], float(p), head, timings, row["claim_token"]):
                    continue
                classified += 1
                for stage, ms in (
                    ("decode", decode_ms),
                    ("preprocess", preprocess_ms),
                    ("queue_wait", wait_ms),
                    ("handoff", times["handoff_ms"]),
                    ("inference", inference_ms),
                ):
                    self._metrics.stage_seconds.labels(stage).observe(ms / 1000)
            failed_count = self._finish_failed(db, failed)
            changes = [queue.refresh_study(db, sid, self.spec, refiner) for sid in study_ids]
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
            (time.time() - min(r["started_at"] for r in rows)) * 1000,
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

    def _connection(self, role: str):
        """The connection of one worker thread (request connections live in ``g``).

        ``role`` is ``"classify"`` (the loop, and :meth:`run_once`) or
        ``"prepare"`` (the preparer): each thread uses only its own. A
        PostgreSQL connection the server dropped is replaced on the next round.
        """
        db = self._dbs.get(role)
        if db is not None and db.broken:
            db.close()
            db = None
        if db is None:
            db = self._dbs[role] = connect(self.settings.database, self.settings.busy_timeout_s)
        return db

    def _loop(self) -> None:
        """The classifier side of the pipeline: take a prepared batch, infer, commit."""
        delay_s = self.settings.backoff_initial_s
        while not self._stop.is_set():
            self.state.heartbeat_at = time.time()
            try:
                self._check_leases()
                classifier = self.classifier()
                try:
                    batch = self._handoff.get(timeout=self.settings.poll_s)
                except handoff_queue.Empty:
                    continue
                self._slot.release()  # the preparer claims the next batch now
                self._classify(classifier, batch)
            except _UNAVAILABLE as e:
                logger.warning(
                    "classifier unavailable (%s); retrying in %.1f s", type(e).__name__, delay_s
                )
                self._give_back_prepared()
            except Exception as e:
                # A timeout, an error answer, a full disk or a bug must not kill the only
                # worker thread: record it for /readyz and /metrics, back off, go on.
                logger.exception("worker round failed; retrying in %.1f s", delay_s)
                self._record_error(e)
            else:
                delay_s = self.settings.backoff_initial_s
                self.state.backoff_s = 0.0
                continue
            self.state.backoff_s = delay_s
            self._stop.wait(delay_s)
            delay_s = min(delay_s * 2, self.settings.backoff_max_s)

    def _prepare_loop(self) -> None:
        """The preparer side: claim and decode the next batch while the classifier works.

        It claims only while a classifier is up (claims made while Triton is
        down would only be handed back), after the loop took back this node's
        claims of an earlier run (which would include its own), and only while
        the hand-off is free.
        """
        while not self._stop.is_set():
            if not (self.state.classifier_ready and self._took_back_earlier_claims):
                self._wake.wait(self.settings.poll_s)
                self._wake.clear()
                continue
            if not self._slot.acquire(timeout=self.settings.poll_s):
                continue
            try:
                batch = self._claim_and_prepare("prepare")
            except Exception as e:
                self._slot.release()
                logger.exception("preparing a batch failed; retrying")
                self._record_error(e)
                self._stop.wait(self.settings.backoff_initial_s)
                continue
            if batch is None:
                self._slot.release()
                self._wake.wait(self.settings.poll_s)
                self._wake.clear()
                continue
            self._handoff.put_nowait(batch)  # the slot keeps it free

    def _give_back_prepared(self) -> None:
        """Hand the prepared batch waiting for the classifier back to the queue, untried."""
        try:
            batch = self._handoff.get_nowait()
        except handoff_queue.Empty:
            return
        self._slot.release()
        self._give_back(batch.rows, _Stopping(), refund=True)

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


class _Stopping(Exception):
    """Why a prepared batch went back untried: the worker stopped or the classifier left."""

    def __str__(self) -> str:
        return "prepared, not classified: the worker stopped or the classifier is unavailable"
