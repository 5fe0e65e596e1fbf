"""The store of accepted slice files: content-addressed, written atomically and durably.

Ingest writes here; the worker, the slice views and Grad-CAM read through
:func:`stored_path`, which refuses any path outside the store. A file exists
whole or not at all (temporary name, fsync, rename, fsync of the folder), so a
crash never leaves a half-written slice behind a committed row.

    written = store_files(storage_dir, [("ab/ab12….dcm", data)])
    path = stored_path(storage_dir, row["stored_path"])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from console.errors import UploadError

#: Folder under ``STORAGE_DIR`` that holds the stored slices.
UPLOADS = "uploads"


def relative_path(sha256: str, suffix: str) -> str:
    """Where a file with this content hash is stored, relative to the store."""
    return f"{sha256[:2]}/{sha256}{suffix}"


def stored_path(storage_dir: Path, relative: str) -> Path:
    """Absolute path of a stored file, refusing anything outside ``storage_dir/uploads``.

    Raises:
        UploadError: the relative path escapes the store.
    """
    root = (Path(storage_dir) / UPLOADS).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UploadError("stored path escapes the upload folder")
    return path


def store_files(storage_dir: Path, files: Iterable[tuple[str, bytes]]) -> list[Path]:
    """Write each ``(relative path, bytes)`` not stored yet; return the paths this call created.

    On any failure the files this call wrote are removed again, so a refused
    upload leaves nothing behind.
    """
    written: list[Path] = []
    try:
        for relative, data in files:
            path = stored_path(storage_dir, relative)
            if path.exists():
                continue  # content-addressed: the same bytes are already on disk
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(path, data)
            written.append(path)
    except BaseException:
        remove(written)
        raise
    return written


def remove(paths: Iterable[Path]) -> None:
    """Delete stored files (missing ones are fine)."""
    for path in paths:
        path.unlink(missing_ok=True)


def write_durably(path: Path, data: bytes) -> None:
    """Temp file, fsync, atomic rename, fsync the folder: the file exists whole or not at all."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
