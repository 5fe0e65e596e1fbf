import io
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
)

from build_engines.serve import free_ports
from console.db import begin_write, connect
from console.dicom_node import DicomSettings
from console.errors import DicomPortError
from console.services import EXTENSION_KEY
from tests.console.conftest import NODE, REPO, SCANNER, ConsoleServer, associate, c_store, wait_for

#: Context rejection results (PS3.8 Table 9-18).
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04


@pytest.fixture
def node(app_factory, storage):
    """A console on the `app` fixture's storage with its DICOM receiver listening on a free port."""

    def build(**overrides):
        config = {
            "DICOM_PORT": free_ports(1)[0],
            "DICOM_ALLOWED_AES": SCANNER,
            "DICOM_QUIET_S": 3600.0,
            **overrides,
        }
        console = app_factory(storage, **config)
        services = console.extensions[EXTENSION_KEY]
        services.dicom.start()
        return console, services

    return build


def _stored_files(storage: Path) -> list[Path]:
    return sorted(p for p in (storage / "uploads").rglob("*") if p.is_file())


def test_c_echo_succeeds(node):
    _, services = node()
    assoc = associate(services.dicom.settings.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_phantom_series_by_c_store_becomes_one_study_queued_then_classified(
    node, phantom_series, drain, db_rows
):
    _, services = node()
    files = phantom_series(4)
    statuses = c_store(services.dicom.settings.port, files)
    assert [s.Status for s in statuses] == [0x0000] * 4
    # Success came back only after ingest committed: every slice is there, no waiting.
    (study,) = db_rows("SELECT * FROM studies")
    assert study["source"] == "dicom"
    slices = db_rows("SELECT status, sop_uid FROM slices ORDER BY instance_number")
    assert [s["status"] for s in slices] == ["queued"] * 4
    assert [s["sop_uid"] for s in slices] == [
        pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in files
    ]
    assert drain(services) == 4
    assert {r["status"] for r in db_rows("SELECT status FROM slices")} == {"classified"}
    (study,) = db_rows("SELECT status FROM studies")
    assert study["status"] in ("flagged", "negative")


def test_real_jpeg_lossless_ct_is_stored_as_sent(node, cq500_series, storage, db_rows):
    _, services = node()
    files = [p.read_bytes() for p in cq500_series[:3]]
    statuses = c_store(
        services.dicom.settings.port, files, contexts=[(CTImageStorage, JPEGLosslessSV1)]
    )
    assert [s.Status for s in statuses] == [0x0000] * 3
    assert len(db_rows("SELECT * FROM studies")) == 1
    sent = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in files}
    assert {r["sop_uid"] for r in db_rows("SELECT sop_uid FROM slices")} == sent
    for path in _stored_files(storage):
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLosslessSV1


def test_resent_instances_succeed_and_are_not_queued_twice(node, phantom_series, db_rows):
    _, services = node()
    files = phantom_series(2)
    port = services.dicom.settings.port
    assert [s.Status for s in c_store(port, files)] == [0x0000] * 2
    assert [s.Status for s in c_store(port, files)] == [0x0000] * 2
    assert len(db_rows("SELECT * FROM slices")) == 2
    assert len(db_rows("SELECT * FROM studies")) == 1


def test_calling_ae_not_allowed_or_wrong_called_ae_is_rejected_at_association(node):
    _, services = node()
    port = services.dicom.settings.port
    stranger = associate(port, calling="INTRUDER")
    assert stranger.is_rejected and not stranger.is_established
    answer = stranger.acceptor.primitive
    # rejected-permanent, by the service user, calling AE title not recognised
    assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
    misaddressed = associate(port, called="ANY-SCP")
    assert misaddressed.is_rejected
    assert misaddressed.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised
    allowed = associate(port)
    assert allowed.is_established
    allowed.release()


def _outward_address() -> str | None:
    """This host's address on the interface of its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: routed, never reached
        except OSError:
            return None
        return probe.getsockname()[0]


def test_empty_allow_list_accepts_this_host_only(node):
    address = _outward_address()
    if address is None or address.startswith("127."):
        pytest.skip("no network interface besides loopback")
    _, services = node(DICOM_ALLOWED_AES="", DICOM_BIND="0.0.0.0")
    port = services.dicom.settings.port
    local = associate(port, calling="ANYONE")
    assert local.is_established
    local.release()
    remote = associate(port, calling="ANYONE", host=address)
    assert remote.is_rejected
    assert remote.acceptor.primitive.diagnostic == 0x03


def test_other_sop_classes_and_deflated_are_refused_in_negotiation(node):
    _, services = node()
    assoc = associate(
        services.dicom.settings.port,
        contexts=[
            (MRImageStorage, ExplicitVRLittleEndian),
            (EnhancedCTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, DeflatedExplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRLittleEndian),
        ],
    )
    assert assoc.is_established
    refused = {
        (cx.abstract_syntax, cx.transfer_syntax[0]): cx.result for cx in assoc.rejected_contexts
    }
    assert refused == {
        (MRImageStorage, ExplicitVRLittleEndian): ABSTRACT_SYNTAX_NOT_SUPPORTED,
        (EnhancedCTImageStorage, ExplicitVRLittleEndian): ABSTRACT_SYNTAX_NOT_SUPPORTED,
        (CTImageStorage, DeflatedExplicitVRLittleEndian): TRANSFER_SYNTAXES_NOT_SUPPORTED,
    }
    assert [(cx.abstract_syntax, cx.transfer_syntax) for cx in assoc.accepted_contexts] == [
        (CTImageStorage, [ExplicitVRLittleEndian])
    ]
    assoc.release()


def _without_pixels(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    return _bytes(ds)


def _with_text_slope(data: bytes) -> bytes:
    """RescaleSlope (0028,1053) "abc " instead of "1.0 ": pydicom itself would not write it."""
    slope = b"\x28\x00\x53\x10DS\x04\x00"  # tag, explicit VR, length 4
    assert data.count(slope + b"1.0 ") == 1
    return data.replace(slope + b"1.0 ", slope + b"abc ")


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_bad_ct_datasets_get_a_failure_status_and_nothing_is_stored(
    node, phantom_series, storage, db_rows, tmp_path, monkeypatch
):
    _, services = node()
    good = phantom_series(1)[0]
    text_slope_file = tmp_path / "text_slope.dcm"
    text_slope_file.write_bytes(_with_text_slope(good))
    # The SCU sends that file's bytes as stored, as a scanner does (pydicom would not encode it).
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(services.dicom.settings.port)
    no_pixels = assoc.send_c_store(pydicom.dcmread(io.BytesIO(_without_pixels(good))))
    assert no_pixels.Status == 0xA900  # the dataset is not the image CT Image Storage promises
    assert no_pixels.ErrorComment.startswith("MissingPixelDataError: DICOM object has no pixel")
    text_slope = assoc.send_c_store(text_slope_file)
    assert text_slope.Status == 0xC000  # a typed decode error, its reason in the comment
    assert text_slope.ErrorComment.startswith("InvalidDicomFieldError: RescaleSlope")
    assert assoc.send_c_echo().Status == 0x0000  # the SCP still serves this association
    assoc.release()
    assert db_rows("SELECT * FROM slices") == []
    assert db_rows("SELECT * FROM studies") == []
    assert _stored_files(storage) == []


def test_locked_database_answers_out_of_resources_and_a_resend_is_stored(
    node, phantom_series, storage, db_rows
):
    console, services = node(DATABASE_BUSY_TIMEOUT_S=0.2)
    files = phantom_series(1)
    locker = connect(console.config["DATABASE"])
    begin_write(locker)  # another writer holds the database
    try:
        (refused,) = c_store(services.dicom.settings.port, files)
    finally:
        locker.rollback()
        locker.close()
    assert refused.Status == 0xA700  # out of resources: the sender retries
    assert refused.ErrorComment.startswith("StorageBusyError: ")
    assert db_rows("SELECT * FROM slices") == [] and _stored_files(storage) == []
    assert [s.Status for s in c_store(services.dicom.settings.port, files)] == [0x0000]
    assert len(db_rows("SELECT * FROM slices")) == 1


def test_receiver_thread_is_in_readyz_and_metrics(node):
    console, services = node()
    services.start()
    client = console.test_client()
    ready = client.get("/readyz").get_json()
    assert ready["checks"]["dicom"] == ready["checks"]["results"] == "ok"
    assert ready["results"] == {"last_error": ""}
    assert 'hemotriage_thread_up{thread="dicom"} 1.0' in client.get("/metrics").get_data(
        as_text=True
    )
    services.dicom.stop()
    assert client.get("/readyz").get_json()["checks"]["dicom"] == "error: thread not running"


def test_taken_port_fails_start_clearly_before_any_thread_runs(app_factory, storage):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        console = app_factory(storage, DICOM_PORT=port, DICOM_ALLOWED_AES=SCANNER)
        services = console.extensions[EXTENSION_KEY]
        with pytest.raises(DicomPortError, match=f"127.0.0.1:{port}.*HEMOTRIAGE_DICOM_PORT"):
            services.start()
        assert not services.worker.is_alive()
        assert not services.dicom.is_alive()


def test_port_zero_turns_the_receiver_off(app_factory, storage):
    services = app_factory(storage, DICOM_PORT=0).extensions[EXTENSION_KEY]
    assert services.dicom is None
    assert "dicom" not in services.thread_probes()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RESULTS_DESTINATION", "PACS"),
        ("RESULTS_DESTINATION", "PACS@pacs.example"),
        ("RESULTS_DESTINATION", "@pacs.example:104"),
        ("RESULTS_DESTINATION", "PACS@:104"),
        ("RESULTS_DESTINATION", "PACS@pacs.example:http"),
        ("RESULTS_DESTINATION", "PACS@pacs.example:70000"),
        ("RESULTS_DESTINATION", "SEVENTEEN_CHARS_X@pacs.example:104"),
        ("DICOM_AE_TITLE", "BACK\\SLASH"),
        ("DICOM_ALLOWED_AES", "CT1,SEVENTEEN_CHARS_X"),
        ("DICOM_PORT", "eleven"),
        ("DICOM_PORT", 70000),
        ("DICOM_QUIET_S", 0),
        ("DICOM_QUIET_S", "ten"),
    ],
)
def test_malformed_dicom_settings_fail_app_creation(app_factory, storage, key, value):
    with pytest.raises(ValueError, match=f"HEMOTRIAGE_{key}"):
        app_factory(storage, **{key: value})


def test_dicom_settings_are_read_from_their_documented_names(app_factory, storage):
    console = app_factory(
        storage,
        DICOM_PORT="",
        DICOM_ALLOWED_AES=" CT1 , PACSROUTER ,",
        RESULTS_DESTINATION="PACS@[::1]:104",
    )
    settings = DicomSettings.from_config(console.config)
    assert settings.port == 0 and settings.ae_title == NODE
    assert settings.allowed_aes == ("CT1", "PACSROUTER")
    assert settings.quiet_s == 10.0
    assert (settings.results_destination.ae_title, settings.results_destination.host) == (
        "PACS",
        "::1",
    )
    assert settings.results_destination.port == 104


def test_gunicorn_worker_runs_the_receiver(console_server, phantom_series):
    url = console_server.url + "/readyz"
    assert wait_for(lambda: _readyz(url).get("dicom") == "ok", timeout_s=60)
    statuses = c_store(console_server.dicom_port, phantom_series(1), calling="ANYONE")
    assert [s.Status for s in statuses] == [0x0000]  # empty allow-list: this host may send
    console_server.stop()
    log = console_server.log.read_text()
    assert f"DICOM receiver HEMOTRIAGE listening on 127.0.0.1:{console_server.dicom_port}" in log


def test_gunicorn_with_the_dicom_port_taken_fails_to_boot_and_says_why(tmp_path):
    server = ConsoleServer(tmp_path / "storage")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.dicom_port))
        taken.listen()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "console/gunicorn.conf.py"],
            env=server.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 3  # gunicorn: "Worker failed to boot."
    assert f"DicomPortError: the DICOM receiver cannot listen on 127.0.0.1:{server.dicom_port}" in (
        result.stderr
    )


def _readyz(url: str) -> dict:
    """The readiness checks, also while /readyz answers 503."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    except OSError:  # not listening yet
        return {}
    return json.loads(body)["checks"]
