"""Accepting files: validate everything, then store durably, then queue.

The API upload and the inbox watcher both call :func:`ingest`. Every file (zip
archives expanded first) is decoded with :func:`client.decode.decode_bytes`
before anything is written, so one bad file rejects the whole upload with the
typed error of :mod:`client.errors` and leaves nothing behind. Accepted files
are stored in :mod:`console.filestore` (content-addressed, atomic and
durable), then their rows are committed in one transaction.

Grouping: DICOM slices form one study per (StudyInstanceUID,
SeriesInstanceUID); each PNG/JPEG is its own study unless a ``study`` label
groups them (the same label in a later upload adds to the same study).

    result = ingest(db, settings, [IncomingFile("slice.dcm", data)], source="api")
    result.study_ids
"""

from __future__ import annotations

import hashlib
import io
import logging
import lzma
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from werkzeug.utils import secure_filename

from client.constants import PRIORITY_ROUTINE
from client.decode import decode_bytes
from client.errors import ImageTooLargeError
from client.limits import MAX_FILE_BYTES
from client.registry import ModelSpec
from console.db import Connection, audit, begin_write
from console.errors import BadArchiveError, TooManyFilesError, UploadError
from console.filestore import relative_path, remove, store_files, stored_path
from console.queue import StudyChange, refresh_study, reopen

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
#: Zip members are inflated this many bytes at a time, so a bomb stops at the budget.
_ZIP_CHUNK_BYTES = 1024 * 1024
#: General purpose flag bit 0: the member is encrypted (APPNOTE.TXT 4.4.4).
_ZIP_ENCRYPTED_FLAG = 0x1
#: What zipfile and its codecs raise on a damaged archive or member: a bad header
#: (BadZipFile), a name that is not UTF-8 (ValueError), corrupt deflate, LZMA or
#: bzip2 streams (zlib.error, LZMAError, OSError), cut data (EOFError), an unknown
#: compression method (NotImplementedError).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
)
#: Longest ``study`` label a client may send.
MAX_LABEL_CHARS = 128


@dataclass(frozen=True)
class IncomingFile:
    """One file as received: the sender's name (untrusted) and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class IngestLimits:
    """Upload limits, from the app config.

    Attributes:
        max_files: Most files in one upload, after expanding zips; every zip
            entry counts, skipped ones (hidden, ``__MACOSX``) included.
        max_zip_bytes: Most uncompressed bytes all the zips of one upload may
            expand to together.
    """

    max_files: int
    max_zip_bytes: int


@dataclass(frozen=True)
class IngestResult:
    """What an accepted upload became (``ingest_ms``: validation time of each new slice)."""

    study_ids: list[int]
    slice_ids: list[int]
    duplicates: int
    ingest_ms: list[float] = field(default_factory=list)
    changes: list[StudyChange] = field(default_factory=list)


@dataclass(frozen=True)
class _Checked:
    """A decoded, accepted file waiting to be stored."""

    name: str
    data: bytes
    sha256: str
    suffix: str
    study_key: str
    label: str
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    instance_number: int | None
    slice_position_mm: float | None
    ingest_ms: float


class _UploadBudget:
    """One upload's file count and uncompressed zip bytes, spent across all its zips.

    A budget per zip would let eight small zips each expand to the whole limit.
    """

    def __init__(self, limits: IngestLimits) -> None:
        self._limits = limits
        self._files = 0
        self._zip_bytes = 0

    def count_files(self, count: int) -> None:
        """Spend ``count`` files (or zip entries).

        Raises:
            TooManyFilesError: the upload now holds more than ``max_files``.
        """
        self._files += count
        if self._files > self._limits.max_files:
            raise TooManyFilesError(
                f"more than {self._limits.max_files} files (zip entries included) in one upload"
            )

    def check_declared(self, name: str, declared_bytes: int) -> None:
        """Refuse a zip whose declared sizes alone exceed what is left (honest bombs, early).

        Raises:
            TooManyFilesError: the declared sizes do not fit the budget.
        """
        if self._zip_bytes + declared_bytes > self._limits.max_zip_bytes:
            raise TooManyFilesError(
                f"{name}: the upload's zips expand beyond {self._limits.max_zip_bytes} bytes"
            )

    def spend_zip_bytes(self, name: str, count: int) -> None:
        """Spend ``count`` inflated bytes, as they are read.

        Raises:
            TooManyFilesError: the upload's zips now exceed ``max_zip_bytes``.
        """
        self._zip_bytes += count
        self.check_declared(name, 0)


def expand(files: Iterable[IncomingFile], limits: IngestLimits) -> list[IncomingFile]:
    """Replace each zip archive by its member files; check the upload's limits.

    Raises:
        UploadError: nothing to ingest.
        BadArchiveError: a zip is damaged, encrypted or holds an unsafe (absolute, ``..``) path.
        TooManyFilesError: over ``limits.max_files`` files or ``limits.max_zip_bytes``.
        ImageTooLargeError: a zip member is larger than one file may be.
    """
    budget = _UploadBudget(limits)
    out: list[IncomingFile] = []
    for file in files:
        if file.data.startswith(_ZIP_MAGIC):
            out.extend(_unzip(file, budget))
        else:
            budget.count_files(1)
            out.append(file)
    if not out:
        raise UploadError("no files in the upload (multipart field 'files')")
    return out


def check(files: list[IncomingFile], label: str | None) -> list[_Checked]:
    """Decode every file and work out its study; nothing is written.

    Args:
        files: Expanded files.
        label: The ``study`` label grouping PNG/JPEG files, or None.

    Returns:
        One entry per file, in the given order.

    Raises:
        UploadError: a bad label.
        HemoTriageError: the first file that does not decode (typed, with its message).
    """
    if label is not None:
        label = label.strip()
        if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise UploadError(f"'study' must be 1 to {MAX_LABEL_CHARS} printable characters")
    checked = []
    for file in files:
        name = secure_filename(PurePosixPath(file.name.replace("\\", "/")).name) or "upload"
        start = time.perf_counter()
        image = decode_bytes(file.data, name)
        ingest_ms = (time.perf_counter() - start) * 1000
        meta = image.dicom
        if meta is not None:
            key = f"dicom:{meta.study_uid}/{meta.series_uid}"
            study_label = meta.series_description or "DICOM series"
            suffix = ".dcm"
        else:
            key = f"named:{label}" if label else f"upload:{uuid.uuid4().hex}"
            study_label = label or name
            suffix = ".png" if file.data.startswith(b"\x89PNG") else ".jpg"
        checked.append(
            _Checked(
                name=name,
                data=file.data,
                sha256=hashlib.sha256(file.data).hexdigest(),
                suffix=suffix,
                study_key=key,
                label=study_label,
                study_uid=meta.study_uid if meta else None,
                series_uid=meta.series_uid if meta else None,
                sop_uid=meta.sop_uid if meta else None,
                instance_number=meta.instance_number if meta else None,
                slice_position_mm=meta.slice_position_mm if meta else None,
                ingest_ms=ingest_ms,
            )
        )
    return checked


def ingest(
    db: Connection,
    storage_dir: Path,
    spec: ModelSpec,
    files: list[IncomingFile],
    limits: IngestLimits,
    *,
    label: str | None = None,
    source: str = "api",
    priority: int = PRIORITY_ROUTINE,
    actor: str | None = None,
    via: str | None = None,
) -> IngestResult:
    """Validate, store, queue and audit an upload; all or nothing.

    Args:
        db: Connection outside any open transaction.
        storage_dir: Root of stored uploads.
        spec: Model whose thresholds set the status of studies that gain slices.
        files: The upload as received (zips allowed).
        limits: File count and zip size limits.
        label: ``study`` label grouping PNG/JPEG files.
        source: Where it came from (``api``, ``upload``, ``inbox``), shown on the worklist.
        priority: Queue priority of the new slices (``PRIORITY_URGENT`` first).
        actor: Who the audit log names (a user; default: ``source``).
        via: How it came, for the audit row (``token pacs-bridge``; default: ``source``).

    Returns:
        The studies touched, the new slice ids and how many files were duplicates.

    Raises:
        HemoTriageError: the typed reason the upload was refused; nothing is stored.
    """
    checked = check(expand(files, limits), label)
    written = store_files(storage_dir, [(_relative_path(c), c.data) for c in checked])
    try:
        with db:
            begin_write(db)
            result, kept = _insert(db, spec, checked, source, priority)
            # In the upload's own transaction: no upload is kept without its audit row.
            audit(
                db,
                actor or source,
                "upload",
                result.study_ids[0],
                f"{len(result.slice_ids)} slices ({result.duplicates} duplicates) into studies "
                f"{', '.join(map(str, result.study_ids))} via {via or source}",
            )
    except BaseException:
        remove(written)
        raise
    # A SOP instance already stored under other bytes was written above but got no row.
    remove(set(written) - {stored_path(storage_dir, relative) for relative in kept})
    logger.info(
        "accepted %d slices (%d duplicates) into studies %s from %s",
        len(result.slice_ids),
        result.duplicates,
        result.study_ids,
        source,
    )
    return result


def _insert(
    db: Connection,
    spec: ModelSpec,
    checked: list[_Checked],
    source: str,
    priority: int,
) -> tuple[IngestResult, set[str]]:
    """Insert the rows; return the result and the stored paths that rows now refer to.

    A slice already in its study (the same bytes, or the same SOP Instance UID
    in other bytes) is counted as a duplicate and gets no row.
    """
    now = time.time()
    kept: set[str] = set()
    study_ids: dict[str, int] = {}
    slice_ids: list[int] = []
    ingest_ms: list[float] = []
    duplicates = 0
    for item in checked:
        if item.study_key not in study_ids:
            row = db.execute(
                "SELECT id FROM studies WHERE study_key = ?", (item.study_key,)
            ).fetchone()
            if row is None:
                row = db.execute(
                    "INSERT INTO studies (study_key, label, study_uid, series_uid, source, "
                    "priority, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "RETURNING id",
                    (
                        item.study_key,
                        item.label,
                        item.study_uid,
                        item.series_uid,
                        source,
                        priority,
                        now,
                        now,
                    ),
                ).fetchone()
            study_ids[item.study_key] = row["id"]
        cursor = db.execute(
            "INSERT INTO slices (study_id, filename, stored_path, sha256, sop_uid, "
            "instance_number, slice_position_mm, priority, queued_at, ingest_ms) "
            # No conflict target: UNIQUE (study_id, sha256) and the slices_sop index both apply.
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING "
            "RETURNING id",
            (
                study_ids[item.study_key],
                item.name,
                _relative_path(item),
                item.sha256,
                item.sop_uid,
                item.instance_number,
                item.slice_position_mm,
                priority,
                now,
                item.ingest_ms,
            ),
        )
        row = cursor.fetchone()
        if row is None:
            duplicates += 1
        else:
            slice_ids.append(row["id"])
            ingest_ms.append(item.ingest_ms)
            kept.add(_relative_path(item))
    touched = sorted(set(study_ids.values()))
    changes = []
    for study_id in touched:
        if db.execute(
            "SELECT 1 FROM slices WHERE study_id = ? AND status = 'queued'", (study_id,)
        ).fetchone():
            reopen(db, study_id)
            changes.append(refresh_study(db, study_id, spec))
    return IngestResult(touched, slice_ids, duplicates, ingest_ms, changes), kept


def _relative_path(item: _Checked) -> str:
    return relative_path(item.sha256, item.suffix)


def _unzip(file: IncomingFile, budget: _UploadBudget) -> list[IncomingFile]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(file.data))
    except _ZIP_ERRORS as e:
        raise BadArchiveError(f"{file.name}: not a readable zip archive ({e})") from e
    # zipfile cuts a name at its first NUL; an empty one breaks ZipInfo.is_dir (IndexError).
    if any(not info.filename for info in archive.infolist()):
        raise BadArchiveError(f"{file.name}: an entry has no name")
    infos = [i for i in archive.infolist() if not i.is_dir()]
    # Skipped entries still count: a zip of a million hidden files is no upload.
    budget.count_files(len(infos))
    members = [i for i in infos if not _ignored_member(i.filename)]
    # Declared sizes can lie; reading is capped below, this refuses honest bombs early.
    budget.check_declared(file.name, sum(i.file_size for i in members))
    out = []
    for info in members:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts:
            raise BadArchiveError(f"{file.name}: unsafe path {info.filename!r} in archive")
        if info.flag_bits & _ZIP_ENCRYPTED_FLAG:
            raise BadArchiveError(f"{file.name}: {info.filename!r} is encrypted; send it unlocked")
        try:
            data = _read_member(archive, info, budget, file.name)
        except _ZIP_ERRORS as e:
            raise BadArchiveError(f"{file.name}: {info.filename!r} cannot be read ({e})") from e
        out.append(IncomingFile(parts[-1], data))
    return out


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _UploadBudget, name: str
) -> bytes:
    """Inflate one member a chunk at a time, stopping as soon as a limit is passed."""
    chunks: list[bytes] = []
    size = 0
    with archive.open(info) as member:
        while chunk := member.read(_ZIP_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise ImageTooLargeError(
                    f"{name}: {info.filename!r} expands beyond {MAX_FILE_BYTES} bytes"
                )
            budget.spend_zip_bytes(name, len(chunk))
            chunks.append(chunk)
    return b"".join(chunks)


def _ignored_member(name: str) -> bool:
    """Resource forks (macOS) and hidden files are not slices."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not parts or parts[0] == "__MACOSX" or parts[-1].startswith(".")
