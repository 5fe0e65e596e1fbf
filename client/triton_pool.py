"""Which of several Triton servers takes the next request, and which are out of rotation.

A Kubernetes Service balances per TCP connection, and tritonclient's gRPC keeps
one long-lived HTTP/2 connection per client: every request of a console would
go to whichever Triton pod that connection reached first, and a scaled-out
Deployment would sit idle. So the client spreads requests itself over the
servers listed in ``HEMOTRIAGE_TRITON_URL``: the ready server with the fewest
requests in flight from this process, ties taken in turn (round robin), so one
caller alternates evenly and several threads never pile onto a slow server.

A server that fails (connection refused or reset, an UNAVAILABLE answer, a
failed health check) leaves the rotation. It is health-checked again when its
backoff has passed (doubling from ``backoff_initial_s`` to ``backoff_max_s``),
on the next request or readiness probe, and comes back once the check passes.
When no server is ready the one due soonest is tried anyway, so a single
server behaves as before: the caller's retries decide.

    pool = ServerPool(("triton-0:8001", "triton-1:8001"), check=health_check)
    url = pool.acquire()
    try:
        ...  # the request
    finally:
        pool.release(url)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.errors import HemoTriageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerStatus:
    """One server as the pool sees it (``/readyz``, ``/metrics``).

    Attributes:
        url: ``host:port`` as listed.
        up: In rotation: requests go to it.
        outstanding: Requests of this process in flight on it.
        reason: Why it is out of rotation ("" while up).
    """

    url: str
    up: bool
    outstanding: int
    reason: str


@dataclass
class _Server:
    url: str
    up: bool = True
    outstanding: int = 0
    reason: str = ""
    backoff_s: float = 0.0
    check_at: float = 0.0  # time.monotonic() of the next health check while down
    checking: bool = False


def parse_urls(text: str) -> tuple[str, ...]:
    """Split a comma-separated ``HEMOTRIAGE_TRITON_URL`` into server URLs.

    Raises:
        ValueError: an empty entry, or one listed twice.
    """
    urls = tuple(part.strip() for part in text.split(","))
    if not all(urls):
        raise ValueError(f"Triton URL list {text!r} has an empty entry")
    if len(set(urls)) != len(urls):
        raise ValueError(f"Triton URL list {text!r} names a server twice")
    return urls


class ServerPool:
    """Least-outstanding choice over ready servers, with health-checked re-admission.

    Thread-safe: the console's worker, its readiness probe and metrics scrapes
    share one pool.

    Args:
        urls: The servers, in the order ties are taken.
        check: Health check of one URL; raises :class:`HemoTriageError` when the
            server or its model is not ready. Runs outside the pool's lock.
        backoff_initial_s: Wait before the first health check of a failed server
            (0: on the next request).
        backoff_max_s: Longest wait between two health checks of a server.
    """

    def __init__(
        self,
        urls: Sequence[str],
        check: Callable[[str], None],
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        if not urls:
            raise ValueError("no Triton server listed")
        if not 0 <= backoff_initial_s <= backoff_max_s:
            raise ValueError("backoff_initial_s must be in 0..backoff_max_s")
        self._servers = [_Server(url) for url in urls]
        self._check = check
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> str:
        """Take the server for the next request; :meth:`release` it after.

        Health-checks the failed servers whose backoff has passed first, so a
        restarted server rejoins with the traffic. Prefers ready servers with
        the fewest requests in flight, ties in turn; with none ready, the
        failed server due to be checked soonest.
        """
        self.check_due()
        with self._lock:
            ready = [s for s in self._servers if s.up]
            if ready:
                fewest = min(s.outstanding for s in ready)
                count = len(self._servers)
                order = (self._servers[(self._next + k) % count] for k in range(count))
                server = next(s for s in order if s.up and s.outstanding == fewest)
                self._next = (self._servers.index(server) + 1) % count
            else:
                server = min(self._servers, key=lambda s: s.check_at)
            server.outstanding += 1
            return server.url

    def release(self, url: str) -> None:
        """The request on ``url`` finished (answered, failed or timed out)."""
        with self._lock:
            self._server(url).outstanding -= 1

    def mark_down(self, url: str, error: Exception) -> None:
        """Take ``url`` out of rotation after ``error``; a health check is due after backoff."""
        with self._lock:
            server = self._server(url)
            was_up = server.up
            server.backoff_s = (
                self._backoff_initial_s
                if was_up
                else min(2 * server.backoff_s, self._backoff_max_s)
            )
            server.up = False
            server.reason = str(error)
            server.check_at = time.monotonic() + server.backoff_s
            several = len(self._servers) > 1
        if was_up and several:
            logger.warning("Triton %s out of rotation: %s", url, error)

    def mark_up(self, url: str) -> None:
        """Put ``url`` back into rotation (it answered a request or a health check)."""
        with self._lock:
            server = self._server(url)
            was_down = not server.up
            server.up, server.reason, server.backoff_s = True, "", 0.0
            several = len(self._servers) > 1
        if was_down and several:
            logger.warning("Triton %s back in rotation", url)

    def check_due(self) -> None:
        """Health-check each failed server whose backoff has passed (outside the lock)."""
        now = time.monotonic()
        with self._lock:
            due = [s for s in self._servers if not s.up and not s.checking and s.check_at <= now]
            for server in due:
                server.checking = True
        for server in due:
            try:
                self._check(server.url)
            except HemoTriageError as e:
                self.mark_down(server.url, e)
            else:
                self.mark_up(server.url)
            finally:
                with self._lock:
                    server.checking = False

    def has_ready(self) -> bool:
        """Whether any server is in rotation."""
        with self._lock:
            return any(s.up for s in self._servers)

    def statuses(self) -> tuple[ServerStatus, ...]:
        """Every server's state, in listed order."""
        with self._lock:
            return tuple(ServerStatus(s.url, s.up, s.outstanding, s.reason) for s in self._servers)

    def _server(self, url: str) -> _Server:
        return next(s for s in self._servers if s.url == url)
