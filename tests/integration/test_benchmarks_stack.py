"""The shared launcher starts Triton and the console on free ports, ready, and stops both."""

import socket
import urllib.request

import pytest

from benchmarks.console_api import ConsoleApi
from benchmarks.phantoms import phantom_series
from benchmarks.stack import ConsoleStack, StackSettings
from build_engines.serve import ServeSettings, missing_model_files
from client.constants import DEFAULT_CONSOLE_PORT, DEFAULT_GRPC_PORT
from client.triton_client import server_health

pytestmark = pytest.mark.integration

_MODELS = ("mobilenet_v2",)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_console_stack_classifies_an_upload_on_free_ports_and_stops_both():
    if missing_model_files(ServeSettings(models=_MODELS)):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    with ConsoleStack(StackSettings(models=_MODELS)) as stack:
        console_port, grpc_port = _port(stack.url), _port(stack.triton_grpc_url)
        assert console_port != DEFAULT_CONSOLE_PORT and grpc_port != DEFAULT_GRPC_PORT
        with urllib.request.urlopen(stack.url + "/readyz", timeout=10) as response:
            assert response.status == 200
        assert server_health(stack.triton_grpc_url, "grpc", timeout_s=5.0).ready
        api = ConsoleApi(stack.url, stack.token)
        with api.events() as stream:
            study_id = api.upload([("IM0001.dcm", phantom_series(1)[0])], None)["study_id"]
            event = stream.get(timeout_s=60)
            while event is not None and (event.data["id"], event.data["status"]) not in {
                (study_id, "flagged"),
                (study_id, "negative"),
            }:
                event = stream.get(timeout_s=60)
        assert event is not None, "the study's result never reached the stream"
        assert api.study(study_id)["status"] == event.data["status"]
    assert not _listening(console_port)
    assert not _listening(grpc_port)
