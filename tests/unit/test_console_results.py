"""The PACS result objects (console/results.py): what they say, and about which slice."""

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from benchmarks.phantoms import SeriesIds, head_phantom, phantom_dicom
from console.results import SeriesResult, secondary_capture, structured_report

RESULT = SeriesResult(
    model_name="mobilenet_v2",
    model_version="1 (weights abcdef012345)",
    weights_sha256="ab" * 32,
    score=0.81,
    threshold=0.4,
    flagged=True,
    slices=12,
    version=2,
)


def _key_slice_without_type2_attributes() -> Dataset:
    ds = phantom_dicom(head_phantom(64), SeriesIds.new())
    for keyword in ("PatientName", "StudyDate", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_sr_references_the_key_slice_and_says_not_for_diagnostic_use():
    key = _key_slice_without_type2_attributes()
    sr = _round_trip(structured_report(RESULT, key))
    assert sr.StudyInstanceUID == key.StudyInstanceUID
    assert sr.SeriesInstanceUID != key.SeriesInstanceUID
    assert sr.InstanceNumber == 2 and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert items["Key Images"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        key.SOPInstanceUID
    )
    assert items["Model weights SHA-256"].TextValue == "ab" * 32
    assert items["Intracranial hemorrhage (disorder)"].ConceptCodeSequence[0].CodeMeaning == (
        "Present"
    )
    assert "made on 12 slices" in items["Comment"].TextValue
    assert "PatientName" not in key  # the key slice itself is left as it was


def test_secondary_capture_burns_the_label_into_the_overlay():
    key = _key_slice_without_type2_attributes()
    overlay = np.full((224, 224, 3), 128, np.uint8)
    sc = _round_trip(secondary_capture(RESULT, key, overlay))
    assert sc.StudyInstanceUID == key.StudyInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    pixels = sc.pixel_array
    assert pixels.shape == (448, 448, 3)
    assert pixels[:28].max() > 200  # white (anti-aliased) text on the black band
    assert (pixels[40:] == 128).all()  # the overlay below it is untouched


def test_a_single_component_patient_name_is_not_written_to_the_log(recwarn):
    key = phantom_dicom(head_phantom(64), SeriesIds.new())
    key.PatientName = "DOE"  # valid DICOM; highdicom's check would warn, quoting it
    structured_report(RESULT, key)
    secondary_capture(RESULT, key, np.zeros((224, 224, 3), np.uint8))
    assert [str(w.message) for w in recwarn if "DOE" in str(w.message)] == []
