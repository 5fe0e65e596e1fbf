"""The console's long-lived parts, one set per app: events, metrics and the threads.

The threads: the queue worker, the inbox watcher, the DICOM receiver and the
results thread (series completion and the PACS outbox).

:func:`console.create_app` builds a :class:`Services` and keeps it in
``app.extensions["hemotriage"]``; nothing starts until :meth:`Services.start`
(gunicorn's ``post_worker_init`` hook calls it in the one worker process, and
tests call it when they need the threads). :meth:`Services.accept` is the one
ingest entry point for the API, the upload page, the inbox and the DICOM receiver.

    services = current_services()
    result = services.accept(files, label=None, source="api")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app

from client.constants import PRIORITY_ROUTINE
from client.registry import ModelSpec, get_model
from console.completion import ResultMaker, complete_quiet_series
from console.db import DATABASE_ERRORS, POOL_KEY, Connection, RequestPool, connect
from console.dicom_node import DicomReceiver, DicomSettings
from console.errors import storage_error
from console.events import EventBroker, publish_study
from console.inbox import InboxWatcher
from console.ingest import IncomingFile, IngestLimits, IngestResult, ingest
from console.metrics import ConsoleMetrics
from console.outbox import OutboxSettings, ResultsThread
from console.priority import PriorityRule
from console.queue import StudyChange
from console.render import CamRenderer
from console.worker import QueueWorker, WorkerSettings

logger = logging.getLogger(__name__)

EXTENSION_KEY = "hemotriage"


@dataclass
class Services:
    """Everything that outlives a request.

    Attributes:
        spec: The configured model.
        storage_dir: Root of stored uploads.
        database: The SQLite file or PostgreSQL URL (``console.db.connect`` opens either).
        limits: Upload limits.
        rule: Worklist priority rule.
        broker: SSE fan-out.
        metrics: Prometheus metrics.
        worker: The queue worker.
        inbox: The inbox watcher, or None when ``INBOX_DIR`` is empty.
        dicom: The DICOM receiver, or None when ``DICOM_PORT`` is 0 or empty.
        results: Completes quiet DICOM series and sends their results (console/outbox.py);
            None when the receiver is off and no ``RESULTS_DESTINATION`` is set.
        cam: Grad-CAM overlays of the configured model.
        shadow_mode: The one "send nothing" predicate (console/shadow.py): True during a
            site's validation period. Results are classified and recorded, but no alert is
            raised and nothing leaves the console: every outward path (the results outbox
            to PACS, any notifier) checks it before queuing or sending.
        db_pool: Request handlers' PostgreSQL connections (None on SQLite), closed at stop.
    """

    spec: ModelSpec
    storage_dir: Path
    database: str
    limits: IngestLimits
    rule: PriorityRule
    broker: EventBroker
    metrics: ConsoleMetrics
    worker: QueueWorker
    inbox: InboxWatcher | None
    dicom: DicomReceiver | None
    results: ResultsThread | None
    cam: CamRenderer
    shadow_mode: bool
    db_pool: RequestPool | None = None

    @classmethod
    def from_app(cls, app: Flask) -> Services:
        """Build (without starting) the services from ``app.config``."""
        config = app.config
        database = str(config["DATABASE"])
        shadow_mode = bool(config["SHADOW_MODE"])
        broker = EventBroker(alerts=not shadow_mode, database=database)
        metrics = ConsoleMetrics(database)
        worker_settings = WorkerSettings.from_config(config)
        services = cls(
            spec=worker_settings.spec,
            storage_dir=Path(config["STORAGE_DIR"]),
            database=database,
            limits=IngestLimits(
                int(config["MAX_UPLOAD_FILES"]), int(config["MAX_ZIP_UNCOMPRESSED_BYTES"])
            ),
            rule=PriorityRule.from_config(config),
            broker=broker,
            metrics=metrics,
            worker=QueueWorker(worker_settings, broker, metrics),
            inbox=None,
            dicom=None,
            results=None,
            cam=CamRenderer(get_model(config["MODEL_NAME"])),
            shadow_mode=shadow_mode,
            db_pool=app.extensions.get(POOL_KEY),
        )
        if config["INBOX_DIR"]:
            services.inbox = InboxWatcher(
                Path(config["INBOX_DIR"]),
                float(config["INBOX_POLL_S"]),
                float(config["INBOX_SETTLE_S"]),
                lambda files, label: services.accept(files, label, source="inbox"),
            )
        dicom = DicomSettings.from_config(config)  # checked even when off (RESULTS_DESTINATION)
        if dicom.port:
            services.dicom = DicomReceiver(
                dicom, lambda files: services.accept(files, None, source="dicom")
            )
        if dicom.port or dicom.results_destination is not None:
            services.results = services._results_thread(config, dicom)
        metrics.watch_threads(services.thread_probes())
        return services

    def thread_probes(self) -> dict[str, Callable[[], bool]]:
        """Liveness of each background thread, by name (``/readyz``, ``/metrics``)."""
        probes = {"worker": self.worker.is_alive}
        if self.inbox is not None:
            probes["inbox"] = self.inbox.is_alive
        if self.dicom is not None:
            probes["dicom"] = self.dicom.is_alive
        if self.results is not None:
            probes["results"] = self.results.is_alive
        return probes

    def _results_thread(self, config, dicom: DicomSettings) -> ResultsThread:
        """The thread completing quiet series and delivering their results.

        In shadow mode series are still completed, but no result is built, queued
        or sent (not even rows queued before the switch): nothing leaves the console.
        """
        destination = None if self.shadow_mode else dicom.results_destination
        settings = OutboxSettings(
            database=self.database,
            busy_timeout_s=float(config["DATABASE_BUSY_TIMEOUT_S"]),
            destination=destination,
            calling_ae=dicom.ae_title,
            poll_s=min(dicom.quiet_s, 1.0),
            backoff_initial_s=float(config["RESULTS_BACKOFF_INITIAL_S"]),
            backoff_max_s=float(config["RESULTS_BACKOFF_MAX_S"]),
            timeout_s=float(config["RESULTS_TIMEOUT_S"]),
        )
        make = ResultMaker(self.spec, self.storage_dir, self.cam)
        return ResultsThread(
            settings,
            complete=lambda db: complete_quiet_series(db, dicom.quiet_s, make, destination),
            changed=self._publish_unchanged,
        )

    def _publish_unchanged(self, db: Connection, study_ids: set[int]) -> None:
        """Tell the screens to redraw studies whose status stayed but whose results moved."""
        if not study_ids:
            return
        marks = ",".join("?" * len(study_ids))
        for row in db.execute(
            f"SELECT id, status FROM studies WHERE id IN ({marks})", sorted(study_ids)
        ):
            publish_study(self.broker, StudyChange(row["id"], row["status"], row["status"], False))

    def accept(
        self,
        files: list[IncomingFile],
        label: str | None,
        source: str,
        priority: int = PRIORITY_ROUTINE,
        *,
        actor: str | None = None,
        via: str | None = None,
    ) -> IngestResult:
        """Ingest and audit an upload, publish the studies it touched and wake the worker.

        ``actor`` and ``via`` name who sent it and how in the audit log (see
        :func:`console.ingest.ingest`; default: the source).

        Raises:
            HemoTriageError: the typed reason the upload was refused (nothing stored),
                :class:`~console.errors.StorageFullError` and
                :class:`~console.errors.StorageBusyError` included.
        """
        try:
            result = self._ingest(files, label, source, priority, actor, via)
        except (OSError, *DATABASE_ERRORS) as e:
            typed = storage_error(e, self.storage_dir)
            if typed is None:
                raise
            logger.error("upload not stored: %s: %s", type(e).__name__, e)
            raise typed from e
        for ingest_ms in result.ingest_ms:
            self.metrics.stage_seconds.labels("ingest").observe(ingest_ms / 1000)
        for change in result.changes:
            publish_study(self.broker, change)
        self.worker.wake()
        return result

    def _ingest(
        self,
        files: list[IncomingFile],
        label: str | None,
        source: str,
        priority: int,
        actor: str | None,
        via: str | None,
    ) -> IngestResult:
        db = connect(self.database, self.worker.settings.busy_timeout_s)
        try:
            return ingest(
                db,
                self.storage_dir,
                self.spec,
                files,
                self.limits,
                label=label,
                source=source,
                priority=priority,
                actor=actor,
                via=via,
            )
        finally:
            db.close()

    def start(self) -> None:
        """Start the DICOM receiver, the worker, the inbox watcher and the results thread.

        The receiver binds first, so a taken port fails before any thread runs.

        Raises:
            DicomPortError: the DICOM receiver cannot listen.
        """
        if self.dicom is not None:
            self.dicom.start()
        self.worker.start()
        if self.inbox is not None:
            self.inbox.start()
        if self.results is not None:
            self.results.start()
        logger.info(
            "console services started (model %s%s)",
            self.spec.name,
            ", SHADOW MODE: no alerts, nothing sent" if self.shadow_mode else "",
        )

    def stop(self) -> None:
        """End the live streams and stop the threads (the current batch finishes first)."""
        self.broker.close()
        if self.dicom is not None:
            self.dicom.stop()
        if self.inbox is not None:
            self.inbox.stop()
        if self.results is not None:
            self.results.stop()
        self.worker.stop()
        self.cam.release()
        if self.db_pool is not None:
            self.db_pool.close()


def current_services() -> Services:
    """The services of the app handling this request."""
    return current_app.extensions[EXTENSION_KEY]
