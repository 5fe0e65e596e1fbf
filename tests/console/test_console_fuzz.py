"""Property-based fuzzing of everything a sender controls: image bytes, DICOM fields, zips.

Valid PNG, JPEG, DICOM (the synthetic phantom, uncompressed and as JPEG) and
zip inputs are mutated (byte flips, truncation, insertion, integers written
over length fields, header fields rewritten) and fed to the decoder and to
``POST /api/scans``. The only allowed outcomes are a finite image or a typed
error, and a 201 or a JSON 4xx.

HEMOTRIAGE_FUZZ_EXAMPLES sets the examples per property (default 100, so the
file runs in seconds and derandomized, the same cases every run); ``make fuzz``
runs 10,000 per property with a random seed. A failing example is a defect:
fix it and keep its minimal form as an ``@example`` or as a case of
``test_console_bad_input.py`` (where the fuzzer's finds so far live).
"""

import io
import logging
import os
import resource
import struct
import time
import warnings
import zipfile
import zlib
from collections import Counter
from functools import cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.phantoms import (
    SeriesIds,
    compressed_phantom_dicom,
    dicom_bytes,
    head_phantom,
    phantom_dicom,
    with_raw_field,
)
from client.decode import DecodedImage, decode_bytes
from client.errors import HemoTriageError

EXAMPLES = int(os.environ.get("HEMOTRIAGE_FUZZ_EXAMPLES", "100"))
#: Peak RSS may grow by at most this much over a whole property run.
MAX_RSS_GROWTH_BYTES = int(1.5 * 2**30)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The CI run is the same every time; an explicit fuzz run explores new cases.
    derandomize="HEMOTRIAGE_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Fields whose value is rewritten, each with a 2-byte-length VR (see with_raw_field).
DICOM_FIELDS = {
    "Rows": "US",
    "Columns": "US",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "HighBit": "US",
    "PixelRepresentation": "US",
    "SamplesPerPixel": "US",
    "PlanarConfiguration": "US",
    "PhotometricInterpretation": "CS",
    "NumberOfFrames": "IS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "InstanceNumber": "IS",
    "ImagePositionPatient": "DS",
    "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI",
    "SOPInstanceUID": "UI",
    "Modality": "CS",
    "SeriesDescription": "LO",
    "SpecificCharacterSet": "CS",
}
FIELD_VALUES = [
    b"",
    b"0",
    b"1",
    b"-1",
    b"abc",
    b"NaN",
    b"-inf",
    b"1e38",
    b"1e308",
    b"65535",
    b"4294967296",
    b"1\\2",
    b"1\\2\\3",
    b"MONOCHROME1",
    b"RGB",
    b"ISO_IR 192",
    b"\xff\xfe\x00\x01",
    b"\x00\x00\x01\x00",
]
#: Values written over 2 or 4 bytes: the edges of length and size fields.
INTERESTING_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def _png(mode: str) -> bytes:
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    image = Image.fromarray(ramp).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(
        buffer, format="JPEG", quality=90
    )
    return buffer.getvalue()


def _phantom(compressed: bool = False) -> bytes:
    """The 64 px phantom with fixed UIDs and date, so derandomized runs repeat exactly."""
    ids = SeriesIds("1.2.3.1", "1.2.3.2")
    hu = head_phantom(64)
    ds = compressed_phantom_dicom(hu, ids) if compressed else phantom_dicom(hu, ids)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.3"
    ds.StudyDate = "20260101"
    return dicom_bytes(ds)


@cache
def seeds() -> dict[str, bytes]:
    """The valid inputs every case starts from (built once, outside the strategies' repr)."""
    dicom, png = _phantom(), _png("L")
    deflated, stored = io.BytesIO(), io.BytesIO()
    for buffer, method in ((deflated, zipfile.ZIP_DEFLATED), (stored, zipfile.ZIP_STORED)):
        with zipfile.ZipFile(buffer, "w", method) as archive:
            archive.writestr("series/a.dcm", dicom)
            archive.writestr("series/b.png", png)
    return {
        "dcm": dicom,
        "jpeg.dcm": _phantom(compressed=True),
        "png": png,
        "rgba.png": _png("RGBA"),
        "jpg": _jpeg(),
        "zip": deflated.getvalue(),
        "stored.zip": stored.getvalue(),
    }


def _png_ihdr(data: bytearray, offset: int, value: bytes) -> bytearray:
    """Rewrite an IHDR field (offset within its 13 bytes) and fix the chunk's CRC."""
    if not data.startswith(b"\x89PNG") or len(data) < 33:
        return data
    data[16 + offset : 16 + offset + len(value)] = value
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return data


def _jpeg_sof(data: bytearray, offset: int, value: bytes) -> bytearray:
    """Rewrite a baseline frame header (SOF0) field: precision, height, width, components."""
    at = data.find(b"\xff\xc0")
    if at != -1:
        data[at + 4 + offset : at + 4 + offset + len(value)] = value
    return data


#: Zip header fields: (signature, offset, width): flags, method, CRC, sizes, name
#: and extra lengths of local and central headers; the end record's counts and offsets.
ZIP_FIELDS = [
    (b"PK\x03\x04", 6, 2),
    (b"PK\x03\x04", 8, 2),
    (b"PK\x03\x04", 14, 4),
    (b"PK\x03\x04", 18, 4),
    (b"PK\x03\x04", 22, 4),
    (b"PK\x03\x04", 26, 2),
    (b"PK\x03\x04", 28, 2),
    (b"PK\x01\x02", 8, 2),
    (b"PK\x01\x02", 10, 2),
    (b"PK\x01\x02", 20, 4),
    (b"PK\x01\x02", 24, 4),
    (b"PK\x01\x02", 28, 2),
    (b"PK\x01\x02", 42, 4),
    (b"PK\x05\x06", 8, 2),
    (b"PK\x05\x06", 10, 2),
    (b"PK\x05\x06", 12, 4),
    (b"PK\x05\x06", 16, 4),
]


@st.composite
def mutated(draw, kinds: tuple[str, ...]):
    """A seed of one kind, a header field maybe rewritten, then zero to four byte mutations."""
    kind = draw(st.sampled_from(kinds))
    data = bytearray(seeds()[kind])
    if draw(st.booleans()):
        if kind.endswith("dcm") and (kind == "dcm" or draw(st.booleans())):
            keyword = draw(st.sampled_from(sorted(DICOM_FIELDS)))
            value = draw(st.sampled_from(FIELD_VALUES))
            data = bytearray(with_raw_field(bytes(data), keyword, DICOM_FIELDS[keyword], value))
        elif kind.endswith("png"):
            field = draw(st.sampled_from([(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (12, 1)]))
            data = _png_ihdr(data, field[0], _int_bytes(draw, field[1], ">"))
        elif kind in ("jpg", "jpeg.dcm"):  # the JPEG frame in the DICOM file too
            field = draw(st.sampled_from([(0, 1), (1, 2), (3, 2), (5, 1)]))
            data = _jpeg_sof(data, field[0], _int_bytes(draw, field[1], ">"))
        else:
            signature, offset, width = draw(st.sampled_from(ZIP_FIELDS))
            at = data.find(signature)
            if at != -1:
                data[at + offset : at + offset + width] = _int_bytes(draw, width, "<")
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.sampled_from([_flip, _truncate, _insert, _overwrite_int]))(draw, data)
    return kind, bytes(data)


def _int_bytes(draw, width: int, order: str) -> bytes:
    value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2 ** (8 * width) - 1))
    return (value % 2 ** (8 * width)).to_bytes(width, "big" if order == ">" else "little")


def _position(draw, data: bytearray) -> int:
    return draw(st.integers(0, max(len(data) - 1, 0)))


def _flip(draw, data: bytearray) -> bytearray:
    if data:
        data[_position(draw, data)] ^= draw(st.integers(1, 255))
    return data


def _truncate(draw, data: bytearray) -> bytearray:
    return data[: _position(draw, data)]


def _insert(draw, data: bytearray) -> bytearray:
    chunk = draw(st.binary(max_size=64) | st.builds(bytes, st.integers(1, 4096)))
    at = _position(draw, data)
    return data[:at] + chunk + data[at:]


def _overwrite_int(draw, data: bytearray) -> bytearray:
    width = draw(st.sampled_from([2, 4]))
    if len(data) >= width:
        at = draw(st.integers(0, len(data) - width))
        data[at : at + width] = _int_bytes(draw, width, draw(st.sampled_from(["<", ">"])))
    return data


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _report(capsys, what: str, outcomes: Counter, start_s: float, start_rss: int) -> None:
    """One line per property (``make fuzz`` records it in the README)."""
    growth_mib = (_peak_rss_bytes() - start_rss) / 2**20
    with capsys.disabled():
        print(
            f"\nfuzz {what}: {sum(outcomes.values())} cases in {time.monotonic() - start_s:.1f} s, "
            f"peak RSS {_peak_rss_bytes() / 2**20:.0f} MiB (+{growth_mib:.0f} MiB); "
            f"outcomes {dict(outcomes.most_common())}"
        )


IMAGE_KINDS = ("dcm", "jpeg.dcm", "png", "rgba.png", "jpg")


def _only_errors_logged(caplog) -> None:
    """Thousands of refusals (WARNING) would fill the log capture and the RSS measured."""
    caplog.set_level(logging.ERROR)


def test_decoder_gives_a_finite_image_or_a_typed_error(capsys, caplog):
    _only_errors_logged(caplog)
    outcomes: Counter = Counter()
    start_s, start_rss = time.monotonic(), _peak_rss_bytes()

    @FUZZ_SETTINGS
    @given(case=mutated(IMAGE_KINDS))
    def decode_one(case):
        kind, data = case
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pydicom")
            try:
                image = decode_bytes(data, f"fuzz.{kind}")
            except HemoTriageError as e:
                outcomes[type(e).__name__] += 1
                return
        assert isinstance(image, DecodedImage)
        assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
        assert np.isfinite(image.pixels).all()
        outcomes["decoded"] += 1

    decode_one()
    _report(capsys, "decode_bytes", outcomes, start_s, start_rss)
    assert _peak_rss_bytes() - start_rss < MAX_RSS_GROWTH_BYTES


def test_upload_answers_201_or_a_json_4xx(api, upload, capsys, caplog):
    _only_errors_logged(caplog)
    outcomes: Counter = Counter()
    start_s, start_rss = time.monotonic(), _peak_rss_bytes()

    @FUZZ_SETTINGS
    @given(case=mutated((*IMAGE_KINDS, "zip", "stored.zip")))
    def upload_one(case):
        kind, data = case
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pydicom")
            response = upload(api, [(f"fuzz.{kind}", data)])
        if response.status_code == 201:
            outcomes["201"] += 1
            return
        assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:500]
        body = response.get_json()
        assert body["error"] and body["message"]
        outcomes[f"{response.status_code} {body['error']}"] += 1

    upload_one()
    _report(capsys, "POST /api/scans", outcomes, start_s, start_rss)
    assert _peak_rss_bytes() - start_rss < MAX_RSS_GROWTH_BYTES
