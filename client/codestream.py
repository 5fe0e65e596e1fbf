"""Frame sizes read from compressed codestream headers, before any codec allocates.

The JPEG, JPEG-LS and JPEG 2000 codecs allocate what a frame's own header
claims, not what the DICOM Rows and Columns say; :mod:`client.dicom` compares
the two first, so a 4 KB frame claiming 65535 x 65535 px is refused unread.

    reader = size_reader(JPEGLosslessSV1)
    reader(frame)          # (height, width), or None when the header is unreadable
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

#: JPEG start-of-frame markers, whose segment holds the frame size: SOF0 to SOF15 except
#: DHT (C4), JPG (C8) and DAC (CC) (ITU-T T.81 table B.1), and JPEG-LS SOF55 (F7, T.87).
_JPEG_SOF_MARKERS = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7})
#: JPEG markers without a length field: TEM, RST0 to RST7, SOI (ITU-T T.81 B.1.1.3).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})
#: A JPEG 2000 codestream opens with SOC, then SIZ (ISO/IEC 15444-1 A.4.1, A.5.1).
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
#: The JP2 signature box that opens a wrapped codestream (ISO/IEC 15444-1 I.5.1).
_JP2_SIGNATURE_BOX = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def size_reader(syntax: UID) -> Callable[[bytes], tuple[int, int] | None] | None:
    """The header reader for frames of ``syntax``; None where output is sized from Rows/Columns.

    RLE and uncompressed pixel data are sized from Rows and Columns, which the
    decoder checks already.
    """
    if syntax in JPEG2000TransferSyntaxes:
        return j2k_frame_size
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        return jpeg_frame_size
    return None


def jpeg_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG or JPEG-LS frame header, or None if there is none.

    Markers are walked from SOI to the first SOF (ITU-T T.81 B.1.1, T.87 for
    SOF55), skipping fill bytes and standalone markers; each other segment is
    skipped by its length. Anything else ends the walk without a size.
    """
    if not frame.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 9 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:  # no length field follows
            offset += 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack(">HH", frame[offset + 5 : offset + 9])
            return height, width
        (length,) = struct.unpack(">H", frame[offset + 2 : offset + 4])
        offset += 2 + length
    return None


def j2k_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG 2000 codestream's SIZ segment, or None if there is none.

    SIZ follows SOC (ISO/IEC 15444-1 A.5.1): the image spans Xsiz - XOsiz by
    Ysiz - YOsiz. Some senders keep the JP2 file wrapper; its codestream box is found.
    """
    offset = _jp2_codestream_offset(frame) if frame.startswith(_JP2_SIGNATURE_BOX) else 0
    if offset is None or frame[offset : offset + 4] != _J2K_SOC_SIZ or len(frame) < offset + 24:
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", frame[offset + 8 : offset + 24])
    return y_size - y_offset, x_size - x_offset


def _jp2_codestream_offset(frame: bytes) -> int | None:
    """Where the contiguous codestream box (jp2c) starts its content (15444-1 I.4), or None."""
    offset = 0
    while offset + 8 <= len(frame):
        length, kind = struct.unpack(">I4s", frame[offset : offset + 8])
        if kind == b"jp2c":
            return offset + (16 if length == 1 else 8)  # 1: a 64-bit length follows
        if length < 8:  # 0 (to the end) or a 64-bit length: not before the codestream
            return None
        offset += length
    return None
