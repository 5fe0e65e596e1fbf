"""A wrong deployment fails at construction with one clear, typed error."""

import dataclasses
import socket

import numpy as np
import pytest

from client.cli_health import add_health_command
from client.errors import InferenceTimeoutError, ModelNotReadyError, ServerUnavailableError
from client.registry import get_model
from client.triton_client import TritonClassifier, server_health

pytestmark = pytest.mark.integration

PROTOCOLS = ["http", "grpc"]


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_down_raises_server_unavailable(protocol):
    with pytest.raises(ServerUnavailableError, match="no Triton server answers"):
        TritonClassifier(
            get_model("resnet18"), f"localhost:{_closed_port()}", protocol, timeout_s=2.0
        )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_model_raises_model_not_ready_and_lists_served_models(triton_server, protocol):
    spec = dataclasses.replace(get_model("resnet18"), name="resnet50")
    with pytest.raises(ModelNotReadyError, match=r"'resnet50' is not in the repository.*resnet18"):
        TritonClassifier(spec, _url(triton_server, protocol), protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_input_shape_mismatch_raises_model_not_ready(triton_server, protocol):
    spec = dataclasses.replace(get_model("mobilenet_v2"), input_size=256)
    with pytest.raises(ModelNotReadyError, match=r"has input .*224, 224.*expects.*256, 256"):
        TritonClassifier(spec, _url(triton_server, protocol), protocol)


def test_wrong_batch_shape_is_refused_before_sending(triton_server):
    with TritonClassifier(get_model("resnet18"), triton_server.http_url) as classifier:
        with pytest.raises(ValueError, match=r"takes uint8 \(N, 3, 224, 224\)"):
            classifier.predict(np.zeros((2, 3, 128, 128), np.uint8))
        with pytest.raises(ValueError, match="float32"):  # the old, normalized contract
            classifier.predict(np.zeros((2, 3, 224, 224), np.float32))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_timeout_raises_inference_timeout(triton_server, real_batch, protocol):
    with (
        TritonClassifier(
            get_model("resnet18"),
            _url(triton_server, protocol),
            protocol,
            timeout_s=0.05,
            retries=0,
        ) as classifier,
        pytest.raises(InferenceTimeoutError),
    ):
        classifier.predict(np.concatenate([real_batch] * 2))


def test_server_that_went_away_is_retried_then_reported(real_batch, caplog):
    from build_engines.serve import EmbeddedTriton, ServeSettings

    settings = ServeSettings.from_env(models=("mobilenet_v2",)).with_free_ports()
    with EmbeddedTriton(settings) as server:
        classifier = TritonClassifier(
            get_model("mobilenet_v2"), server.http_url, retries=2, backoff_s=0.01
        )
    with pytest.raises(ServerUnavailableError), caplog.at_level("WARNING"):
        classifier.predict(real_batch[:1])
    classifier.close()
    assert [r.getMessage().count("retrying") for r in caplog.records] == [1, 1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_reports_every_model_ready(triton_server, protocol, capsys):
    health = server_health(_url(triton_server, protocol), protocol)
    assert health.live and health.ready
    assert {m.name for m in health.models if m.ready} >= {"resnet18", "mobilenet_v2_int8"}

    import argparse

    parser = argparse.ArgumentParser()
    add_health_command(parser.add_subparsers())
    served = [f"--model={name}" for name in triton_server.settings.models]
    args = parser.parse_args(
        ["health", "--url", _url(triton_server, protocol), "--protocol", protocol, *served]
    )
    assert args.run(args) == 0
    assert "resnet18_int8                READY" in capsys.readouterr().out
    url = _url(triton_server, protocol)
    args = parser.parse_args(
        ["health", "--url", url, "--protocol", protocol, "--model", "resnet18_openvino"]
    )
    assert args.run(args) == 1  # registered, not loaded by this server
    out = capsys.readouterr().out
    assert "  resnet18_openvino " in out
    assert "READY" not in out
