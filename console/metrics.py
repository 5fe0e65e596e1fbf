"""Prometheus metrics of one console app, on its own registry (served at ``/metrics``).

Each app owns a :class:`prometheus_client.CollectorRegistry`, so tests can
build many apps in one process. Queue depth, the results outbox's counts and the
readers' feedback statistics (console/accuracy.py) are read from SQLite at scrape time.

    metrics = ConsoleMetrics(database_path)
    metrics.stage_seconds.labels("inference").observe(0.012)
    generate_latest(metrics.registry)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from client.triton_pool import ServerStatus
from console.accuracy import WINDOWS, accuracy_by_version
from console.db import connect
from console.outbox import counts
from console.queue import depth

#: Seconds; from 1 ms (decode of a small PNG) to a minute (a long queue wait).
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds from upload to alert; the product promise is "within seconds".
_ALERT_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)


class _QueueDepthCollector:
    """Slices per state, counted in the database when Prometheus scrapes."""

    def __init__(self, database: str) -> None:
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


class _AccuracyCollector:
    """Readers' verdicts, PPV, false-positive rate and misses per model version and window.

    Gauges, not counters: a verdict can be changed, and windows slide. A rate
    whose denominator is 0 (no reviewed flag yet) has no sample.
    """

    def __init__(self, database: str) -> None:
        self._database = database

    def collect(self):
        version = ["model", "version", "window"]
        flagged = GaugeMetricFamily(
            "hemotriage_feedback_flagged_studies",
            "Studies flagged, reviewed or not",
            labels=version,
        )
        verdicts = GaugeMetricFamily(
            "hemotriage_feedback_studies",
            "Reviewed studies by the outcome of their last verdict",
            labels=[*version, "outcome"],
        )
        misses = GaugeMetricFamily(
            "hemotriage_feedback_confirmed_misses",
            "Negative studies a reader marked as a missed hemorrhage",
            labels=version,
        )
        rates = {
            "ppv": GaugeMetricFamily(
                "hemotriage_feedback_ppv",
                "Confirmed flags of reviewed flags, with its Wilson 95% interval",
                labels=[*version, "bound"],
            ),
            "false_positive_rate": GaugeMetricFamily(
                "hemotriage_feedback_false_positive_rate",
                "False flags of reviewed flags, with its Wilson 95% interval",
                labels=[*version, "bound"],
            ),
        }
        db = connect(self._database)
        try:
            now = time.time()
            for window, days in WINDOWS.items():
                for row in accuracy_by_version(db, days, now):
                    labels = [row.model_name, row.model_version, window]
                    flagged.add_metric(labels, row.flagged)
                    misses.add_metric(labels, row.false_negatives)
                    for outcome, n in (
                        ("true_positive", row.true_positives),
                        ("false_positive", row.false_positives),
                        ("true_negative", row.true_negatives),
                        ("false_negative", row.false_negatives),
                    ):
                        verdicts.add_metric([*labels, outcome], n)
                    for name, family in rates.items():
                        rate = getattr(row, name)
                        if rate.total:
                            for bound in ("estimate", "low", "high"):
                                family.add_metric([*labels, bound], getattr(rate, bound))
        finally:
            db.close()
        yield from (flagged, verdicts, misses, *rates.values())


class _OutboxCollector:
    """Result objects for the PACS in each delivery state, counted when Prometheus scrapes."""

    def __init__(self, database: str) -> None:
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


class _TritonServerCollector:
    """1 for each Triton server in the classifier's rotation, 0 for one taken out of it."""

    def __init__(self, servers: Callable[[], Iterable[ServerStatus]]) -> None:
        self._servers = servers

    def collect(self):
        family = GaugeMetricFamily(
            "hemotriage_triton_server_up",
            "1 while a Triton server is in the classifier's rotation, 0 while it is out",
            labels=["url"],
        )
        for server in self._servers():
            family.add_metric([server.url], 1.0 if server.up else 0.0)
        yield family


class ConsoleMetrics:
    """The console's counters, gauges and histograms.

    Args:
        database: The database whose queue depth is reported (file or URL).
    """

    def __init__(self, database: str) -> None:
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
        self.registry.register(_AccuracyCollector(database))
        self.registry.register(_OutboxCollector(database))

    def watch_threads(self, probes: dict[str, Callable[[], bool]]) -> None:
        """Report ``hemotriage_thread_up`` for each named liveness probe."""
        self.registry.register(_ThreadCollector(probes))

    def watch_triton(self, servers: Callable[[], Iterable[ServerStatus]]) -> None:
        """Report ``hemotriage_triton_server_up`` for each server ``servers()`` lists."""
        self.registry.register(_TritonServerCollector(servers))
