r"""Locust users for the console and its Triton: scanners, triage screens, a direct client.

``python -m benchmarks.loadtest`` starts the stack and runs this file; against
a running console and Triton:

    locust -f benchmarks/locustfile.py --headless -u 6 -r 2 -t 60s \
        --host http://127.0.0.1:5000 --token ht_... --triton-url localhost:8001

Users, weighted 2:3:1 (``-u 6`` runs two scanners, three screens, one client):

* :class:`ScannerUser` pushes a synthetic DICOM series (``--series-slices``
  slices with fresh UIDs, ``benchmarks/phantoms.py``) through
  ``POST /api/scans`` every ``--scanner-pace-s`` seconds, and logs every
  accepted slice id to ``--ledger`` for the lost-scan audit.
* :class:`TriageScreenUser` keeps ``/api/stream`` open as the worklist page
  does, refreshes the worklist (``GET /api/studies``) and opens studies, an
  alerted one first. Each result it receives for a series a scanner of this
  process sent is reported as an ``SSE`` request named ``flagged after
  upload`` (or ``negative``/``failed``): from the scanner's 201 to the screen
  reading the study's final event, the time to alert under load.
* :class:`TritonUser` sends ``--triton-batch`` preprocessed slices straight to
  Triton over gRPC (:class:`client.triton_client.TritonClassifier`) every
  ``--triton-pace-s`` seconds, reported as ``gRPC`` requests.

Options also come from the environment: ``HEMOTRIAGE_TOKEN``,
``HEMOTRIAGE_TRITON_URL``, ``HEMOTRIAGE_LOADTEST_LEDGER``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import deque
from pathlib import Path

import gevent
import numpy as np
from locust import HttpUser, User, between, constant_pacing, events, task
from locust.clients import HttpSession
from requests.exceptions import RequestException

from benchmarks.console_api import auth_headers, study_events
from benchmarks.phantoms import phantom_series
from client.constants import DEFAULT_GRPC_PORT, ENV_PREFIX
from client.preprocess import preprocess_bytes
from client.registry import get_model, list_models

logger = logging.getLogger(__name__)

#: When each series' 201 was read, by study id (one locust process shares it).
_UPLOADED_AT: dict[int, float] = {}
#: Study states that end a series' processing (the phantoms may or may not be flagged).
_RESULTS = ("flagged", "negative", "failed")
#: Seconds before a dropped event stream reconnects (the console sends ``retry: 3000``).
_RECONNECT_S = 3.0


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument(
        "--token", env_var=f"{ENV_PREFIX}TOKEN", default="", is_secret=True, help="API token"
    )
    parser.add_argument(
        "--triton-url",
        env_var=f"{ENV_PREFIX}TRITON_URL",
        default=f"localhost:{DEFAULT_GRPC_PORT}",
        help="Triton gRPC host:port for TritonUser",
    )
    parser.add_argument(
        "--triton-model", default="mobilenet_v2", choices=[s.name for s in list_models()]
    )
    parser.add_argument("--triton-batch", type=int, default=8, help="slices per gRPC request")
    parser.add_argument("--triton-pace-s", type=float, default=1.0, help="seconds per request")
    parser.add_argument("--series-slices", type=int, default=40, help="slices per series")
    parser.add_argument("--scanner-pace-s", type=float, default=10.0, help="seconds per series")
    parser.add_argument(
        "--ledger",
        env_var=f"{ENV_PREFIX}LOADTEST_LEDGER",
        default="",
        help="append each accepted upload's slice ids here (JSON lines)",
    )


@events.init.add_listener
def _init_grpc(environment, **_kwargs) -> None:
    """Make gRPC yield to gevent, or one blocked call would stall every user."""
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()


def _authorize(user: HttpUser, session: HttpSession) -> None:
    session.headers.update(auth_headers(user.environment.parsed_options.token))


class ScannerUser(HttpUser):
    """A scanner (or PACS bridge) sending one whole series per POST."""

    weight = 2

    def wait_time(self) -> float:
        """One series every ``--scanner-pace-s`` seconds, however long the upload took."""
        return constant_pacing(self.environment.parsed_options.scanner_pace_s)(self)

    def on_start(self) -> None:
        """Every request carries the API token."""
        _authorize(self, self.client)

    @task
    def send_series(self) -> None:
        """Upload a fresh series; every slice must be accepted as new."""
        options = self.environment.parsed_options
        series = phantom_series(options.series_slices)
        files = [
            ("files", (f"IM{i + 1:04d}.dcm", data, "application/dicom"))
            for i, data in enumerate(series)
        ]
        with self.client.post(
            "/api/scans", files=files, name="/api/scans (series)", catch_response=True
        ) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            body = response.json()
            _UPLOADED_AT[body["study_id"]] = time.perf_counter()
            if options.ledger:
                with Path(options.ledger).open("a") as ledger:
                    ledger.write(json.dumps({"t": time.time(), **body}) + "\n")
            if len(body["slice_ids"]) != len(series):
                response.failure(f"{len(body['slice_ids'])} of {len(series)} slices new")


class TriageScreenUser(HttpUser):
    """An open worklist page: the event stream, worklist refreshes, studies opened."""

    weight = 3
    wait_time = between(2, 5)

    def on_start(self) -> None:
        """Authorize, then open the event stream beside the task loop."""
        _authorize(self, self.client)
        self._alerts: deque[int] = deque()
        self._study_ids: list[int] = []
        self._watcher = gevent.spawn(self._watch)

    def on_stop(self) -> None:
        """Close the event stream with the page."""
        self._watcher.kill()

    @task(3)
    def refresh_worklist(self) -> None:
        """The worklist JSON, highest priority first."""
        with self.client.get("/api/studies", catch_response=True) as response:
            if response.status_code == 200:
                self._study_ids = [s["id"] for s in response.json()["studies"]]

    @task(1)
    def open_study(self) -> None:
        """The newest alert, or else a study from the last worklist."""
        if self._alerts:
            study_id = self._alerts.popleft()
        elif self._study_ids:
            study_id = random.choice(self._study_ids)
        else:
            return
        self.client.get(f"/api/studies/{study_id}", name="/api/studies/[id]")

    def _watch(self) -> None:
        """Hold ``/api/stream`` (its own session, as a browser's EventSource), reconnecting."""
        session = HttpSession(self.host, self.environment.events.request, self)
        _authorize(self, session)
        while True:
            # Reported when the headers arrive; a non-200 answer counts as a failure there.
            response = session.get(
                "/api/stream", stream=True, timeout=(10, 60), name="/api/stream (connect)"
            )
            try:
                if response.status_code == 200:
                    # chunk_size=None: each line as it arrives, not once 512 bytes piled up.
                    self._read_events(response.iter_lines(chunk_size=None))
            except RequestException as e:
                self._report("/api/stream (read)", 0.0, e)
            finally:
                response.close()
            gevent.sleep(_RECONNECT_S)

    def _read_events(self, raw_lines) -> None:
        for data in study_events(raw.decode() for raw in raw_lines):
            self._on_study(data)

    def _on_study(self, data: dict) -> None:
        """Queue alerts for opening; time each result of a series sent from this process."""
        status = data.get("status")
        if data.get("alert") and status == "flagged":
            self._alerts.append(data["id"])
        uploaded_at = _UPLOADED_AT.get(data["id"])
        if uploaded_at is not None and status in _RESULTS:
            self._report(f"{status} after upload", (time.perf_counter() - uploaded_at) * 1000)

    def _report(self, name: str, response_time_ms: float, error: Exception | None = None) -> None:
        """A stream observation as a locust request of type ``SSE``."""
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=response_time_ms,
            response_length=0,
            exception=error,
            context={},
        )


class TritonUser(User):
    """Another client of the same Triton: preprocessed batches over gRPC."""

    weight = 1

    def wait_time(self) -> float:
        """One request every ``--triton-pace-s`` seconds."""
        return constant_pacing(self.environment.parsed_options.triton_pace_s)(self)

    def on_start(self) -> None:
        """Connect (checks the model's tensors) and preprocess the batch once."""
        from client.triton_client import TritonClassifier

        options = self.environment.parsed_options
        spec = get_model(options.triton_model)
        self._classifier = TritonClassifier(spec, options.triton_url, "grpc")
        self._batch = np.stack(
            [
                preprocess_bytes(data, f"IM{i}.dcm", spec)
                for i, data in enumerate(phantom_series(options.triton_batch))
            ]
        )
        self._name = f"{spec.name} x{options.triton_batch}"

    def on_stop(self) -> None:
        """Close the gRPC channel."""
        self._classifier.close()

    @task
    def infer(self) -> None:
        """One batch; a typed client error marks the request failed."""
        with self.environment.events.request.measure("gRPC", self._name):
            self._classifier.predict(self._batch)
