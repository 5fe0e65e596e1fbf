"""Prometheus metrics of one console app, on its own registry (served at ``/metrics``).

Each app owns a :class:`prometheus_client.CollectorRegistry`, so tests can
build many apps in one process. Queue depth and the results outbox's counts
are read from SQLite at scrape time.

    metrics = ConsoleMetrics(database_path)
    metrics.stage_seconds.labels("inference").observe(0.012)
    generate_latest(metrics.registry)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from console.db import connect
from console.outbox import counts
from console.queue import depth

#: Seconds; from 1 ms (decode of a small PNG) to a minute (a long queue wait).
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds from upload to alert; the product promise is "within seconds".
_ALERT_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)


class _QueueDepthCollector:
    """Slices per state, counted in the database when Prometheus scrapes."""

    def __init__(self, database: Path) -> None:
        self._database = database

    def collect(self):
        family = GaugeMetricFamily(
            "hemotriage_queue_slices", "Slices in each queue state", labels=["state"]
        )
        db = connect(self._database)
        try:
            for state, count in depth(db).items():
                family.add_metric([state], count)
        finally:
            db.close()
        yield family


class _OutboxCollector:
    """Result objects for the PACS in each delivery state, counted when Prometheus scrapes."""

    def __init__(self, database: Path) -> None:
        self._database = database

    def collect(self):
        family = GaugeMetricFamily(
            "hemotriage_outbox_objects",
            "Result objects for the PACS by delivery state (pending: the outbox depth)",
            labels=["state"],
        )
        db = connect(self._database)
        try:
            for state, count in counts(db).items():
                family.add_metric([state], count)
        finally:
            db.close()
        yield family


class _ThreadCollector:
    """1 for each background thread that runs, 0 for one that is stopped or dead."""

    def __init__(self, probes: dict[str, Callable[[], bool]]) -> None:
        self._probes = probes

    def collect(self):
        family = GaugeMetricFamily(
            "hemotriage_thread_up", "1 while a background thread runs", labels=["thread"]
        )
        for name, alive in self._probes.items():
            family.add_metric([name], 1.0 if alive() else 0.0)
        yield family


class ConsoleMetrics:
    """The console's counters, gauges and histograms.

    Args:
        database: SQLite file whose queue depth is reported.
    """

    def __init__(self, database: Path) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hemotriage_http_requests",
            "HTTP requests handled",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "hemotriage_stage_seconds",
            "Latency of each pipeline stage per slice",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.time_to_alert_seconds = Histogram(
            "hemotriage_time_to_alert_seconds",
            "From a flagged study's upload to its alert on the worklist",
            buckets=_ALERT_BUCKETS,
            registry=self.registry,
        )
        self.slices = Counter(
            "hemotriage_slices",
            "Slices finished, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.classifier_up = Gauge(
            "hemotriage_classifier_up",
            "1 while the classifier answers, 0 while backing off",
            registry=self.registry,
        )
        self.worker_errors = Counter(
            "hemotriage_worker_errors",
            "Worker rounds that failed, by error class",
            ["error"],
            registry=self.registry,
        )
        self.worker_last_error = Gauge(
            "hemotriage_worker_last_error_timestamp_seconds",
            "When the worker last failed (0: never)",
            registry=self.registry,
        )
        self.registry.register(_QueueDepthCollector(database))
        self.registry.register(_OutboxCollector(database))

    def watch_threads(self, probes: dict[str, Callable[[], bool]]) -> None:
        """Report ``hemotriage_thread_up`` for each named liveness probe."""
        self.registry.register(_ThreadCollector(probes))
