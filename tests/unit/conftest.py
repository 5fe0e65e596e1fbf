from pathlib import Path

import pytest

from build_engines.data import data_dir_from_env


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = data_dir_from_env()
    if not (path / "kaggle_head_ct").exists():
        pytest.skip(f"labelled data not found at {path} (set HEMOTRIAGE_DATA_DIR)")
    return path
