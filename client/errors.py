"""Typed errors for everything that can go wrong between a file and a score.

Every failure a user can cause (a bad file, a missing model, a server that is
down) is one subclass of :class:`HemoTriageError` with a human message, so the
CLI prints one line and the console maps each class to one HTTP status.

    try:
        tensor = preprocess_file(path, spec)
    except InvalidImageError as e:
        print(e)  # "not an image: notes.txt is neither PNG, JPEG nor DICOM"
"""

from __future__ import annotations


class HemoTriageError(Exception):
    """Base class: a failure with a message meant for a person, not a traceback."""

    #: HTTP status the console answers with when this error rejects a request.
    http_status: int = 500


class InvalidStudyError(HemoTriageError):
    """The input cannot be classified as it is; the sender must fix the input."""

    http_status = 422


class InvalidImageError(InvalidStudyError):
    """The bytes are not a PNG, JPEG or DICOM image at all."""

    http_status = 415


class EmptyFileError(InvalidStudyError):
    """The file holds no bytes."""


class TruncatedFileError(InvalidStudyError):
    """The file starts like an image but ends early or is corrupt."""


class ImageTooSmallError(InvalidStudyError):
    """The image is below the smallest side a head CT slice can have."""


class ImageTooLargeError(InvalidStudyError):
    """The file or its decoded pixels exceed the limits (decompression-bomb guard)."""

    http_status = 413


class MissingPixelDataError(InvalidStudyError):
    """A DICOM object without PixelData (a structured report, a presentation state)."""


class UnsupportedModalityError(InvalidStudyError):
    """A DICOM image from a modality other than CT."""


class MultiFrameDicomError(InvalidStudyError):
    """A multi-frame DICOM object; the triage path takes one slice per object."""


class InvalidDicomFieldError(InvalidStudyError):
    """A DICOM field is missing or holds a value the standard does not allow.

    The message names the field (keyword and tag), so the sender's export can be fixed.
    """


class UnsupportedTransferSyntaxError(InvalidStudyError):
    """A DICOM encoding the decoder does not read; re-send it uncompressed or JPEG Lossless.

    Deflated Explicit VR Little Endian is among them: its body must be inflated
    whole before one element can be read, so a small file can expand without bound.
    """

    http_status = 415


class UnknownModelError(HemoTriageError):
    """The model name is not in the registry."""

    http_status = 404


class MissingWeightsError(HemoTriageError):
    """The model's trained weights are absent or fail their checksum."""

    http_status = 503


class ServerUnavailableError(HemoTriageError):
    """The Triton server does not answer or is not ready."""

    http_status = 503


class ModelNotReadyError(HemoTriageError):
    """The Triton server answers but the model is missing, unready or mismatched."""

    http_status = 503


class InferenceFailedError(HemoTriageError):
    """The server answered the request with an error (a rejected batch, a backend failure).

    Unlike :class:`ServerUnavailableError` the server is there; sending the same
    request again is unlikely to help, so callers retry it a few times at most.
    """

    http_status = 502


class InferenceTimeoutError(HemoTriageError):
    """The inference request did not finish within its timeout."""

    http_status = 504
