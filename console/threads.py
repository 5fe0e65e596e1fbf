"""One named daemon thread with a stop flag: started once, stopped, probed for liveness.

The inbox watcher and the results thread each run one loop; this owns the
thread around it, so ``/readyz`` and ``hemotriage_thread_up`` ask every loop
the same question.

    runner = LoopThread("hemotriage-inbox", loop)   # loop(stop) returns once stop is set
    runner.start()
    runner.is_alive()
    runner.stop()
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class LoopThread:
    """Runs ``loop(stop)`` in a daemon thread; ``loop`` must return soon after ``stop`` is set.

    Args:
        name: The thread's name (seen in stack dumps and logs).
        loop: The work; it waits on ``stop`` (``stop.wait(poll_s)``) between rounds.
    """

    def __init__(self, name: str, loop: Callable[[threading.Event], None]) -> None:
        self.name = name
        self._loop = loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once; again only after :meth:`stop`)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(self._stop,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Set the stop flag and wait up to ``timeout_s`` for the loop to return."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def is_alive(self) -> bool:
        """The thread runs (False before start, after stop, or if the loop died)."""
        return self._thread is not None and self._thread.is_alive()
