"""A real PACS (Debian's Orthanc) pushes series to HemoTriage and receives its results back.

Orthanc runs from a generated configuration on free ports (benchmarks/orthanc.py),
with HemoTriage registered as a modality; the console runs its receiver, worker
and results thread in-process with a 1 s quiet period. Everything is checked
through state: database rows, Orthanc's REST API, the console's JSON and metrics.
"""

import io
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from benchmarks.orthanc import ORTHANC_AE, Orthanc, OrthancError
from benchmarks.phantoms import SeriesIds, dicom_bytes, head_phantom, phantom_dicom
from build_engines.serve import free_ports
from console.services import EXTENSION_KEY
from tests.console.conftest import ADMIN, c_store, wait_for

NODE = "HEMOTRIAGE"

pytestmark = pytest.mark.skipif(
    shutil.which("Orthanc") is None, reason="Orthanc is not installed: run 'make orthanc'"
)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc for the module (it takes seconds to stop); every test uses new studies."""
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), (NODE, free_ports(1)[0])).start()
    yield pacs
    pacs.stop()


@pytest.fixture
def pacs_and_node(orthanc, app_factory, storage):
    """Orthanc and a started console that receives from it and sends results to it."""
    node_port = free_ports(1)[0]
    if not orthanc.is_running():
        orthanc.start()  # a test stopped it and failed before starting it again
    orthanc.register_node((NODE, node_port))

    def console(**overrides):
        app = app_factory(
            storage,
            DICOM_PORT=node_port,
            DICOM_ALLOWED_AES=ORTHANC_AE,
            DICOM_QUIET_S=1.0,
            RESULTS_DESTINATION=f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
            RESULTS_BACKOFF_INITIAL_S=0.1,
            RESULTS_BACKOFF_MAX_S=0.5,
            RESULTS_TIMEOUT_S=10.0,
            **overrides,
        )
        app.extensions[EXTENSION_KEY].start()
        return app

    return orthanc, console


def _outbox(db_rows) -> list:
    return db_rows("SELECT * FROM outbox ORDER BY id")


def _latest(db_rows) -> list:
    """The outbox rows of the study's latest result version (its SR and secondary capture).

    A machine pausing longer than the quiet period in the middle of a push would
    complete the series twice (the second time as version 2): still correct, so the
    checks follow the latest version.
    """
    (study,) = db_rows("SELECT result_version FROM studies")
    return db_rows("SELECT * FROM outbox WHERE version = ? ORDER BY id", study["result_version"])


def _delivered(db_rows, slices: int) -> bool:
    """The series is complete with all its slices and every result object is sent."""
    studies = db_rows("SELECT completed_slices FROM studies")
    rows = _outbox(db_rows)
    return (
        len(studies) == 1
        and studies[0]["completed_slices"] == slices
        and len(_latest(db_rows)) == 2
        and all(r["status"] == "sent" for r in rows)
    )


def _store_in_orthanc(orthanc: Orthanc, files: list[bytes]) -> str:
    """Upload a series to Orthanc; its Orthanc series id."""
    series = {orthanc.upload(data)["ParentSeries"] for data in files}
    (series_id,) = series
    return series_id


def _check_results_in_orthanc(orthanc: Orthanc, db_rows) -> None:
    """Orthanc holds our SR and secondary capture, in the right study, saying what they must."""
    (study,) = db_rows("SELECT * FROM studies")
    (key,) = db_rows("SELECT sop_uid FROM slices WHERE id = ?", study["key_slice_id"])
    rows = {r["kind"]: r for r in _latest(db_rows)}
    held = {
        i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.instances(study["study_uid"])
    }
    assert rows["sr"]["sop_uid"] in held and rows["sc"]["sop_uid"] in held
    sr = pydicom.dcmread(io.BytesIO(orthanc.file(held[rows["sr"]["sop_uid"]])))
    assert sr.StudyInstanceUID == study["study_uid"]
    assert sr.SeriesInstanceUID != study["series_uid"]
    content = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    assert content["Key Images"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key["sop_uid"]
    assert content["Algorithm Name"].TextValue == f"HemoTriage {study['model_name']}"
    assert content["Algorithm Version"].TextValue == study["model_version"]
    assert len(content["Model weights SHA-256"].TextValue) == 64
    score = content["Series hemorrhage score"].MeasuredValueSequence[0].NumericValue
    threshold = content["Decision threshold"].MeasuredValueSequence[0].NumericValue
    assert float(score) == pytest.approx(study["score"], abs=1e-6)
    assert float(threshold) == pytest.approx(study["threshold"], abs=1e-6)
    flagged = study["score"] >= study["threshold"]
    assert content["Triage decision"].TextValue.startswith("flagged" if flagged else "not flagged")
    assert "NOT FOR DIAGNOSTIC USE" in content["Comment"].TextValue
    sc = pydicom.dcmread(io.BytesIO(orthanc.file(held[rows["sc"]["sop_uid"]])))
    assert sc.StudyInstanceUID == study["study_uid"]
    assert sc.SeriesInstanceUID not in (study["series_uid"], sr.SeriesInstanceUID)
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert sc.pixel_array.shape[2] == 3 and np.ptp(sc.pixel_array) > 0


@pytest.mark.integration
def test_orthanc_pushes_a_real_series_and_gets_our_sr_and_secondary_capture(
    pacs_and_node, triton_server, cq500_series, db_rows
):
    orthanc, console = pacs_and_node
    app = console(CLASSIFIER="triton", TRITON_URL=triton_server.grpc_url)
    series_id = _store_in_orthanc(orthanc, [p.read_bytes() for p in cq500_series])
    orthanc.push([series_id])
    assert len(db_rows("SELECT * FROM slices")) == len(cq500_series) == 30
    assert wait_for(lambda: _delivered(db_rows, 30), timeout_s=120)
    (study,) = db_rows("SELECT * FROM studies")
    assert study["status"] in ("flagged", "negative")
    assert {r["status"] for r in db_rows("SELECT status FROM slices")} == {"classified"}
    _check_results_in_orthanc(orthanc, db_rows)
    body = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'hemotriage_outbox_objects{state="pending"} 0.0' in body
    assert 'hemotriage_outbox_objects{state="failed"} 0.0' in body
    assert 'hemotriage_thread_up{thread="results"} 1.0' in body


def test_orthanc_pushes_a_phantom_series_and_the_study_shows_delivery(
    pacs_and_node, phantom_series, db_rows, logged_in_as
):
    orthanc, console = pacs_and_node
    app = console()
    orthanc.push([_store_in_orthanc(orthanc, phantom_series(4))])
    assert wait_for(lambda: _delivered(db_rows, 4), timeout_s=120)
    _check_results_in_orthanc(orthanc, db_rows)
    (study,) = db_rows("SELECT id FROM studies")
    client = logged_in_as(*ADMIN, on=app)
    detail = client.get(f"/api/studies/{study['id']}").get_json()
    assert detail["completed_at"] is not None
    latest = [r for r in detail["results"] if r["version"] == detail["result_version"]]
    assert [(r["kind"], r["status"], r["attempts"]) for r in latest] == [
        ("sr", "sent", 1),
        ("sc", "sent", 1),
    ]
    page = client.get(f"/studies/{study['id']}").get_data(as_text=True)
    assert 'id="delivery"' in page and "Grad-CAM secondary capture" in page


def test_pacs_down_while_results_are_due_loses_nothing(
    pacs_and_node, phantom_series, db_rows, logged_in_as
):
    orthanc, console = pacs_and_node
    orthanc.stop()
    app = console()
    services = app.extensions[EXTENSION_KEY]
    files = phantom_series(3)
    statuses = c_store(services.dicom.settings.port, files, calling=ORTHANC_AE)
    assert [s.Status for s in statuses] == [0x0000] * len(files)
    # Results are due and retried with backoff while the PACS is down, and stay pending.
    assert wait_for(
        lambda: len(_latest(db_rows)) == 2 and all(r["attempts"] >= 3 for r in _outbox(db_rows)),
        timeout_s=120,
    )
    rows = _outbox(db_rows)
    assert {r["status"] for r in rows} == {"pending"}
    assert all("could not be reached" in r["last_error"] for r in rows)
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert f'hemotriage_outbox_objects{{state="pending"}} {len(rows)}.0' in metrics
    orthanc.start()  # the PACS is back, on the same ports
    assert wait_for(lambda: _delivered(db_rows, len(files)), timeout_s=60)
    _check_results_in_orthanc(orthanc, db_rows)
    assert len(db_rows("SELECT * FROM slices WHERE status = 'classified'")) == len(files)


def test_association_from_an_unknown_ae_title_is_rejected(
    pacs_and_node, phantom_series, db_rows, storage
):
    orthanc, console = pacs_and_node
    console()
    series_id = _store_in_orthanc(orthanc, phantom_series(1))
    with pytest.raises(OrthancError, match=r"(?i)reject"):
        orthanc.push([series_id], local_ae="INTRUDER")
    assert db_rows("SELECT * FROM slices") == []
    assert not (storage / "uploads").exists() or not any((storage / "uploads").rglob("*.dcm"))


def test_a_non_ct_instance_is_refused_with_a_status_and_nothing_is_stored(
    pacs_and_node, db_rows, storage
):
    orthanc, console = pacs_and_node
    app = console()
    mr = dicom_bytes(phantom_dicom(head_phantom(64), SeriesIds.new(), modality="MR"))
    with pytest.raises(OrthancError):
        orthanc.push([_store_in_orthanc(orthanc, [mr])])
    # The status Orthanc got: what a scanner sending the same instance gets.
    scu = AE(ae_title=ORTHANC_AE)
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate(
        "127.0.0.1", app.extensions[EXTENSION_KEY].dicom.settings.port, ae_title=NODE
    )
    status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(mr)))
    assoc.release()
    assert status.Status == 0xA900
    assert status.ErrorComment.startswith("UnsupportedModalityError")
    assert db_rows("SELECT * FROM slices") == [] and db_rows("SELECT * FROM studies") == []
    assert not (storage / "uploads").exists() or not any((storage / "uploads").rglob("*.dcm"))


def test_shadow_mode_completes_series_but_sends_nothing_to_the_pacs(
    pacs_and_node, phantom_series, db_rows
):
    orthanc, console = pacs_and_node
    console(SHADOW_MODE=True)
    files = phantom_series(3)
    orthanc.push([_store_in_orthanc(orthanc, files)])
    assert wait_for(
        lambda: [s["completed_slices"] for s in db_rows("SELECT * FROM studies")] == [3],
        timeout_s=120,
    )
    assert _outbox(db_rows) == []
    (study,) = db_rows("SELECT study_uid FROM studies")
    assert len(orthanc.instances(study["study_uid"])) == 3  # only what Orthanc pushed
