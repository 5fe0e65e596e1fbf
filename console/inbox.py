"""The watched inbox folder: drop files (or one folder per study) in, they are ingested.

A poll thread looks at ``INBOX_DIR`` every ``INBOX_POLL_S`` seconds. Each entry
at the top level whose newest modification is older than ``INBOX_SETTLE_S``
(so half-copied files are left alone) becomes one upload through the same
:func:`console.ingest.ingest` as the API: a single file, a zip, or a folder
(its PNG/JPEG files grouped into one study named after the folder). Accepted
entries are deleted once stored; refused ones move to ``INBOX_DIR/rejected``
beside a ``.reason.txt`` that holds the error's class and message, whatever
the error (a file must never stop the watcher). A failing disk or database
leaves the entry in place for the next scan.

    watcher = InboxWatcher(Path("/srv/inbox"), poll_s=2, settle_s=2, accept=accept)
    watcher.start()
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from client.errors import HemoTriageError, ImageTooLargeError
from client.limits import MAX_FILE_BYTES
from console.db import DATABASE_ERRORS
from console.errors import StorageBusyError, StorageFullError
from console.ingest import IncomingFile, IngestResult
from console.threads import LoopThread

logger = logging.getLogger(__name__)

#: Folder inside the inbox where refused entries are kept for a person to look at.
REJECTED = "rejected"

Accept = Callable[[list[IncomingFile], str | None], IngestResult]

#: Failures of the disk or the database, not of an entry's content: the entry is retried.
_TRANSIENT = (OSError, *DATABASE_ERRORS, StorageFullError, StorageBusyError)


class InboxWatcher:
    """Polls a folder and ingests what settles there.

    Args:
        inbox: The watched folder (created if missing).
        poll_s: Seconds between scans.
        settle_s: An entry must be unchanged this long before it is read.
        accept: Ingests one upload: ``accept(files, study_label)``.
    """

    def __init__(self, inbox: Path, poll_s: float, settle_s: float, accept: Accept) -> None:
        self.inbox = Path(inbox)
        self.poll_s = poll_s
        self.settle_s = settle_s
        self._accept = accept
        self._thread = LoopThread("hemotriage-inbox", self._loop)

    def start(self) -> None:
        """Create the folders and start polling in a daemon thread (once)."""
        (self.inbox / REJECTED).mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling after the current entry."""
        self._thread.stop(timeout_s)

    def is_alive(self) -> bool:
        """The poll thread runs (False before start, after stop, or if it died)."""
        return self._thread.is_alive()

    def scan_once(self) -> int:
        """Ingest or reject every settled entry; return how many were handled.

        An entry that meets a transient failure (disk, database) stays where it
        is for the next scan, and the scan goes on to the other entries.
        """
        (self.inbox / REJECTED).mkdir(parents=True, exist_ok=True)
        handled = 0
        now = time.time()
        for entry in sorted(self.inbox.iterdir()):
            if entry.name.startswith(".") or entry.name == REJECTED:
                continue
            try:
                if now - _newest_mtime(entry) < self.settle_s:
                    continue
                self._handle(entry)
            except _TRANSIENT as e:
                # The entry's name may carry a patient's name: log the error class only.
                logger.warning("inbox entry left for a retry (%s)", type(e).__name__)
                continue
            handled += 1
        return handled

    def _handle(self, entry: Path) -> None:
        """Ingest one entry, or move it to rejected/ whatever its content makes the ingest raise.

        Raises:
            OSError, DATABASE_ERRORS, StorageFullError, StorageBusyError: the disk or the
                database failed; retry later.
        """
        label = entry.name if entry.is_dir() else None
        try:
            files = _read_entry(entry)
            result = self._accept(files, label)
        except _TRANSIENT:
            raise
        except Exception as e:
            if not isinstance(e, HemoTriageError):
                # A file must never stop the watcher: an untyped failure is a decoder bug,
                # reported as one, but the entry is set aside like any refused one.
                logger.error("inbox entry failed with an untyped error (%s)", type(e).__name__)
            self._reject(entry, e)
            return
        _remove(entry)
        logger.info("inbox entry ingested into studies %s", result.study_ids)

    def _reject(self, entry: Path, error: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.inbox / REJECTED / f"{stamp}-{entry.name}"
        shutil.move(entry, target)
        # Names that are not UTF-8 reach Python as surrogates; write them as escapes.
        target.with_name(target.name + ".reason.txt").write_text(
            f"{type(error).__name__}: {error}\n", encoding="utf-8", errors="backslashreplace"
        )
        # The entry's name may carry a patient's name: log the error class only.
        logger.warning("inbox entry rejected (%s); moved to %s/", type(error).__name__, REJECTED)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.scan_once()
            except _TRANSIENT:
                # The inbox itself cannot be listed (unmounted, locked): try again next poll.
                logger.exception("inbox scan failed; retrying in %.1f s", self.poll_s)
            stop.wait(self.poll_s)


def _read_entry(entry: Path) -> list[IncomingFile]:
    paths = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
    files = []
    for path in paths:
        if any(part.startswith(".") for part in path.relative_to(entry.parent).parts):
            continue
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageTooLargeError(f"{path.name}: {size} bytes exceeds {MAX_FILE_BYTES} bytes")
        files.append(IncomingFile(path.name, path.read_bytes()))
    return files


def _newest_mtime(entry: Path) -> float:
    if entry.is_dir():
        return max((p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime)
    return entry.stat().st_mtime


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink()
