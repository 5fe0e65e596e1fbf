"""Synthetic head-CT phantoms in Hounsfield units, written as valid DICOM.

For load, fault and format tests, never for accuracy claims: a phantom is an
ellipse of skull (about 1000 HU) around brain (30 HU) with two ventricles
(5 HU) and, optionally, a hyperdense lesion (70 HU, fresh blood).

    hu = head_phantom(512, lesion=Lesion(0.2, -0.1, 0.08))
    dataset = phantom_dicom(hu, series=SeriesIds.new(), instance_number=1)
    dataset.save_as("slice.dcm", enforce_file_format=True)
    files = phantom_series(40)        # a whole new study: DICOM bytes, base to vertex
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

AIR_HU, SKULL_HU, BRAIN_HU, CSF_HU, BLOOD_HU = -1000.0, 1000.0, 30.0, 5.0, 70.0
#: Stored value = HU - intercept; the usual CT intercept.
RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class Lesion:
    """A hyperdense lesion: centre (x, y) and radius as fractions of the image (centre = 0)."""

    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class SeriesIds:
    """The UIDs that group slices into one study and one series."""

    study_uid: str
    series_uid: str

    @classmethod
    def new(cls) -> SeriesIds:
        """Fresh, globally unique UIDs."""
        return cls(generate_uid(), generate_uid())


def head_phantom(size: int = 512, lesion: Lesion | None = None, scale: float = 1.0) -> np.ndarray:
    """An axial head slice in HU, float32 (size, size); ``scale`` shrinks the head (vertex)."""
    yy, xx = np.mgrid[-1 : 1 : complex(size), -1 : 1 : complex(size)]
    image = np.full((size, size), AIR_HU, dtype=np.float32)

    def ellipse(a: float, b: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
        return ((xx - cx) / (a * scale)) ** 2 + ((yy - cy) / (b * scale)) ** 2 <= 1.0

    image[ellipse(0.72, 0.86)] = SKULL_HU
    image[ellipse(0.66, 0.80)] = BRAIN_HU
    image[ellipse(0.07, 0.22, -0.12, -0.05)] = CSF_HU
    image[ellipse(0.07, 0.22, 0.12, -0.05)] = CSF_HU
    if lesion is not None:
        image[ellipse(lesion.radius, lesion.radius, lesion.x, lesion.y)] = BLOOD_HU
    return image


def phantom_dicom(
    hu: np.ndarray,
    series: SeriesIds,
    instance_number: int = 1,
    slice_position_mm: float = 0.0,
    modality: str = "CT",
) -> Dataset:
    """A CT Image Storage dataset (uncompressed, int16) holding ``hu``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.Modality = modality
    ds.PatientID = "PHANTOM"
    ds.StudyDate = datetime.now(UTC).strftime("%Y%m%d")
    ds.SeriesDescription = "synthetic head phantom"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(slice_position_mm)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.45, 0.45]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.PixelData = np.round(hu - RESCALE_INTERCEPT).astype(np.int16).tobytes()
    return ds


def compressed_phantom_dicom(
    hu: np.ndarray, series: SeriesIds, syntax: str = JPEGBaseline8Bit
) -> Dataset:
    """The phantom as an 8-bit compressed slice: JPEG Baseline or lossless JPEG 2000.

    Pillow encodes the frame (pydicom has no JPEG encoder). Stored values are
    (HU + 1024) / 8 with RescaleSlope 8, so HU come back to within 4 from JPEG
    2000 and within the lossy error from JPEG Baseline. For format and fault
    tests of the compressed decoding path.
    """
    formats = {
        JPEGBaseline8Bit: ("JPEG", {"quality": 95}),
        JPEG2000Lossless: ("JPEG2000", {"no_jp2": True}),
    }
    image_format, options = formats[syntax]
    stored = np.clip(np.round((hu - RESCALE_INTERCEPT) / 8), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format=image_format, **options)
    ds = phantom_dicom(hu, series)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope = 8
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def dicom_bytes(dataset: Dataset) -> bytes:
    """A dataset as Part 10 file bytes, as a scanner would send it."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_raw_field(data: bytes, keyword: str, vr: str, value: bytes) -> bytes:
    """Part 10 bytes with one field's value replaced by raw bytes, valid or not (fault tests).

    pydicom refuses to write a value its VR does not allow (``RescaleSlope``
    ``abc``), so the element is rewritten in the Explicit VR Little Endian bytes:
    in place when the file has it, else appended after the pixel data (pydicom
    reads elements in any order). Only VRs with a 2-byte length (US, CS, DS, IS,
    LO, UI...) fit, for the written element and the replaced one alike.

    Args:
        data: A file from :func:`dicom_bytes`.
        keyword: The field, e.g. ``RescaleSlope``.
        vr: The VR written into the element header.
        value: The raw value; padded with a space to an even length (PS3.5 7.1.1).

    Returns:
        The altered file's bytes.
    """
    tag = tag_for_keyword(keyword)
    value += b" " * (len(value) % 2)
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    element = group_element + struct.pack("<2sH", vr.encode(), len(value)) + value
    at = data.find(group_element + dictionary_VR(tag).encode(), 132)
    if at == -1:
        return data + element
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    return data[:at] + element + data[at + 8 + length :]


#: A hyperdense lesion right of the midline.
LESION = Lesion(0.2, -0.1, 0.1)


def phantom_series(slices: int, size: int = 512, lesion: Lesion | None = LESION) -> list[bytes]:
    """A fresh synthetic head series, one DICOM file's bytes per slice.

    Each call makes new Study, Series and SOP Instance UIDs, so every series is
    a new study for the console. Slices are 5 mm apart and the head narrows
    towards the vertex; the lesion spans the middle third of the slices.

    Args:
        slices: Number of slices.
        size: Rows and columns of each slice.
        lesion: The bleed, or None for a lesion-free series.

    Returns:
        Part 10 DICOM bytes, in slice order.
    """
    ids = SeriesIds.new()
    return [
        dicom_bytes(phantom_dicom(_series_pixels(i, slices, size, lesion), ids, i + 1, 5.0 * i))
        for i in range(slices)
    ]


@cache
def _series_pixels(index: int, slices: int, size: int, lesion: Lesion | None) -> np.ndarray:
    """HU pixels of one slice, cached: only the UIDs change between series."""
    height = index / max(slices - 1, 1)
    in_bleed = slices // 3 <= index < slices - slices // 3
    return head_phantom(size, lesion=lesion if in_bleed else None, scale=1.0 - 0.4 * height**2)
