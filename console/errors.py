"""Console-only failures, in the same family as :mod:`client.errors`.

Each class carries the HTTP status the console answers with; one error handler
(registered in :func:`console.create_app`) turns any :class:`HemoTriageError`
into ``{"error": <class name>, "message": <text>}`` with that status.

    raise UploadError("no files in the upload (form field 'files')")
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
from pathlib import Path

import psycopg

from client.errors import HemoTriageError


class UploadError(HemoTriageError):
    """The upload request itself is malformed: no files, a bad form field."""

    http_status = 400


class InvalidRequestError(HemoTriageError):
    """A field or query parameter has a value the console does not take (a feedback verdict)."""

    http_status = 400


class BadArchiveError(UploadError):
    """A ``.zip`` upload that cannot be read, or holds unsafe entries."""


class TooManyFilesError(UploadError):
    """More files (or more uncompressed bytes in a zip) than the configured limits."""

    http_status = 413


class StudyNotFoundError(HemoTriageError):
    """No study or slice with that id."""

    http_status = 404


class AuthenticationError(HemoTriageError):
    """No valid session or API token."""

    http_status = 401


class CsrfError(HemoTriageError):
    """A form or fetch without the session's CSRF token."""

    http_status = 400


class ConflictError(HemoTriageError):
    """The action does not fit the study's state (acknowledging an unfinished study)."""

    http_status = 409


class ForbiddenError(HemoTriageError):
    """The identity is known but its role does not allow this (an upload-only token reading)."""

    http_status = 403


class ImagePurgedError(HemoTriageError):
    """The study's stored images were deleted by the retention purge; its scores remain."""

    http_status = 410


class TooManyStreamsError(HemoTriageError):
    """Every live-stream slot is taken; the screen retries (kept free: health checks, uploads)."""

    http_status = 503


class StorageFullError(HemoTriageError):
    """The disk under the storage folder or the database is full; nothing was kept."""

    http_status = 507


class StorageBusyError(HemoTriageError):
    """The database stayed locked by another writer, or the disk failed; send it again."""

    http_status = 503


class DicomPortError(HemoTriageError):
    """The DICOM receiver cannot listen; the deployer changes DICOM_PORT or DICOM_BIND.

    The port is taken (another console, another DICOM node) or privileged, or the
    bind address is not one of this host's.
    """


#: Free bytes below which a failed write is put down to a full disk.
_NEARLY_FULL_BYTES = 1024 * 1024


#: SQLite result codes of the disk or the lock, not of the SQL (extended codes share the prefix).
_STORAGE_SQLITE_CODES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
)


#: Database errors that may be the storage's (lock, disk, connection) rather than the SQL's.
STORAGE_ERRORS = (sqlite3.OperationalError, psycopg.OperationalError)
#: PostgreSQL's SQLSTATE for a full disk (https://www.postgresql.org/docs/15/errcodes-appendix.html).
_PG_DISK_FULL = "53100"


def storage_error(
    error: OSError | sqlite3.Error | psycopg.Error, folder: Path
) -> HemoTriageError | None:
    """The typed error a sender sees when storing failed for lack of disk or lock.

    SQLite reports a full disk as "database or disk is full" or, in WAL mode,
    as a plain "disk I/O error", so the free space of ``folder`` decides too.
    On PostgreSQL an operational error (a lock wait past ``lock_timeout``, a
    lost or refused connection, a full disk) is the storage's.

    Returns:
        :class:`StorageFullError` or :class:`StorageBusyError`; None when the
        error is not the storage's (a bug in the SQL): "send it again" would not help.
    """
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorname", "") or ""
        if not code.startswith(_STORAGE_SQLITE_CODES):
            return None
    if isinstance(error, psycopg.Error):
        if not isinstance(error, psycopg.OperationalError):
            return None
        if error.sqlstate == _PG_DISK_FULL:
            return StorageFullError(f"the database's disk is full; nothing was stored ({error})")
        return StorageBusyError(
            f"the console could not store the upload now; send it again ({error})"
        )
    text = str(error)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "full" in text
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    if full:
        return StorageFullError(f"the console's disk is full; nothing was stored ({text})")
    return StorageBusyError(f"the console could not store the upload now; send it again ({text})")
