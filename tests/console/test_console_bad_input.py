"""Every bad upload gets the right 4xx with the typed error, and leaves nothing behind."""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian

from client.limits import MAX_FILE_BYTES, MIN_SIDE_PX


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels (the decoder must refuse before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _with_zip_field(archive: bytes, local_offset: int, central_offset: int, value: bytes) -> bytes:
    """Write ``value`` into one field of every entry, in local and central headers alike."""
    data = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        at = data.find(signature)
        while at != -1:
            data[at + offset : at + offset + len(value)] = value
            at = data.find(signature, at + 4)
    return bytes(data)


def _corrupt_member(archive: bytes, marker: bytes) -> bytes:
    """Overwrite compressed bytes shortly after ``marker`` (the member's compressed stream)."""
    at = archive.index(marker) + len(marker) + 16
    return archive[:at] + b"\xaa" * 32 + archive[at + 32 :]


def _nul_named(archive: bytes) -> bytes:
    """Turn the first byte of the last entry's name in the central directory into a NUL."""
    at = archive.rindex(b"a.dcm")
    return archive[:at] + b"\0" + archive[at + 1 :]


def _nothing_stored(storage, db_rows) -> bool:
    """No study, no slice row, no file in the store."""
    uploads = storage / "uploads"
    stored = uploads.exists() and any(p.is_file() for p in uploads.rglob("*"))
    return db_rows("SELECT * FROM studies") == db_rows("SELECT * FROM slices") == [] and not stored


def _dicom(dicom_bytes, phantom_series, **changes) -> bytes:
    """A phantom slice with fields changed or (None) removed; TransferSyntaxUID goes to the meta."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(phantom_series(1)[0]))
    for key, value in changes.items():
        target = dataset.file_meta if key == "TransferSyntaxUID" else dataset
        if value is None:
            delattr(target, key)
        else:
            setattr(target, key, value)
    return dicom_bytes(dataset)


_FIELD = "InvalidDicomFieldError"


def _mangled_meta(dicom_bytes, phantom_series) -> bytes:
    """Two zeroed bytes turn (0002,0013) into a second (0002,0000) pydicom cannot unpack.

    What pydicom then reads depends on the bytes around it, so every UID is fixed:
    with the phantom's random ones it lost the pixel data instead about once in 40,
    and the case would not be one case.
    """
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(phantom_series(1)[0]))
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
    for element in dataset.iterall():
        if element.VR == "UI" and element.keyword != "SOPClassUID":
            element.value = uid
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    return dicom_bytes(dataset).replace(b"\x02\x00\x13\x00SH", b"\x02\x00\x00\x00\x00H", 1)


CASES = {
    "empty file": (lambda f: [("empty.png", b"")], 422, "EmptyFileError"),
    "text file": (lambda f: [("notes.txt", b"hello, not an image")], 415, "InvalidImageError"),
    "truncated png": (lambda f: [("cut.png", f["real"][:1500])], 422, "TruncatedFileError"),
    "tiny png": (
        lambda f: [("tiny.png", _png(np.zeros((MIN_SIDE_PX - 1,) * 2, np.uint8)))],
        422,
        "ImageTooSmallError",
    ),
    "decompression bomb": (lambda f: [("bomb.png", _bomb_png(20000))], 413, "ImageTooLargeError"),
    "mr dicom": (lambda f: [("mr.dcm", f["mr"])], 422, "UnsupportedModalityError"),
    "dicom without pixels": (lambda f: [("sr.dcm", f["nopixels"])], 422, "MissingPixelDataError"),
    "truncated dicom": (lambda f: [("cut.dcm", f["ct"][:-1000])], 422, "TruncatedFileError"),
    "bad zip": (lambda f: [("series.zip", b"PK\x03\x04garbage")], 400, "BadArchiveError"),
    "zip slip": (lambda f: [("evil.zip", f["zipslip"])], 400, "BadArchiveError"),
    "zip with a bad member": (lambda f: [("mixed.zip", f["badzip"])], 415, "InvalidImageError"),
    "zip of hidden files only": (lambda f: [("mac.zip", f["hidden_only"])], 400, "UploadError"),
    "zip inside a zip": (lambda f: [("outer.zip", f["nested"])], 415, "InvalidImageError"),
    "absolute path in a zip": (lambda f: [("abs.zip", f["absolute"])], 400, "BadArchiveError"),
    "zip with an unknown compression method": (
        lambda f: [("aes.zip", f["method99"])],
        400,
        "BadArchiveError",
    ),
    "zip member larger than a file may be": (
        lambda f: [("big.zip", f["big_member"])],
        413,
        "ImageTooLargeError",
    ),
    "encrypted zip member": (lambda f: [("locked.zip", f["encrypted"])], 400, "BadArchiveError"),
    "corrupt lzma zip member": (lambda f: [("a.zip", f["badlzma"])], 400, "BadArchiveError"),
    "corrupt bzip2 zip member": (lambda f: [("b.zip", f["badbzip2"])], 400, "BadArchiveError"),
    # Found by the fuzzer: a NUL leaves the name empty and ZipInfo.is_dir raised IndexError.
    "zip entry named by a NUL": (lambda f: [("n.zip", f["nulname"])], 400, "BadArchiveError"),
    "deflated DICOM": (lambda f: [("z.dcm", f["deflated"])], 415, "UnsupportedTransferSyntaxError"),
    "DICOM preamble without a file meta": (
        lambda f: [("p.dcm", b"\0" * 128 + b"DICM")],
        422,
        "TruncatedFileError",
    ),
    "non-numeric RescaleSlope": (lambda f: [("s.dcm", f["slope_abc"])], 422, _FIELD),
    "NaN RescaleSlope": (lambda f: [("s.dcm", f["slope_nan"])], 422, _FIELD),
    "infinite RescaleIntercept": (lambda f: [("i.dcm", f["intercept_inf"])], 422, _FIELD),
    "RescaleSlope beyond float32": (lambda f: [("s.dcm", f["slope_huge"])], 422, _FIELD),
    "non-numeric NumberOfFrames": (lambda f: [("n.dcm", f["frames_x"])], 422, _FIELD),
    "InstanceNumber abc": (lambda f: [("n.dcm", f["instance_abc"])], 422, _FIELD),
    # Found by the fuzzer: pydicom reads IS "1e308" as a 1024-bit int; SQLite overflowed (500).
    "InstanceNumber 1e308": (lambda f: [("n.dcm", f["instance_huge"])], 422, _FIELD),
    "two-value ImagePositionPatient": (lambda f: [("p.dcm", f["position_2"])], 422, _FIELD),
    "two-value Rows": (lambda f: [("r.dcm", f["rows_2"])], 422, _FIELD),
    "DICOM without Rows": (lambda f: [("r.dcm", f["no_rows"])], 422, _FIELD),
    "colour DICOM": (lambda f: [("rgb.dcm", f["rgb"])], 422, _FIELD),
    "pixel data shorter than Rows x Columns": (
        lambda f: [("p.dcm", f["short_pixels"])],
        422,
        "TruncatedFileError",
    ),
    "DICOM without StudyInstanceUID": (lambda f: [("u.dcm", f["no_study"])], 422, _FIELD),
    "DICOM without SeriesInstanceUID": (lambda f: [("u.dcm", f["no_series"])], 422, _FIELD),
    "DICOM without SOPInstanceUID": (lambda f: [("u.dcm", f["no_sop"])], 422, _FIELD),
    "StudyInstanceUID with a slash": (lambda f: [("u.dcm", f["slash_uid"])], 422, _FIELD),
    # Found by the fuzzer: two zeroed bytes make a second (0002,0000) whose value pydicom
    # cannot unpack (BytesLengthException, a 500).
    "file meta with a mangled group length": (
        lambda f: [("m.dcm", f["meta_mangled"])],
        422,
        "TruncatedFileError",
    ),
    "good file plus a bad one": (
        lambda f: [("ok.dcm", f["ct"]), ("bad.txt", b"nope")],
        415,
        "InvalidImageError",
    ),
}


@pytest.fixture
def corpus(kaggle_png, dicom_bytes, phantom_series, zip_bytes, poisoned_dicom):
    ct = phantom_series(1)[0]
    return {
        "slope_abc": poisoned_dicom("RescaleSlope", "DS", b"abc"),
        "slope_nan": poisoned_dicom("RescaleSlope", "DS", b"NaN"),
        "intercept_inf": poisoned_dicom("RescaleIntercept", "DS", b"-inf"),
        "slope_huge": poisoned_dicom("RescaleSlope", "DS", b"1e38"),
        "frames_x": poisoned_dicom("NumberOfFrames", "IS", b"x"),
        "instance_abc": poisoned_dicom("InstanceNumber", "IS", b"abc"),
        "instance_huge": poisoned_dicom("InstanceNumber", "IS", b"1e308"),
        "position_2": poisoned_dicom("ImagePositionPatient", "DS", b"0\\0"),
        "rows_2": poisoned_dicom("Rows", "US", struct.pack("<HH", 64, 64)),
        "no_rows": _dicom(dicom_bytes, phantom_series, Rows=None),
        "no_study": _dicom(dicom_bytes, phantom_series, StudyInstanceUID=None),
        "no_series": _dicom(dicom_bytes, phantom_series, SeriesInstanceUID=None),
        "no_sop": _dicom(dicom_bytes, phantom_series, SOPInstanceUID=None),
        # "1.2/3" + "4" and "1.2" + "3/4" would be one study key if slashes were let in.
        "meta_mangled": _mangled_meta(dicom_bytes, phantom_series),
        "slash_uid": poisoned_dicom("StudyInstanceUID", "UI", b"1.2/3"),
        "rgb": _dicom(dicom_bytes, phantom_series, PhotometricInterpretation="RGB"),
        "short_pixels": _dicom(dicom_bytes, phantom_series, PixelData=b"\0" * 1000),
        "real": kaggle_png.read_bytes(),
        "ct": ct,
        "mr": _dicom(dicom_bytes, phantom_series, Modality="MR"),
        "nopixels": _dicom(dicom_bytes, phantom_series, PixelData=None),
        "zipslip": zip_bytes({"../../outside.dcm": ct}),
        "badzip": zip_bytes({"a.dcm": ct, "readme.txt": b"not a slice"}),
        # General purpose flags (bit 0: encrypted) and compression method (APPNOTE 4.3.7, 4.3.12).
        "encrypted": _with_zip_field(zip_bytes({"a.dcm": ct}, zipfile.ZIP_STORED), 6, 8, b"\x01"),
        "badlzma": _corrupt_member(zip_bytes({"a.dcm": ct}, zipfile.ZIP_LZMA), b"a.dcm"),
        "nulname": _nul_named(zip_bytes({"a.dcm": ct})),
        "hidden_only": zip_bytes({".DS_Store": b"finder", "__MACOSX/._a.dcm": b"fork"}),
        "nested": zip_bytes({"inner.zip": zip_bytes({"a.dcm": ct})}),
        "absolute": zip_bytes({"/etc/a.dcm": ct}),
        "method99": _with_zip_field(zip_bytes({"a.dcm": ct}, zipfile.ZIP_STORED), 8, 10, b"c\0"),
        "big_member": zip_bytes({"a.dcm": bytes(MAX_FILE_BYTES + 1)}),
        "deflated": _dicom(
            dicom_bytes, phantom_series, TransferSyntaxUID=DeflatedExplicitVRLittleEndian
        ),
        "badbzip2": _corrupt_member(zip_bytes({"a.dcm": ct}, zipfile.ZIP_BZIP2), b"BZh"),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_gets_typed_4xx_and_stores_nothing(api, upload, corpus, storage, db_rows, case):
    make_files, status, error = CASES[case]
    response = upload(api, make_files(corpus))
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert body["error"] == error and body["message"]
    assert _nothing_stored(storage, db_rows)


def test_upload_without_files_is_400(api):
    response = api.post("/api/scans", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"] == "UploadError"


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"priority": "asap"}, "UploadError"),
        ({"study": "x" * 129}, "UploadError"),
        ({"study": "tab\there"}, "UploadError"),
    ],
)
def test_bad_form_fields_are_400(api, upload, kaggle_png, form, error):
    response = upload(api, [("a.png", kaggle_png.read_bytes())], **form)
    assert response.status_code == 400
    assert response.get_json()["error"] == error


@pytest.fixture
def api_with(app_factory, storage, token_for):
    """An API client of a console built with other limits."""

    def build(**config):
        console = app_factory(storage, **config)
        client = console.test_client(use_cookies=False)
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(console)}"
        return client

    return build


def test_body_over_max_content_length_is_413(api_with):
    client = api_with(MAX_CONTENT_LENGTH=10_000)
    data = {"files": [(io.BytesIO(b"\0" * 20_000), "big.dcm")]}
    response = client.post("/api/scans", data=data, content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.get_json()["error"] == "RequestTooLargeError"


def test_too_many_files_is_413(api_with, phantom_series):
    client = api_with(MAX_UPLOAD_FILES=2)
    data = {"files": [(io.BytesIO(d), f"{i}.dcm") for i, d in enumerate(phantom_series(3))]}
    response = client.post("/api/scans", data=data, content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.get_json()["error"] == "TooManyFilesError"


def test_path_in_file_name_is_reduced_to_a_safe_name(api, upload, phantom_series, storage, db_rows):
    upload(api, [("../../etc/passwd.dcm", phantom_series(1)[0])])
    (row,) = db_rows("SELECT filename, stored_path FROM slices")
    assert row["filename"] == "passwd.dcm"
    stored = (storage / "uploads" / row["stored_path"]).resolve()
    assert stored.is_relative_to((storage / "uploads").resolve())


def test_zip_byte_budget_is_one_per_upload_not_one_per_zip(
    api_with, upload, zip_bytes, storage, db_rows
):
    # Each zip alone fits the 8 MiB budget; together they expand to 12 MiB.
    client = api_with(MAX_ZIP_UNCOMPRESSED_BYTES=8 * 2**20)
    zips = [(f"part{i}.zip", zip_bytes({f"{i}.dcm": bytes(4 * 2**20)})) for i in range(3)]
    response = upload(client, zips)
    assert response.status_code == 413, response.get_json()
    assert response.get_json()["error"] == "TooManyFilesError"
    assert _nothing_stored(storage, db_rows)


def test_hidden_and_resource_fork_zip_entries_count_against_the_file_limit(
    api_with, upload, zip_bytes, phantom_series, storage, db_rows
):
    client = api_with(MAX_UPLOAD_FILES=2)
    archive = zip_bytes(
        {"a.dcm": phantom_series(1)[0], "__MACOSX/._a.dcm": b"fork", ".DS_Store": b"finder"}
    )
    response = upload(client, [("series.zip", archive)])
    assert response.status_code == 413, response.get_json()
    assert response.get_json()["error"] == "TooManyFilesError"
    assert _nothing_stored(storage, db_rows)
