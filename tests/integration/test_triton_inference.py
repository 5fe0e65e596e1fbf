"""The embedded Triton answers exactly what in-process ONNX Runtime answers."""

import numpy as np
import onnxruntime as ort
import pytest

from client.constants import INPUT_NAME, OUTPUT_NAME, PRIORITY_URGENT
from client.registry import get_model, list_models
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration

MODELS = [s.name for s in list_models(runtime="onnxruntime")]  # the OpenVINO ones: own test


def _onnx_runtime(name: str, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(get_model(name).onnx_path), providers=["CPUExecutionProvider"]
    )
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0][:, 1]


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.parametrize("shm", ["off", "on"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", MODELS)
def test_triton_matches_onnx_runtime_on_real_slices(triton_server, real_batch, name, protocol, shm):
    url = _url(triton_server, protocol)
    with TritonClassifier(get_model(name), url, protocol, shm=shm) as classifier:
        served = classifier.predict(real_batch)
        assert classifier.transport() == ("shm" if shm == "on" else "wire")
    assert served.shape == (len(real_batch),)
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, _onnx_runtime(name, real_batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batches_above_max_batch_size_are_split_and_kept_in_order(
    triton_server, real_batch, protocol
):
    spec = get_model("mobilenet_v2")
    batch = np.concatenate([real_batch] * (spec.max_batch_size // len(real_batch) + 2))
    assert len(batch) > spec.max_batch_size
    with TritonClassifier(spec, _url(triton_server, protocol), protocol) as classifier:
        served = classifier.predict(batch, priority=PRIORITY_URGENT)
    np.testing.assert_allclose(served, _onnx_runtime(spec.name, batch), atol=1e-4, rtol=0)


def test_empty_batch_gives_no_probabilities_without_a_request(triton_server):
    spec = get_model("resnet18")
    with TritonClassifier(spec, triton_server.http_url) as classifier:
        empty = np.empty((0, 3, spec.input_size, spec.input_size), np.uint8)
        assert classifier.predict(empty).shape == (0,)
