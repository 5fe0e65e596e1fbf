import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
)

from benchmarks.phantoms import SeriesIds, compressed_phantom_dicom, head_phantom, phantom_dicom
from client import errors
from client.decode import decode_bytes, decode_file


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_syntax(syntax: str) -> bytes:
    """A phantom slice written as ``syntax`` says (pixel data encapsulated if it is compressed)."""
    ds = phantom_dicom(head_phantom(64), SeriesIds.new())
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax != DeflatedExplicitVRLittleEndian:
        ds.PixelData = encapsulate([ds.PixelData])
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _without_meta_element(data: bytes, tag: bytes) -> bytes:
    """Cut one explicit-VR element (2-byte length) out of the file meta, fixing its group length."""
    at = data.index(tag, 132)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    cut = data[:at] + data[at + 8 + length :]
    (group_length,) = struct.unpack("<I", cut[140:144])
    return cut[:140] + struct.pack("<I", group_length - 8 - length) + cut[144:]


def _deflate_bomb(inflated_mib: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose body inflates to ``inflated_mib`` MiB.

    The meta is a real one; the body is one huge OB element of zeros. Each 1 MiB of
    zeros is one full-flush deflate block (dictionary reset, byte aligned), so the
    block can be repeated: a few hundred KB on disk, any size once inflated.
    """
    plain = _with_syntax(DeflatedExplicitVRLittleEndian)
    (meta_length,) = struct.unpack("<I", plain[140:144])  # (0002,0000) group length value
    meta = plain[: 144 + meta_length]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mib * 2**20
    header = struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, size)
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return meta + head + block * inflated_mib + compressor.flush()


def test_decode_gray_png_scales_to_unit_range():
    image = decode_bytes(_png(np.full((80, 90), 255, np.uint8)), "gray.png")
    assert image.pixels.shape == (80, 90)
    assert not image.is_hu
    assert image.pixels.max() == pytest.approx(1.0)


def test_decode_rgb_and_rgba_png_become_one_gray_channel():
    rgb = np.zeros((70, 70, 3), np.uint8)
    rgb[..., 0] = 255
    assert decode_bytes(_png(rgb), "rgb.png").pixels.shape == (70, 70)
    rgba = np.full((70, 70, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:35, :, 3] = 0  # transparent half is composited on black
    pixels = decode_bytes(_png(rgba), "rgba.png").pixels
    assert pixels[:35].max() == 0.0
    assert pixels[35:].min() == pytest.approx(200 / 255, abs=1e-3)


def test_decode_16_bit_png_uses_full_range():
    array = np.full((64, 64), 65535, np.uint16)
    array[0, 0] = 0
    pixels = decode_bytes(_png(array), "deep.png").pixels
    assert pixels.max() == pytest.approx(1.0)
    assert pixels.min() == 0.0


def test_decode_jpeg():
    buffer = io.BytesIO()
    Image.fromarray(np.full((100, 120), 128, np.uint8)).save(buffer, format="JPEG")
    pixels = decode_bytes(buffer.getvalue(), "slice.jpg").pixels
    assert pixels.shape == (100, 120)
    assert pixels.mean() == pytest.approx(128 / 255, abs=0.02)


def test_decode_dicom_applies_rescale_to_hounsfield_units():
    hu = head_phantom(128)
    image = decode_bytes(_dicom_bytes(phantom_dicom(hu, SeriesIds.new())), "phantom.dcm")
    assert image.is_hu
    np.testing.assert_allclose(image.pixels, np.round(hu), atol=0.5)
    assert image.dicom.series_uid


def test_decode_jpeg_lossless_dicom_from_a_real_scanner(data_dir: Path):
    path = sorted((data_dir / "cq500_ct1" / "series_thin_every8").iterdir())[0]
    image = decode_file(path)
    assert image.pixels.shape == (512, 512)
    # Air outside the head is about -1000 HU; skull reaches well above 500 HU.
    assert image.pixels.min() < -900
    assert image.pixels.max() > 500


def test_decode_real_uncompressed_dicom(data_dir: Path):
    image = decode_file(data_dir / "cq500_ct1" / "single_5mm" / "CT000000.dcm")
    assert image.is_hu and image.dicom.study_uid


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", errors.EmptyFileError),
        (b"patient notes, not an image", errors.InvalidImageError),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, errors.TruncatedFileError),
    ],
)
def test_decode_rejects_bad_bytes_with_typed_error(data, error):
    with pytest.raises(error) as caught:
        decode_bytes(data, "upload.bin")
    assert "upload.bin" in str(caught.value)


def test_decode_rejects_truncated_png_and_jpeg():
    png = _png(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    with pytest.raises(errors.TruncatedFileError):
        decode_bytes(png[: len(png) // 2], "cut.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    with pytest.raises(errors.TruncatedFileError):
        decode_bytes(buffer.getvalue()[:300], "cut.jpg")


def test_decode_rejects_too_small_image():
    with pytest.raises(errors.ImageTooSmallError):
        decode_bytes(_png(np.zeros((40, 200), np.uint8)), "thumb.png")


def test_decode_rejects_decompression_bomb_before_decoding():
    # A valid PNG header claiming 20000 x 20000 pixels: refused from the header alone.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
    )
    with pytest.raises(errors.ImageTooLargeError):
        decode_bytes(bomb + chunk(b"IEND", b""), "bomb.png")


def test_decode_rejects_dicom_without_pixel_data():
    ds = phantom_dicom(head_phantom(64), SeriesIds.new())
    del ds.PixelData
    with pytest.raises(errors.MissingPixelDataError):
        decode_bytes(_dicom_bytes(ds), "report.dcm")


def test_decode_rejects_non_ct_modality():
    ds = phantom_dicom(head_phantom(64), SeriesIds.new(), modality="MR")
    with pytest.raises(errors.UnsupportedModalityError, match="MR"):
        decode_bytes(_dicom_bytes(ds), "mri.dcm")


def test_decode_rejects_multi_frame_dicom():
    ds = phantom_dicom(head_phantom(64), SeriesIds.new())
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(errors.MultiFrameDicomError):
        decode_bytes(_dicom_bytes(ds), "cine.dcm")


def test_decode_rejects_truncated_dicom_pixel_data(data_dir: Path):
    data = (data_dir / "cq500_ct1" / "single_5mm" / "CT000000.dcm").read_bytes()
    with pytest.raises(errors.TruncatedFileError):
        decode_bytes(data[: len(data) - 200_000], "cut.dcm")


def test_jpeg_lossless_transfer_syntax_is_really_compressed(data_dir: Path):
    import pydicom

    path = sorted((data_dir / "cq500_ct1" / "series_thin_every8").iterdir())[0]
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    assert syntax in (JPEGLossless, "1.2.840.10008.1.2.4.70")  # JPEG Lossless (Process 14 / SV1)


def test_every_decode_error_is_a_hemotriage_error_with_a_message():
    for data in (b"", b"text", b"\xff\xd8\xff" + b"\x00" * 10):
        with pytest.raises(errors.HemoTriageError) as caught:
            decode_bytes(data, "x")
        assert str(caught.value)


def _inflated_bytes(data: bytes) -> int:
    """Length of the raw deflate stream that follows the file meta, inflated 1 MiB at a time."""
    (meta_length,) = struct.unpack("<I", data[8:12])
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[12 + meta_length :], 0
    while pending:
        total += len(inflater.decompress(pending, 2**20))
        pending = inflater.unconsumed_tail
    return total


def _refused_without_inflating(decode) -> errors.HemoTriageError:
    """Run ``decode``; return its error and check that it never held the inflated body."""
    tracemalloc.start()
    try:
        with pytest.raises(errors.UnsupportedTransferSyntaxError) as caught:
            decode()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 16 * 2**20
    return caught.value


def test_deflate_bomb_is_refused_from_the_file_meta_without_inflating():
    bomb = _deflate_bomb(128)
    assert len(bomb) < 1_000_000
    assert _inflated_bytes(bomb[bomb.index(b"DICM") + 4 :]) > 128 * 2**20  # a real bomb
    error = _refused_without_inflating(lambda: decode_bytes(bomb, "bomb.dcm"))
    assert "Deflated" in str(error) and error.http_status == 415


def test_worker_side_decode_of_a_stored_deflate_bomb_is_refused(tmp_path: Path):
    path = tmp_path / "ab12.dcm"
    path.write_bytes(_deflate_bomb(128))
    _refused_without_inflating(lambda: decode_file(path))


@pytest.mark.parametrize(
    "syntax",
    [
        DeflatedExplicitVRLittleEndian,
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless: no decoder installed
        "1.2.840.10008.1.2.4.100",  # MPEG2 video
        "1.2.3.4.5",  # not a transfer syntax at all
    ],
)
def test_decode_refuses_a_transfer_syntax_it_cannot_read(syntax):
    with pytest.raises(errors.UnsupportedTransferSyntaxError, match=syntax.replace(".", r"\.")):
        decode_bytes(_with_syntax(syntax), "odd.dcm")


def test_decode_refuses_dicom_without_a_transfer_syntax():
    data = _dicom_bytes(phantom_dicom(head_phantom(64), SeriesIds.new()))
    bare = _without_meta_element(data, b"\x02\x00\x10\x00UI")  # (0002,0010)
    with pytest.raises(errors.UnsupportedTransferSyntaxError, match="0002,0010"):
        decode_bytes(bare, "bare.dcm")


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("RescaleIntercept", "DS", b"abc"),
        ("RescaleSlope", "DS", b"inf"),
        ("RescaleSlope", "DS", b"0"),
        ("RescaleSlope", "DS", b"1\\2"),
        ("RescaleSlope", "LO", b"one"),
        ("NumberOfFrames", "IS", b"-1"),
        ("InstanceNumber", "IS", b"1\\2"),
        ("ImagePositionPatient", "DS", b"a\\b\\c"),
        ("ImagePositionPatient", "DS", b"0\\0\\nan"),
        ("Rows", "DS", b"64.5"),
        ("Columns", "US", b""),
        ("PhotometricInterpretation", "CS", b"PALETTE COLOR"),
    ],
)
def test_decode_names_the_poisoned_field(poisoned_dicom, keyword, vr, value):
    with pytest.raises(errors.InvalidDicomFieldError, match=keyword):
        decode_bytes(poisoned_dicom(keyword, vr, value), "poisoned.dcm")


def test_decoded_hounsfield_units_are_always_finite(poisoned_dicom):
    # Largest slope whose product with int16 pixels still fits float32: accepted, and finite.
    image = decode_bytes(poisoned_dicom("RescaleSlope", "DS", b"1e30"), "steep.dcm")
    assert np.isfinite(image.pixels).all()
    with pytest.raises(errors.InvalidDicomFieldError, match="float32"):
        decode_bytes(poisoned_dicom("RescaleSlope", "DS", b"1e36"), "steeper.dcm")


def _forge_frame_size(data: bytes, height: int, width: int) -> bytes:
    """Rewrite the size in the compressed frame's own header, leaving Rows and Columns alone."""
    out = bytearray(data)
    for sof in (b"\xff\xc0", b"\xff\xc3"):  # JPEG Baseline, JPEG Lossless (T.81 B.2.2)
        if (at := out.find(sof, 132)) != -1:
            out[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(out)
    at = out.index(b"\xff\x4f\xff\x51")  # JPEG 2000 SOC + SIZ: Xsiz, Ysiz (15444-1 A.5.1)
    out[at + 8 : at + 16] = struct.pack(">II", width, height)
    return bytes(out)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEG2000Lossless])
def test_decode_compressed_dicom(syntax):
    hu = head_phantom(64)
    image = decode_bytes(_dicom_bytes(compressed_phantom_dicom(hu, SeriesIds.new(), syntax)), "c")
    np.testing.assert_allclose(image.pixels, np.clip(hu, -1024, 1016), atol=64)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEG2000Lossless])
def test_decode_refuses_a_compressed_frame_larger_than_rows_and_columns(syntax):
    # The codec allocates what the frame header says: 65535 x 65535 took gigabytes.
    # 8000 x 8000 shows the refusal without risking that memory if it regressed.
    data = _dicom_bytes(compressed_phantom_dicom(head_phantom(64), SeriesIds.new(), syntax))
    with pytest.raises(errors.InvalidDicomFieldError, match="8000x8000 px frame"):
        decode_bytes(_forge_frame_size(data, 8000, 8000), "forged.dcm")


def test_real_jpeg_lossless_slice_with_a_forged_frame_size_is_refused(data_dir: Path):
    path = sorted((data_dir / "cq500_ct1" / "series_thin_every8").iterdir())[0]
    forged = _forge_frame_size(path.read_bytes(), 8000, 8000)
    with pytest.raises(errors.InvalidDicomFieldError, match="Rows and Columns say 512x512"):
        decode_bytes(forged, path.name)


def test_decode_reads_only_the_fields_it_uses():
    # 100,000 tiny private elements after the pixel data: 1 MB on disk. Read as elements
    # they took about 400 bytes of Python objects each (a 57 MB file took 2.3 GB).
    data = _dicom_bytes(phantom_dicom(head_phantom(64), SeriesIds.new()))
    noise = b"".join(
        struct.pack("<HH2sH", 0x0009 + 2 * (i // 0xF000), 0x1000 + i % 0xF000, b"LO", 2) + b"ab"
        for i in range(100_000)
    )
    tracemalloc.start()
    try:
        image = decode_bytes(data + noise, "noisy.dcm")
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.pixels.shape == (64, 64)
    assert peak_bytes < 16 * 2**20
