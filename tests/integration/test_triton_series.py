"""The series models on the embedded Triton: same answers as in-process, any series length."""

from pathlib import Path

import numpy as np
import pytest

from build_engines.serve import EmbeddedTriton, ServeSettings
from client.classify import LocalClassifier, LocalSeriesModel, classify_series
from client.errors import ModelNotReadyError
from client.registry import get_model
from client.series import SERIES_MODEL_RULE, series_features
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration

BASES = ["mobilenet_v2", "resnet18"]


def _features(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return series_features(rng.uniform(0.0, 1.0, length), rng.uniform(0.0, 0.6, length))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("base", BASES)
def test_served_series_model_matches_the_in_process_one_at_any_length(
    triton_server, base, protocol
):
    spec = get_model(base)
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    local = LocalSeriesModel(spec)
    with TritonClassifier(spec, url, protocol) as classifier:
        for length in (1, 2, 37, 300):
            features = _features(length, seed=length)
            served_slices, served_series = classifier.refine_series(features)
            local_slices, local_series = local.refine_series(features)
            assert served_slices.shape == (length,)
            np.testing.assert_allclose(served_slices, local_slices, atol=1e-4, rtol=0)
            assert served_series == pytest.approx(local_series, abs=1e-4)


def test_a_series_is_decided_alike_in_process_and_served(triton_server, data_dir: Path):
    """``classify --series`` and ``--local`` give one decision by the series model."""
    spec = get_model("resnet18", SERIES_MODEL_RULE)
    folder = data_dir / "cq500_ct1" / "series_thin_every8"
    local = classify_series(folder, LocalClassifier(spec))
    with TritonClassifier(spec, triton_server.grpc_url, "grpc") as classifier:
        served = classify_series(folder, classifier)
    assert served.series.method == local.series.method == SERIES_MODEL_RULE
    assert served.series.flagged == local.series.flagged
    assert served.key_slice == local.key_slice
    assert served.series.score == pytest.approx(local.series.score, abs=1e-3)
    np.testing.assert_allclose(served.series.refined, local.series.refined, atol=1e-3)


def test_a_server_without_the_series_model_is_not_ready_for_a_site_that_chose_it():
    """The console must not start deciding series without the model that decides them."""
    with (
        EmbeddedTriton(ServeSettings(models=("resnet18",)).with_free_ports()) as server,
        pytest.raises(ModelNotReadyError, match="resnet18_series"),
    ):
        TritonClassifier(get_model("resnet18", SERIES_MODEL_RULE), server.http_url, retries=0)
