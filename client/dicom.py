"""DICOM slice reading: pixel data to Hounsfield units, plus the grouping UIDs.

pydicom does the parsing; JPEG Lossless and other compressed transfer syntaxes
decode through the pylibjpeg plugins it finds installed. Patient identifiers
are never copied out of the dataset: only UIDs and geometry travel on.

    meta, hu = read_dicom(Path("CT000000.dcm").read_bytes(), "CT000000.dcm")
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from client.codestream import size_reader
from client.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidDicomFieldError,
    InvalidImageError,
    MissingPixelDataError,
    MultiFrameDicomError,
    TruncatedFileError,
    UnsupportedModalityError,
    UnsupportedTransferSyntaxError,
)
from client.limits import MAX_PIXELS, MIN_SIDE_PX

logger = logging.getLogger(__name__)

#: What pydicom raises on a damaged file, a value its VR does not allow, or pixel
#: data that does not match its attributes: its own errors plus the built-ins its
#: parsers and decoders let through (struct.error from a short element, KeyError
#: from an unknown VR, AttributeError from a missing required element).
_PYDICOM_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    RuntimeError,
    NotImplementedError,
    struct.error,
)
#: The only elements read from a dataset: what the decoding and the grouping use, and the
#: Image Pixel module pydicom's pixel decoders read. Other elements of defined length are
#: skipped unread, so a file of millions of tiny private elements costs no memory (it took
#: 2.3 GB for a 57 MB file when every element was read).
_READ_KEYWORDS = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
)
#: A UI value: digits and dots, at most 64 characters (PS3.5 6.2).
_UID_PATTERN = re.compile(r"[0-9.]{1,64}")
#: PhotometricInterpretation values a CT image may have.
_CT_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


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
        InvalidDicomFieldError: a field the decoding needs is missing or holds a
            value its VR does not allow (the message names it), the rescale
            takes the pixels beyond finite float32, or a Study, Series or SOP
            Instance UID is missing or malformed.
        TruncatedFileError: the pixel data cannot be decoded.
    """
    syntax = _check_transfer_syntax(data, name)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(_READ_KEYWORDS))
    except _PYDICOM_ERRORS as e:
        raise TruncatedFileError(f"{name}: DICOM header is damaged or cut short ({e})") from e

    modality = str(_value(ds, "Modality", name) or "").upper()
    if modality and modality != "CT":
        raise UnsupportedModalityError(
            f"{name}: modality is {modality[:16]}; hemorrhage triage reads CT only"
        )
    if "PixelData" not in ds:
        raise MissingPixelDataError(f"{name}: DICOM object has no pixel data (not an image)")
    frames = _integer(ds, "NumberOfFrames", name)
    frames = 1 if frames is None else frames
    if frames < 1:
        raise InvalidDicomFieldError(f"{name}: NumberOfFrames (0028,0008) is {frames}")
    if frames > 1:
        raise MultiFrameDicomError(
            f"{name}: multi-frame DICOM ({frames} frames); send one slice per file"
        )
    rows, cols = _required_integer(ds, "Rows", name), _required_integer(ds, "Columns", name)
    if min(rows, cols) < MIN_SIDE_PX:
        raise ImageTooSmallError(
            f"{name}: {cols}x{rows} px is smaller than {MIN_SIDE_PX} px a side"
        )
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(f"{name}: {cols}x{rows} px exceeds {MAX_PIXELS} pixels")
    photometric = _value(ds, "PhotometricInterpretation", name)
    if photometric not in _CT_PHOTOMETRIC:
        # CT Image Module: MONOCHROME1 or MONOCHROME2 only (PS3.3 C.8.2.1.1.2).
        raise InvalidDicomFieldError(
            f"{name}: PhotometricInterpretation (0028,0004) is {_shown(photometric)}, "
            "not MONOCHROME1 or MONOCHROME2"
        )

    _check_frame_size(ds, syntax, rows, cols, name)
    try:
        stored = ds.pixel_array
    except _PYDICOM_ERRORS as e:
        raise TruncatedFileError(
            f"{name}: PixelData (7FE0,0010) cannot be decoded as its image attributes say ({e})"
        ) from e
    if stored.ndim != 2:
        raise InvalidImageError(f"{name}: expected one grayscale slice, got shape {stored.shape}")

    # Stored values to HU: RescaleSlope (0028,1053) and RescaleIntercept (0028,1052).
    slope = _number(ds, "RescaleSlope", name, default=1.0)
    if slope == 0:
        raise InvalidDicomFieldError(f"{name}: RescaleSlope (0028,1053) is 0")
    intercept = _number(ds, "RescaleIntercept", name, default=0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(hu).all():
        raise InvalidDicomFieldError(
            f"{name}: RescaleSlope (0028,1053) {slope:g} and RescaleIntercept (0028,1052) "
            f"{intercept:g} take the pixels beyond float32"
        )

    position = _numbers(ds, "ImagePositionPatient", name, count=3)
    meta = DicomMeta(
        study_uid=_uid(ds, "StudyInstanceUID", name),
        series_uid=_uid(ds, "SeriesInstanceUID", name),
        sop_uid=_uid(ds, "SOPInstanceUID", name),
        instance_number=_integer(ds, "InstanceNumber", name),
        slice_position_mm=position[2] if position is not None else None,
        # LO holds at most 64 characters (PS3.5 6.2); the label is shown on the worklist.
        series_description=str(_value(ds, "SeriesDescription", name) or "")[:64],
    )
    logger.debug(
        "decoded %s series=%s instance=%s", meta.sop_uid, meta.series_uid, meta.instance_number
    )
    return meta, hu


def _value(ds: pydicom.Dataset, keyword: str, name: str) -> object:
    """An element's value, None when absent or empty.

    pydicom converts a value when it is first read, so a value the VR does not
    allow fails here; the error names the field.

    Raises:
        InvalidDicomFieldError: pydicom cannot read the value.
    """
    try:
        value = ds.get(keyword)
    except _PYDICOM_ERRORS as e:
        raise InvalidDicomFieldError(f"{name}: {_label(keyword)} cannot be read ({e})") from e
    return None if value is None or (isinstance(value, str | bytes) and not value) else value


def _values(ds: pydicom.Dataset, keyword: str, name: str) -> list | None:
    """Every value of a (possibly multi-valued) element, or None when absent."""
    value = _value(ds, keyword, name)
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def _single(ds: pydicom.Dataset, keyword: str, name: str) -> object:
    """The one value of an element that allows one, or None when absent."""
    values = _values(ds, keyword, name)
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidDicomFieldError(
            f"{name}: {_label(keyword)} holds {len(values)} values, not one"
        )
    return values[0]


def _integer(ds: pydicom.Dataset, keyword: str, name: str) -> int | None:
    """One whole number (IS, US), or None when absent."""
    value = _single(ds, keyword, name)
    if value is None:
        return None
    try:
        number = value if isinstance(value, int) else int(str(value).strip())
    except ValueError as e:
        raise InvalidDicomFieldError(
            f"{name}: {_label(keyword)} is {_shown(value)}, not a whole number"
        ) from e
    # IS and US values fit a signed 32-bit integer (PS3.5 6.2); pydicom reads "1e308" as IS.
    if not -(2**31) <= number < 2**31:
        raise InvalidDicomFieldError(f"{name}: {_label(keyword)} {_shown(value)} is out of range")
    return int(number)


def _required_integer(ds: pydicom.Dataset, keyword: str, name: str) -> int:
    """One whole number that must be there (Rows, Columns)."""
    value = _integer(ds, keyword, name)
    if value is None:
        raise InvalidDicomFieldError(f"{name}: {_label(keyword)} is missing")
    return value


def _number(ds: pydicom.Dataset, keyword: str, name: str, default: float) -> float:
    """One finite number (DS); ``default`` when absent."""
    value = _single(ds, keyword, name)
    return default if value is None else _finite(value, keyword, name)


def _numbers(ds: pydicom.Dataset, keyword: str, name: str, count: int) -> list[float] | None:
    """Exactly ``count`` finite numbers (a DS vector), or None when absent."""
    values = _values(ds, keyword, name)
    if values is None:
        return None
    if len(values) != count:
        raise InvalidDicomFieldError(
            f"{name}: {_label(keyword)} holds {len(values)} values, not {count}"
        )
    return [_finite(v, keyword, name) for v in values]


def _finite(value: object, keyword: str, name: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidDicomFieldError(
            f"{name}: {_label(keyword)} is {_shown(value)}, not a number"
        ) from e
    if not math.isfinite(number):
        raise InvalidDicomFieldError(f"{name}: {_label(keyword)} is {number}, not a finite number")
    return number


def _uid(ds: pydicom.Dataset, keyword: str, name: str) -> str:
    """A UID that must be there and be one: digits and dots, at most 64 (PS3.5 6.2, 9.1).

    Slices are grouped and deduplicated by UID; without one every such file
    would fall into one study, and a ``/`` would let two UID pairs share a key.
    """
    value = _single(ds, keyword, name)
    if value is None:
        raise InvalidDicomFieldError(
            f"{name}: {_label(keyword)} is missing; the slice cannot be placed in a study"
        )
    uid = str(value)
    if not _UID_PATTERN.fullmatch(uid):
        raise InvalidDicomFieldError(f"{name}: {_label(keyword)} {_shown(uid)} is not a UID")
    return uid


def _label(keyword: str) -> str:
    """``RescaleSlope (0028,1053)``: the field as a person looks it up."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shown(value: object) -> str:
    """A short repr of a bad value for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_transfer_syntax(data: bytes, name: str) -> UID:
    """Refuse what the decoder cannot read, from the file meta alone; return the syntax.

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
    except _PYDICOM_ERRORS as e:
        raise TruncatedFileError(f"{name}: DICOM file meta is damaged or cut short ({e})") from e
    if not meta:
        raise TruncatedFileError(f"{name}: no DICOM file meta after the DICM prefix")
    if not syntax:
        raise UnsupportedTransferSyntaxError(
            f"{name}: no Transfer Syntax UID (0002,0010) in the file meta; "
            "the pixel encoding is unknown"
        )
    syntax = UID(str(syntax)[:64])  # a UI value holds at most 64 characters (PS3.5 6.2)
    if not decodable(syntax):
        raise UnsupportedTransferSyntaxError(
            f"{name}: transfer syntax {syntax} ({syntax.name}) is not supported; "
            "send it uncompressed or JPEG Lossless"
        )
    return syntax


def _past_file_meta(tag: int, _vr: str | None, _length: int) -> bool:
    return tag >> 16 != 0x0002


def _check_frame_size(ds: pydicom.Dataset, syntax: UID, rows: int, cols: int, name: str) -> None:
    """Refuse a compressed frame whose own header disagrees with Rows and Columns.

    The JPEG and JPEG 2000 codecs allocate what the codestream's header claims,
    not what Rows and Columns say: a 4 KB JPEG whose frame header claims
    65535 x 65535 px takes gigabytes and seconds before it fails. RLE output is
    sized from Rows and Columns, which are checked already.
    """
    frame_size = size_reader(syntax)
    if frame_size is None:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, *_PYDICOM_ERRORS) as e:
        raise TruncatedFileError(
            f"{name}: PixelData (7FE0,0010) holds no readable compressed frame ({e})"
        ) from e
    size = frame_size(frame)
    if size is None:
        raise TruncatedFileError(
            f"{name}: PixelData (7FE0,0010) frame header cannot be read ({syntax.name})"
        )
    if size != (rows, cols):
        raise InvalidDicomFieldError(
            f"{name}: PixelData (7FE0,0010) holds a {size[1]}x{size[0]} px frame, "
            f"but Rows and Columns say {cols}x{rows}"
        )


def decodable(syntax: UID) -> bool:
    """Whether an installed pydicom pixel decoder reads ``syntax`` (never the deflated one)."""
    if syntax == DeflatedExplicitVRLittleEndian:
        return False
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:
        return False
