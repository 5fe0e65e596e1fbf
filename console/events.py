"""In-process fan-out of study updates to every open screen (Server-Sent Events).

The worker, the upload handlers and the acknowledge action publish (the study
event through :func:`publish_study`, its one definition); each
``/api/stream`` connection subscribes with its own bounded queue. The console
runs one worker process (see ``console/gunicorn.conf.py``), so every screen
hangs off the same :class:`EventBroker`.

    broker = EventBroker()
    with broker.subscribe() as subscription:
        broker.publish("study", {"id": 7, "status": "flagged"})
        subscription.get(timeout_s=1)      # ("study", {...})
"""

from __future__ import annotations

import json
import queue
import threading

from console.errors import TooManyStreamsError
from console.queue import StudyChange

#: Events kept for a slow subscriber before it starts dropping the oldest.
_MAX_PENDING = 256
#: Put into a subscription's inbox to wake its reader when the broker closes.
_END = ("", {})


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
    """

    def __init__(self, alerts: bool = True) -> None:
        self.alerts = alerts
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._closed = False

    def subscribe(self, max_subscribers: int | None = None) -> Subscription:
        """A new subscription; it receives every event published until it is closed.

        After :meth:`close` the subscription is born ended.

        Args:
            max_subscribers: Refuse a new one past this many open (None: no cap).

        Raises:
            TooManyStreamsError: ``max_subscribers`` are open already.
        """
        subscription = Subscription(self)
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
        for subscription in subscribers:
            subscription.end()

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
        """Send one event to every subscriber."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.put(event, data)


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
