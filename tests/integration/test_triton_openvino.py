"""The embedded Triton serves the OpenVINO variants, and they answer as ONNX Runtime does."""

import re

import numpy as np
import pytest

from client.registry import get_model, list_models
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration

OPENVINO = [s.name for s in list_models(runtime="openvino")]
#: Largest |p - p_ORT| allowed against the ONNX Runtime twin graph, per precision. f32: the
#: same arithmetic. bf16 (against fp32): the largest difference `python -m build_engines
#: variants` measured on 256 held-out slices, 0.0586 (mobilenet_v2; 0.022 on these slices).
#: int8 (against ONNX Runtime on the same QDQ graph): 0.031 on these slices, other kernels.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.06, "int8": 0.05}


@pytest.fixture(scope="module")
def openvino_server():
    """An embedded tritonserver with the OpenVINO entries only (2.8 s and 1,094 MiB here)."""
    pytest.importorskip("openvino")
    from benchmarks.stack import triton_on_free_ports
    from build_engines.serve import missing_model_files

    server = triton_on_free_ports(tuple(OPENVINO))
    if missing_model_files(server.settings):
        pytest.skip("ONNX models not built; run 'python -m build_engines export' and 'quantize'")
    with server:
        yield server


def _cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("name", OPENVINO)
def test_openvino_variant_matches_onnx_runtime_within_its_precision(
    openvino_server, real_batch, name
):
    from build_engines.runners import predict, runner_for

    spec = get_model(name)
    twin = get_model(spec.graph_name)
    with TritonClassifier(spec, openvino_server.grpc_url, "grpc") as classifier:
        served = classifier.predict(real_batch)
    expected = predict(runner_for(twin, threads=2), real_batch)
    precision = spec.precision
    if precision == "bf16" and not _cpu_has_bf16():
        precision = "fp32"  # the model runs in f32 there
    assert served.shape == (len(real_batch),)
    np.testing.assert_allclose(served, expected, atol=TOLERANCE[precision], rtol=0)


def test_server_log_names_the_precision_openvino_compiled(openvino_server):
    log = openvino_server.log_path.read_text().splitlines()

    def compiled(name: str) -> str:
        line = next(line for line in log if f"{name}: OpenVINO" in line)
        return re.search(r"inference precision (\w+)", line).group(1)

    assert compiled("mobilenet_v2_openvino") == "f32"
    assert compiled("mobilenet_v2_openvino_int8") == "f32"  # outside the quantized operators
    assert compiled("mobilenet_v2_openvino_bf16") == ("bf16" if _cpu_has_bf16() else "f32")
    assert any("has no BF16" in line for line in log) is not _cpu_has_bf16()
