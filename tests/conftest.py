"""Fixtures shared by unit and integration tests.

``triton_server`` starts the real embedded tritonserver (the nvidia-pytriton
binary, python backend running ONNX Runtime) once per session on free ports.
It skips, with the command to run, when the ONNX files have not been built:
``make test`` builds them first with ``python -m build_engines export`` and
``python -m build_engines quantize``.
"""

from pathlib import Path

import numpy as np
import pytest

from benchmarks.phantoms import SeriesIds, dicom_bytes, head_phantom, phantom_dicom, with_raw_field
from build_engines.data import data_dir_from_env


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = data_dir_from_env()
    if not (path / "kaggle_head_ct").exists():
        pytest.skip(f"labelled data not found at {path} (set HEMOTRIAGE_DATA_DIR)")
    return path


@pytest.fixture
def poisoned_dicom():
    """A new 64 px phantom CT slice with one field's value replaced by raw bytes."""

    def make(keyword: str, vr: str, value: bytes) -> bytes:
        data = dicom_bytes(phantom_dicom(head_phantom(64), SeriesIds.new()))
        return with_raw_field(data, keyword, vr, value)

    return make


@pytest.fixture(scope="session")
def real_slice_paths(data_dir: Path) -> list[Path]:
    """A dozen real slices from every source: hemorrhage and normal, PNG, JPEG and DICOM."""
    return [
        data_dir / "kaggle_head_ct/head_ct/000.png",
        data_dir / "kaggle_head_ct/head_ct/042.png",
        data_dir / "kaggle_head_ct/head_ct/150.png",
        data_dir / "kaggle_head_ct/head_ct/199.png",
        data_dir / "phe_sich/images/0001_05.png",
        data_dir / "phe_sich/images/0002_10.png",
        data_dir / "phe_sich/images/0070_08.jpg",
        *sorted((data_dir / "ct_ich_dev").rglob("*.jpg"))[:2],
        *sorted((data_dir / "cq500_ct1/series_thin_every8").iterdir())[10:12],
        data_dir / "cq500_ct1/single_5mm/CT000000.dcm",
    ]


@pytest.fixture(scope="session")
def real_batch(real_slice_paths: list[Path]) -> np.ndarray:
    """``real_slice_paths`` through the one preprocessing path: uint8 (N, 3, 224, 224)."""
    from client.preprocess import preprocess_file
    from client.registry import get_model

    spec = get_model("mobilenet_v2")
    return np.stack([preprocess_file(p, spec) for p in real_slice_paths])


@pytest.fixture(scope="session")
def triton_server():
    """The embedded tritonserver with the ONNX Runtime models and the series models, on free ports.

    The OpenVINO entries serve the same graphs and have their own server in
    ``tests/integration/test_triton_openvino.py``: loading every model here takes
    about 2.5 times the start time and 2.2 times the memory
    (``benchmarks/results/triton_start.md``).
    """
    from benchmarks.stack import triton_on_free_ports
    from build_engines.serve import missing_model_files
    from client.registry import list_models, series_model_names

    server = triton_on_free_ports(
        (*(s.name for s in list_models(runtime="onnxruntime")), *series_model_names())
    )
    missing = missing_model_files(server.settings)
    if missing:
        pytest.skip(
            f"{len(missing)} model files not built ({missing[0]} ...); run "
            "'python -m build_engines export' and 'python -m build_engines quantize'"
        )
    with server:
        yield server
