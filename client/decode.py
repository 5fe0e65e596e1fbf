"""Bytes to pixels: PNG, JPEG and DICOM, with every failure a typed error.

PNG and JPEG slices arrive already windowed (8-bit or 16-bit display values);
DICOM arrives in Hounsfield units. :class:`DecodedImage` keeps that difference
so preprocessing applies the HU window only where it belongs.

    image = decode_file(Path("slice.dcm"))
    image.is_hu, image.pixels.shape
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from client.dicom import DicomMeta, looks_like_dicom, read_dicom
from client.errors import (
    EmptyFileError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidImageError,
    TruncatedFileError,
)
from client.limits import MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE_PX

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DecodedImage:
    """One slice's pixels before windowing.

    Attributes:
        pixels: float32 HxW. Hounsfield units when ``is_hu``, else display
            values scaled to [0, 1].
        is_hu: Whether ``pixels`` are Hounsfield units (DICOM input).
        name: Where the slice came from, for messages and tables.
        dicom: DICOM identifiers, for DICOM input only.
    """

    pixels: np.ndarray
    is_hu: bool
    name: str
    dicom: DicomMeta | None = None


def decode_file(path: Path) -> DecodedImage:
    """Read and decode one file; see :func:`decode_bytes`."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageTooLargeError(f"{path.name}: {size} bytes exceeds {MAX_FILE_BYTES} bytes")
    return decode_bytes(path.read_bytes(), path.name)


def decode_bytes(data: bytes, name: str) -> DecodedImage:
    """Decode PNG, JPEG or DICOM bytes into one grayscale slice.

    Args:
        data: The file's bytes.
        name: File name for messages.

    Returns:
        The decoded slice.

    Raises:
        EmptyFileError, InvalidImageError, TruncatedFileError, ImageTooSmallError,
        ImageTooLargeError, and the DICOM errors of :func:`client.dicom.read_dicom`.
    """
    if not data:
        raise EmptyFileError(f"{name}: file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageTooLargeError(f"{name}: {len(data)} bytes exceeds {MAX_FILE_BYTES} bytes")
    if looks_like_dicom(data):
        meta, hu = read_dicom(data, name)
        return DecodedImage(pixels=hu, is_hu=True, name=name, dicom=meta)
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return DecodedImage(pixels=_decode_raster(data, name), is_hu=False, name=name)
    raise InvalidImageError(f"{name}: not an image (neither PNG, JPEG nor DICOM)")


def _decode_raster(data: bytes, name: str) -> np.ndarray:
    """PNG/JPEG to float32 gray in [0, 1]: header checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning becomes our typed error below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageTooLargeError(f"{name}: {width}x{height} px exceeds {MAX_PIXELS} pixels")
            if min(width, height) < MIN_SIDE_PX:
                raise ImageTooSmallError(
                    f"{name}: {width}x{height} px is smaller than {MIN_SIDE_PX} px a side"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: decompression bomb refused ({e})") from e
    except UnidentifiedImageError as e:
        # The magic bytes said PNG/JPEG, so the rest of the file is damaged.
        raise TruncatedFileError(f"{name}: PNG/JPEG header is damaged or cut short") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise TruncatedFileError(f"{name}: image data is truncated or corrupt ({e})") from e
    return _to_unit_gray(image)


def _to_unit_gray(image: Image.Image) -> np.ndarray:
    """Any PNG/JPEG mode to one gray channel in [0, 1]; alpha is composited on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        return np.clip(pixels / peak, 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return gray * rgba[..., 3]
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
