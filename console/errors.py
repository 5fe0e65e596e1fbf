"""Console-only failures, in the same family as :mod:`client.errors`.

Each class carries the HTTP status the console answers with; one error handler
(registered in :func:`console.create_app`) turns any :class:`HemoTriageError`
into ``{"error": <class name>, "message": <text>}`` with that status.

    raise UploadError("no files in the upload (form field 'files')")
"""

from __future__ import annotations

from client.errors import HemoTriageError


class UploadError(HemoTriageError):
    """The upload request itself is malformed: no files, a bad form field."""

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
