"""The queue worker: one thread that turns queued slices into scores.

Each round claims a batch from :mod:`console.queue`, decodes and preprocesses
the stored files with :mod:`client.preprocess`, sends the batch to the
classifier in one ``predict`` call (Triton by default, see
:func:`build_classifier`) and commits the results. While the classifier is
unreachable (:class:`~client.errors.ServerUnavailableError`,
:class:`~client.errors.ModelNotReadyError`) the claimed slices go back to the
queue and the worker waits with exponential backoff, then resumes by itself.
On start it re-queues slices a crashed process left ``processing``.

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
    InferenceTimeoutError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from client.preprocess import head_fraction, model_view, normalize
from client.registry import ModelSpec, get_model
from console import queue
from console.db import connect
from console.events import EventBroker, publish_study
from console.filestore import stored_path
from console.metrics import ConsoleMetrics

logger = logging.getLogger(__name__)

#: Failures that mean "the server is not there yet": wait and retry, without limit.
_UNAVAILABLE = (ServerUnavailableError, ModelNotReadyError)
#: Kinds of classifier :func:`build_classifier` can make.
CLASSIFIER_KINDS = ("triton", "local")


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's part of the app config (see :func:`console.create_app`)."""

    database: Path
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

    @classmethod
    def from_config(cls, config: dict) -> WorkerSettings:
        """Read the ``create_app`` config keys."""
        return cls(
            database=Path(config["DATABASE"]),
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
    """What ``/readyz`` and the status bar show about the worker."""

    classifier_ready: bool = False
    last_error: str = ""
    backoff_s: float = 0.0
    running: bool = False


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

    def start(self) -> None:
        """Re-queue stale work, then run the loop in a daemon thread (once)."""
        if self._thread is not None:
            return
        with self._connection() as db:
            stale = queue.requeue_stale(db)
        if stale:
            logger.info("re-queued %d slices left processing by an earlier run", stale)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="hemotriage-worker", daemon=True)
        self.state.running = True
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current batch, stop the thread and close the classifier."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.state.running = False
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
                self.state.last_error = ""
                self._metrics.classifier_up.set(1)
            return self._classifier

    def run_once(self) -> int:
        """Classify one batch; return how many slices it finished (0: queue empty).

        Raises:
            ServerUnavailableError, ModelNotReadyError: the classifier is
                unreachable; the batch went back to the queue.
        """
        classifier = self.classifier()
        db = self._connection()
        with db:
            db.execute("BEGIN IMMEDIATE")
            rows = queue.claim(db, self.settings.batch_size)
        if not rows:
            return 0
        claimed_at = time.time()
        prepared, failed = self._prepare(rows)
        probabilities = np.empty(0, dtype=np.float32)
        inference_ms = 0.0
        if prepared:
            batch = np.stack([p[1] for p in prepared])
            priority = min(r["priority"] for r, *_ in prepared)
            start = time.perf_counter()
            try:
                probabilities = classifier.predict(batch, priority=priority)
            except _UNAVAILABLE as e:
                self._drop_classifier(e)
                with db:
                    queue.release(db, [r["id"] for r, *_ in prepared])
                    self._finish_failed(db, failed)
                raise
            except InferenceTimeoutError as e:
                self._retry_or_fail(db, prepared, failed, e)
                return len(failed)
            inference_ms = (time.perf_counter() - start) * 1000 / len(prepared)
        self._commit(db, rows, prepared, failed, probabilities, inference_ms, claimed_at)
        return len(rows)

    def _prepare(self, rows):
        """Decode and preprocess claimed slices; a file that no longer decodes fails alone."""
        prepared, failed = [], []
        for row in rows:
            try:
                start = time.perf_counter()
                image = decode_file(stored_path(self.settings.storage_dir, row["stored_path"]))
                decoded = time.perf_counter()
                view = model_view(image, self.spec)
                tensor = normalize(view, self.spec)
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
        with db:
            for (row, _, head, (decode_ms, preprocess_ms)), p in zip(
                prepared, probabilities, strict=True
            ):
                wait_ms = (row["started_at"] - row["queued_at"]) * 1000
                timings = queue.SliceTimings(decode_ms, preprocess_ms, wait_ms, inference_ms)
                queue.finish(db, row["id"], float(p), head, timings)
                for stage, ms in (
                    ("decode", decode_ms),
                    ("preprocess", preprocess_ms),
                    ("queue_wait", wait_ms),
                    ("inference", inference_ms),
                ):
                    self._metrics.stage_seconds.labels(stage).observe(ms / 1000)
            self._finish_failed(db, failed)
            changes = [
                queue.refresh_study(db, sid, self.spec)
                for sid in sorted({r["study_id"] for r in rows})
            ]
        self._metrics.slices.labels("classified").inc(len(prepared))
        self._metrics.slices.labels("failed").inc(len(failed))
        for change in changes:
            study = db.execute("SELECT * FROM studies WHERE id = ?", (change.study_id,)).fetchone()
            if change.newly_flagged:
                alert_s = study["flagged_at"] - study["received_at"]
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
            len(prepared),
            len(failed),
            inference_ms,
            (time.time() - claimed_at) * 1000,
        )

    def _finish_failed(self, db, failed) -> None:
        for row, reason in failed:
            queue.fail(db, row["id"], reason)

    def _retry_or_fail(self, db, prepared, failed, error: InferenceTimeoutError) -> None:
        """A timeout re-queues the batch until a slice has used up its attempts."""
        retry = [r["id"] for r, *_ in prepared if r["attempts"] < self.settings.max_attempts]
        give_up = [
            (r, f"inference timed out {r['attempts']} times: {error}")
            for r, *_ in prepared
            if r["attempts"] >= self.settings.max_attempts
        ]
        logger.warning(
            "inference timed out; re-queueing %d slices, failing %d", len(retry), len(give_up)
        )
        with db:
            queue.release(db, retry)
            self._finish_failed(db, failed + give_up)
            for sid in sorted({r["study_id"] for r, _ in failed + give_up}):
                queue.refresh_study(db, sid, self.spec)
        self._metrics.slices.labels("failed").inc(len(failed) + len(give_up))

    def _drop_classifier(self, error: Exception) -> None:
        with self._classifier_lock:
            self._classifier = None
        self._mark_unavailable(error)

    def _mark_unavailable(self, error: Exception) -> None:
        self.state.classifier_ready = False
        self.state.last_error = str(error)
        self._metrics.classifier_up.set(0)

    def _connection(self):
        """The worker thread's own connection (request connections live in ``g``)."""
        if self._db is None:
            self._db = connect(self.settings.database)
        return self._db

    def _loop(self) -> None:
        delay_s = self.settings.backoff_initial_s
        while not self._stop.is_set():
            try:
                done = self.run_once()
            except _UNAVAILABLE as e:
                self.state.backoff_s = delay_s
                logger.warning(
                    "classifier unavailable (%s); retrying in %.1f s", type(e).__name__, delay_s
                )
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, self.settings.backoff_max_s)
                continue
            except Exception as e:
                # A bug or a full disk must not kill the only worker thread silently:
                # record it for /readyz, back off and try again.
                logger.exception("worker round failed; retrying in %.1f s", delay_s)
                self.state.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, self.settings.backoff_max_s)
                continue
            delay_s = self.settings.backoff_initial_s
            self.state.backoff_s = 0.0
            if done == 0:
                self._wake.wait(self.settings.poll_s)
                self._wake.clear()
