"""Result objects for the PACS: a Comprehensive SR and a Grad-CAM secondary capture.

Pure functions: they take one completed series' facts (:class:`SeriesResult`)
and its key slice as received, and return DICOM datasets built with highdicom;
nothing here touches the database or the network (console/outbox.py sends them).
Both objects join the key slice's study (patient and study attributes copied
from it by highdicom), each in a new series of its own, and both say "NOT FOR
DIAGNOSTIC USE": HemoTriage reorders a worklist, it does not diagnose.

    result = SeriesResult(model_name="mobilenet_v2", ..., version=1)
    sr = structured_report(result, key_slice)          # the key slice's pydicom Dataset
    sc = secondary_capture(result, key_slice, overlay)  # overlay: uint8 (H, W, 3) RGB
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

#: Said by every object we send, in its series description and its content.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "HemoTriage"
#: Series numbers of our objects, high so a viewer lists them after the scanner's series.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
#: Codes of our own (PS3.16 8.2: a private coding scheme designator starts with "99").
_SCHEME = "99HEMOTRIAGE"
_WEIGHTS_SHA256 = hd.sr.CodedConcept("WSHA256", _SCHEME, "Model weights SHA-256")
_SERIES_SCORE = hd.sr.CodedConcept("SCORE", _SCHEME, "Series hemorrhage score")
_THRESHOLD = hd.sr.CodedConcept("THRESH", _SCHEME, "Decision threshold")
_DECISION = hd.sr.CodedConcept("DECISION", _SCHEME, "Triage decision")
#: Patient and study attributes our objects copy from the key slice: Type 1 and 2 in the
#: Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1), which a scanner may leave out.
_COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
#: The overlay is drawn at this many pixels a side, so the burned-in label is legible.
_SC_SIZE_PX = 448
_LABEL_BAND_PX = 28


@dataclass(frozen=True)
class SeriesResult:
    """The facts a completed series' result objects carry.

    Attributes:
        model_name: Registry name of the model (``mobilenet_v2``).
        model_version: As shown on the console (Triton version and short weights hash).
        weights_sha256: Full SHA-256 of the trained weights.
        score: The series score.
        threshold: The threshold it was compared with.
        flagged: ``score >= threshold``.
        slices: Slices the decision was made on.
        version: 1 for the first decision, +1 each time the series grew and was re-decided.
    """

    model_name: str
    model_version: str
    weights_sha256: str
    score: float
    threshold: float
    flagged: bool
    slices: int
    version: int

    @property
    def decision(self) -> str:
        """The decision in words, as the SR and the secondary capture state it."""
        if self.flagged:
            return "flagged: suspected intracranial hemorrhage (triage priority raised)"
        return "not flagged: no intracranial hemorrhage suspected by the model"


def structured_report(result: SeriesResult, key_slice: Dataset) -> Dataset:
    """A Comprehensive SR of the series decision, referencing the key slice by SOP Instance UID.

    Args:
        result: The completed series' facts.
        key_slice: The key slice as received (pixel data not needed).

    Returns:
        The SR dataset, explicit VR little endian, with new series and instance UIDs.
    """
    decided = "flagged" if result.flagged else "not flagged"
    items = [
        hd.sr.TextContentItem(
            codes.DCM.AlgorithmName, f"{MANUFACTURER} {result.model_name}", "CONTAINS"
        ),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, result.model_version, "CONTAINS"),
        hd.sr.TextContentItem(_WEIGHTS_SHA256, result.weights_sha256, "CONTAINS"),
        hd.sr.NumContentItem(
            _SERIES_SCORE, result.score, codes.UCUM.NoUnits, relationship_type="CONTAINS"
        ),
        hd.sr.NumContentItem(
            _THRESHOLD, result.threshold, codes.UCUM.NoUnits, relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(_DECISION, result.decision, "CONTAINS"),
        hd.sr.CodeContentItem(
            codes.SCT.IntracranialHemorrhage,
            codes.DCM.Present if result.flagged else codes.DCM.Absent,
            "CONTAINS",
        ),
        hd.sr.ImageContentItem(
            codes.DCM.KeyImages,
            key_slice.SOPClassUID,
            key_slice.SOPInstanceUID,
            relationship_type="CONTAINS",
        ),
        hd.sr.TextContentItem(
            codes.DCM.Comment,
            f"{NOT_FOR_DIAGNOSTIC_USE}. A triage aid that reorders a worklist, not a "
            f"diagnosis. Result version {result.version}, made on {result.slices} slices.",
            "CONTAINS",
        ),
    ]
    root = hd.sr.ContainerContentItem(codes.DCM.CADProcessingAndFindingsSummary)
    root.ContentSequence = items
    with _no_patient_names_in_logs():
        report = hd.sr.ComprehensiveSR(
            evidence=[_with_study_attributes(key_slice)],
            content=root,
            series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=result.version,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=_description(result, decided),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    return report


def secondary_capture(result: SeriesResult, key_slice: Dataset, overlay_rgb: np.ndarray) -> Dataset:
    """A secondary capture of the key slice's Grad-CAM overlay, labelled non-diagnostic.

    The label is burned into the pixels as well as stated in the attributes, since
    a viewer may show neither the series description nor the image comments.

    Args:
        result: The completed series' facts.
        key_slice: The key slice as received.
        overlay_rgb: uint8 (H, W, 3) RGB: the model view with its heatmap blended on.

    Returns:
        The secondary capture dataset, in a new series of the key slice's study.
    """
    label = f"{NOT_FOR_DIAGNOSTIC_USE} - Grad-CAM, score {result.score:.3f}"
    pixels = _labelled(overlay_rgb, label)
    with _no_patient_names_in_logs():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_with_study_attributes(key_slice),
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=hd.UID(),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=result.version,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=_description(result, "Grad-CAM of the key slice"),
        )
    image.BurnedInAnnotation = "YES"
    image.ImageComments = (
        f"{NOT_FOR_DIAGNOSTIC_USE}. Grad-CAM of {result.model_name} on the key slice "
        f"{key_slice.SOPInstanceUID} ({result.decision})."
    )
    return image


@contextlib.contextmanager
def _no_patient_names_in_logs() -> Iterator[None]:
    """Silence highdicom's person-name check: its warning quotes the patient's name.

    A single-component PatientName (many scanners and anonymisers write one) is
    valid DICOM; the warning would only put the name in the console's log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name", category=UserWarning)
        yield


def _with_study_attributes(key_slice: Dataset) -> Dataset:
    """A copy of the key slice with every copied attribute present, as highdicom expects.

    A sender may leave Type 2 attributes out; they are then present and empty.
    """
    filled = copy.deepcopy(key_slice)
    for keyword in _COPIED_ATTRIBUTES:
        if keyword not in filled:
            setattr(filled, keyword, None)
    return filled


def _description(result: SeriesResult, what: str) -> str:
    """Series description (LO: 64 characters at most)."""
    return f"{MANUFACTURER} v{result.version} {what} - {NOT_FOR_DIAGNOSTIC_USE}"[:64]


def _labelled(overlay_rgb: np.ndarray, text: str) -> np.ndarray:
    """The overlay enlarged to ``_SC_SIZE_PX`` with ``text`` in a black band along the top."""
    image = cv2.resize(overlay_rgb, (_SC_SIZE_PX, _SC_SIZE_PX), interpolation=cv2.INTER_LINEAR)
    image[:_LABEL_BAND_PX] = 0
    cv2.putText(
        image,
        text,
        (6, _LABEL_BAND_PX - 9),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    return np.ascontiguousarray(image)
