"""Fan-out of study updates to every open screen (Server-Sent Events), across nodes.

The worker, the upload handlers and the acknowledge action publish (the study
event through :func:`publish_study`, its one definition); each
``/api/stream`` connection subscribes with its own bounded queue. A node runs
one worker process (see ``console/gunicorn.conf.py``), so every screen of a
node hangs off the same :class:`EventBroker`. On SQLite (one node) events go
straight to the subscribers. On PostgreSQL they go out by ``NOTIFY`` and come
back through the process's one ``LISTEN`` connection
(:class:`console.postgres.Listener`), so a screen on node A sees the flag
raised by node B's worker, and each event reaches each local subscriber once.

    broker = EventBroker()                 # EventBroker(database=url) on PostgreSQL
    with broker.subscribe() as subscription:
        broker.publish("study", {"id": 7, "status": "flagged"})
        subscription.get(timeout_s=1)      # ("study", {...})
"""

from __future__ import annotations

import json
import logging
import queue
import threading

from console import postgres
from console.db import is_postgresql
from console.errors import TooManyStreamsError
from console.queue import StudyChange

logger = logging.getLogger(__name__)

#: Events kept for a slow subscriber before it starts dropping the oldest.
_MAX_PENDING = 256
#: Put into a subscription's inbox to wake its reader when the broker closes.
_END = ("", {})
#: The NOTIFY channel of study events (PostgreSQL).
CHANNEL = "hemotriage_events"


class Subscription:
    """One screen's inbox of ``(event, data)`` tuples; close it when the screen goes."""

    def __init__(self, broker: EventBroker) -> None:
        self._broker = broker
        self._inbox: queue.Queue = queue.Queue(maxsize=_MAX_PENDING)
        self.ended = False

    def get(self, timeout_s: float) -> tuple[str, dict] | None:
        """The next event, or None when nothing came within ``timeout_s`` or the stream ended."""
        try:
            message = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return None if message is _END else message

    def put(self, event: str, data: dict) -> None:
        """Queue one event; a full inbox drops its oldest event first."""
        self._offer((event, data))

    def end(self) -> None:
        """The server is going away: wake the reader, which sees ``ended`` and stops."""
        self.ended = True
        self._offer(_END)

    def _offer(self, item: tuple[str, dict]) -> None:
        while True:
            try:
                self._inbox.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._inbox.get_nowait()
                except queue.Empty:
                    continue

    def close(self) -> None:
        """Stop receiving events (safe to call twice)."""
        self._broker.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class EventBroker:
    """Publish/subscribe for named JSON events; thread-safe.

    Args:
        alerts: False in shadow mode (console/shadow.py): study events never carry an alert.
        database: The app's ``DATABASE``; a PostgreSQL URL carries events between nodes.
    """

    def __init__(self, alerts: bool = True, database: str | None = None) -> None:
        self.alerts = alerts
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._closed = False
        self._url = database if database is not None and is_postgresql(database) else None
        self._listener: postgres.Listener | None = None
        self._sender: postgres.PgConnection | None = None
        self._send_lock = threading.Lock()

    def subscribe(self, max_subscribers: int | None = None) -> Subscription:
        """A new subscription; it receives every event published until it is closed.

        After :meth:`close` the subscription is born ended.

        Args:
            max_subscribers: Refuse a new one past this many open (None: no cap).

        Raises:
            TooManyStreamsError: ``max_subscribers`` are open already.
        """
        subscription = Subscription(self)
        if self._url is not None:
            self._listen()
        with self._lock:
            if max_subscribers is not None and len(self._subscribers) >= max_subscribers:
                raise TooManyStreamsError(
                    f"{max_subscribers} live screens are connected already; "
                    "close one or raise HEMOTRIAGE_MAX_STREAMS (and the gunicorn threads)"
                )
            if not self._closed:
                self._subscribers.append(subscription)
                return subscription
        subscription.end()
        return subscription

    def close(self) -> None:
        """End every open stream now, and each later one at once.

        Called when the worker process shuts down: an open stream never ends by
        itself, so without this a graceful stop waits out gunicorn's whole
        ``graceful_timeout`` for the screens' connections. Screens reconnect
        (EventSource retries) to whichever process serves next.
        """
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
            listener, self._listener = self._listener, None
        for subscription in subscribers:
            subscription.end()
        if listener is not None:
            listener.stop()
        with self._send_lock:
            sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a subscription, if still subscribed."""
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    @property
    def subscriber_count(self) -> int:
        """Open subscriptions (one per connected screen)."""
        with self._lock:
            return len(self._subscribers)

    def publish(self, event: str, data: dict) -> None:
        """Send one event to every subscriber (on PostgreSQL, those of every node).

        A database that cannot be reached loses the event (logged): the
        change itself is committed, and screens redraw on the next event.
        """
        if self._url is None:
            self.deliver(event, data)
            return
        with self._send_lock:
            try:
                if self._sender is None:
                    self._sender = postgres.connect(self._url, busy_timeout_s=5.0)
                self._sender.notify(CHANNEL, {"event": event, "data": data})
            except postgres.Error as e:
                logger.warning("event %s not sent to the other nodes: %s", event, e)
                if self._sender is not None:
                    self._sender.close()
                self._sender = None

    def deliver(self, event: str, data: dict) -> None:
        """Hand one event to this process's subscribers."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.put(event, data)

    def _listen(self) -> None:
        """Start this process's LISTEN thread (once), before the first subscriber is added."""
        with self._lock:
            if self._closed:
                return
            if self._listener is None:
                self._listener = postgres.Listener(
                    self._url, CHANNEL, lambda message: self.deliver(**message)
                )
            listener = self._listener
        listener.start()


def publish_study(broker: EventBroker, change: StudyChange) -> None:
    """The one ``study`` event: a study changed status (``alert``: it has just been flagged).

    Every screen redraws the study from ``/api/studies`` on it, and raises the
    alarm when ``alert`` is true; ingest, the worker and acknowledging all send it.
    A broker of shadow mode never raises the alarm, and names only the study:
    each screen reads what its user may see (console/shadow.py).
    """
    if not broker.alerts:
        broker.publish("study", {"id": change.study_id, "alert": False})
        return
    broker.publish(
        "study",
        {
            "id": change.study_id,
            "status": change.after,
            "before": change.before,
            "alert": change.newly_flagged,
        },
    )


def format_sse(event: str, data: dict) -> str:
    """One SSE message (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
