"""Constants shared by every layer, kept here so no module has to import upward.

from client.constants import ENV_PREFIX, DEFAULT_GRPC_PORT
"""

from __future__ import annotations

from pathlib import Path

#: Prefix of every environment variable the project reads (``HEMOTRIAGE_...``).
ENV_PREFIX = "HEMOTRIAGE_"

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
WEIGHTS_DIR = REPO_ROOT / "weights"
#: Labelled data lives beside the checkout and is read in place, never copied.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_CONSOLE_PORT = 5000
#: IANA's registered "dicom" port (the well-known 104 needs root).
DEFAULT_DICOM_PORT = 11112

#: Triton tensor names, identical for every slice model in the repository.
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
#: The series models' (``<base>_series``) tensor names: (1, T, F) features in,
#: (1, T) refined slice probabilities and (1,) the series probability out.
SERIES_INPUT_NAME = "features"
SERIES_SLICE_OUTPUT_NAME = "slice_probabilities"
SERIES_OUTPUT_NAME = "series_probability"

#: Triton request priorities (1 is served first; see the dynamic_batching
#: priority_levels in each config.pbtxt).
PRIORITY_URGENT = 1
PRIORITY_ROUTINE = 2
