"""DICOM slice reading: pixel data to Hounsfield units, plus the grouping UIDs.

pydicom does the parsing; JPEG Lossless and other compressed transfer syntaxes
decode through the pylibjpeg plugins it finds installed. Patient identifiers
are never copied out of the dataset: only UIDs and geometry travel on.

    meta, hu = read_dicom(Path("CT000000.dcm").read_bytes(), "CT000000.dcm")
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from client.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidImageError,
    MissingPixelDataError,
    MultiFrameDicomError,
    TruncatedFileError,
    UnsupportedModalityError,
    UnsupportedTransferSyntaxError,
)
from client.limits import MAX_PIXELS, MIN_SIDE_PX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomMeta:
    """Identifiers and geometry of one slice (no patient-identifying data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int | None
    slice_position_mm: float | None
    series_description: str


def looks_like_dicom(data: bytes) -> bool:
    """True for a Part 10 file: 128-byte preamble, then the ``DICM`` magic."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dicom(data: bytes, name: str) -> tuple[DicomMeta, np.ndarray]:
    """Decode one CT slice to Hounsfield units.

    Args:
        data: The file's bytes (Part 10, with preamble).
        name: File name, used in error messages only.

    Returns:
        The slice's identifiers and a float32 HxW array in HU.

    Raises:
        UnsupportedTransferSyntaxError: an encoding the decoder does not read,
            found from the file meta before the dataset is parsed.
        InvalidImageError: not parseable as DICOM.
        MissingPixelDataError: no PixelData element.
        UnsupportedModalityError: Modality (0008,0060) is not CT.
        MultiFrameDicomError: NumberOfFrames (0028,0008) above 1.
        ImageTooSmallError, ImageTooLargeError: Rows/Columns outside the limits.
        TruncatedFileError: the pixel data cannot be decoded.
    """
    _check_transfer_syntax(data, name)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as e:
        raise TruncatedFileError(f"{name}: DICOM header is damaged or cut short ({e})") from e

    modality = str(ds.get("Modality", "")).upper()
    if modality and modality != "CT":
        raise UnsupportedModalityError(
            f"{name}: modality is {modality}; hemorrhage triage reads CT only"
        )
    if "PixelData" not in ds:
        raise MissingPixelDataError(f"{name}: DICOM object has no pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MultiFrameDicomError(
            f"{name}: multi-frame DICOM ({frames} frames); send one slice per file"
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if min(rows, cols) < MIN_SIDE_PX:
        raise ImageTooSmallError(
            f"{name}: {cols}x{rows} px is smaller than {MIN_SIDE_PX} px a side"
        )
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(f"{name}: {cols}x{rows} px exceeds {MAX_PIXELS} pixels")

    try:
        stored = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, EOFError, OSError) as e:
        raise TruncatedFileError(f"{name}: pixel data cannot be decoded ({e})") from e
    if stored.ndim != 2:
        raise InvalidImageError(f"{name}: expected one grayscale slice, got shape {stored.shape}")

    # Stored values to HU: RescaleSlope (0028,1053) and RescaleIntercept (0028,1052).
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * slope + intercept

    position = ds.get("ImagePositionPatient")
    meta = DicomMeta(
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
        slice_position_mm=float(position[2]) if position is not None else None,
        series_description=str(ds.get("SeriesDescription", "")),
    )
    logger.debug(
        "decoded %s series=%s instance=%s", meta.sop_uid, meta.series_uid, meta.instance_number
    )
    return meta, hu


def _check_transfer_syntax(data: bytes, name: str) -> None:
    """Refuse what the decoder cannot read, from the file meta alone.

    The File Meta group (0002,eeee) is always Explicit VR Little Endian and is
    never deflated (PS3.10 section 7.1), so reading it costs no more than its
    own bytes. ``dcmread`` cannot be asked for less: with Deflated Explicit VR
    Little Endian it inflates the whole body first (PS3.5 A.5), even with
    ``stop_before_pixels``.
    """
    try:
        stream = io.BytesIO(data)
        read_preamble(stream, force=False)
        meta = read_dataset(
            stream, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta
        )
        syntax = meta.get("TransferSyntaxUID")
    except (InvalidDicomError, EOFError, ValueError, OSError) as e:
        raise TruncatedFileError(f"{name}: DICOM file meta is damaged or cut short ({e})") from e
    if not syntax:
        raise UnsupportedTransferSyntaxError(
            f"{name}: no Transfer Syntax UID (0002,0010) in the file meta; "
            "the pixel encoding is unknown"
        )
    syntax = UID(str(syntax)[:64])  # a UI value holds at most 64 characters (PS3.5 6.2)
    if not _decodable(syntax):
        raise UnsupportedTransferSyntaxError(
            f"{name}: transfer syntax {syntax} ({syntax.name}) is not supported; "
            "send it uncompressed or JPEG Lossless"
        )


def _past_file_meta(tag: int, _vr: str | None, _length: int) -> bool:
    return tag >> 16 != 0x0002


def _decodable(syntax: UID) -> bool:
    """Whether an installed pydicom pixel decoder reads ``syntax`` (never the deflated one)."""
    if syntax == DeflatedExplicitVRLittleEndian:
        return False
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:
        return False
