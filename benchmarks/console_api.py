"""The console's JSON API and live stream, as the benchmarks use them over HTTP.

Benchmarks never import ``console/``: they talk to a running console the way a
PACS bridge (``POST /api/scans``) and a triage screen (``/api/stream``) do.
The locust users speak through locust's own HTTP session, but read the stream
with the same :func:`study_events`.

    api = ConsoleApi("http://127.0.0.1:5000", token)
    with api.events() as stream:
        study_id = api.upload([("IM0001.dcm", data)], None)["study_id"]
        event = stream.get(timeout_s=30)
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import urllib3

#: Seconds an upload may take: the 201 comes after every file is decoded, stored and queued.
_UPLOAD_TIMEOUT_S = 120
_READ_TIMEOUT_S = 30
_STREAM_TIMEOUT_S = 60


def auth_headers(token: str) -> dict[str, str]:
    """The ``Authorization`` header of an API token (``create-token``)."""
    return {"Authorization": f"Bearer {token}"}


def upload_body(files: list[tuple[str, bytes]], label: str | None) -> tuple[bytes, str]:
    """The multipart/form-data body of ``POST /api/scans`` and its Content-Type."""
    fields = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return urllib3.encode_multipart_formdata(fields + ([("study", label)] if label else []))


def study_events(lines: Iterable[str]) -> Iterator[dict]:
    """The data of each ``study`` event in Server-Sent Events lines, as each arrives.

    Args:
        lines: The stream's lines, decoded, without their line break.

    Yields:
        The JSON data of every ``event: study``; other events and comments are skipped.
    """
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name == "study":
            yield json.loads(line.removeprefix("data: "))
        elif not line:  # a blank line ends the event
            name = ""


class ConsoleApi:
    """The console's JSON API with a Bearer token (stdlib HTTP, one connection a call)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._headers = auth_headers(token)

    def upload(self, files: list[tuple[str, bytes]], label: str | None) -> dict:
        """``POST /api/scans``; returns the 201 body."""
        body, content_type = upload_body(files, label)
        request = urllib.request.Request(
            self.url + "/api/scans",
            data=body,
            headers={**self._headers, "Content-Type": content_type},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=_UPLOAD_TIMEOUT_S) as response:
            return json.load(response)

    def study(self, study_id: int) -> dict:
        """``GET /api/studies/<id>``: status, scores and every slice's stage timings."""
        request = urllib.request.Request(
            f"{self.url}/api/studies/{study_id}", headers=self._headers
        )
        with urllib.request.urlopen(request, timeout=_READ_TIMEOUT_S) as response:
            return json.load(response)

    @contextlib.contextmanager
    def events(self) -> Iterator[EventStream]:
        """``/api/stream``, subscribed before this returns; closed on exit."""
        request = urllib.request.Request(
            self.url + "/api/stream", headers={**self._headers, "Accept": "text/event-stream"}
        )
        stream = EventStream(urllib.request.urlopen(request, timeout=_STREAM_TIMEOUT_S))
        try:
            yield stream
        finally:
            stream.close()


#: Slice states that end a slice's work (classified or failed with a reason).
SLICE_DONE = frozenset({"classified", "failed"})


@dataclass(frozen=True)
class StudyEvent:
    """A ``study`` event as it arrived: monotonic and wall-clock time, and its data."""

    at: float
    wall: float
    data: dict


def completes(detail: dict, event: StudyEvent, slices: int) -> bool:
    """Whether ``event`` announced the study's result on the whole series.

    Every slice must be finished, and the event must have been read after the
    study's last ``finished_at``: an event published for part of the series
    (one POST per slice) may still be waiting in the stream when the clock starts.
    """
    counts = detail["slices"]
    return (
        set(counts) <= SLICE_DONE
        and sum(counts.values()) == slices
        and event.wall >= detail["finished_at"]
    )


class EventStream:
    """Reads Server-Sent Events on a daemon thread and timestamps each ``study`` event."""

    def __init__(self, response) -> None:
        self._response = response
        self._inbox: queue.Queue[StudyEvent] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="sse-reader", daemon=True)
        self._thread.start()

    def get(self, timeout_s: float) -> StudyEvent | None:
        """The next study event, or None after ``timeout_s``."""
        try:
            return self._inbox.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def drain(self) -> list[StudyEvent]:
        """Every event received so far and not yet taken."""
        out = []
        while (event := self.get(0.0)) is not None:
            out.append(event)
        return out

    def close(self) -> None:
        """Close the connection; the reader thread ends with it."""
        self._response.close()

    def _read(self) -> None:
        # The loop ends when close() drops the connection under it; http.client then
        # raises OSError, ValueError or (mid-chunk) AttributeError.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            lines = (raw.decode().rstrip("\r\n") for raw in self._response)
            for data in study_events(lines):
                self._inbox.put(StudyEvent(time.monotonic(), time.time(), data))
