"""``serve`` runs the embedded Triton until SIGTERM/SIGINT, then stops it and exits 0."""

import signal
import subprocess
import sys
import time

import pytest

from build_engines.serve import ServeSettings, missing_model_files
from client.errors import ServerUnavailableError
from client.triton_client import server_health

pytestmark = pytest.mark.integration

_SERVE = """
import logging, sys
from build_engines.serve import ServeSettings, serve
logging.basicConfig(level=logging.INFO)
sys.exit(serve(ServeSettings(http_port={http}, grpc_port={grpc}, metrics_port={metrics},
                             models=("mobilenet_v2",))))
"""


def _wait_ready(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if server_health(url, "http", timeout_s=1.0).ready:
                return True
        except ServerUnavailableError:
            pass  # not listening yet
        time.sleep(0.25)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_the_server_and_exits_zero_on_signal(signum):
    settings = ServeSettings(models=("mobilenet_v2",)).with_free_ports()
    if missing_model_files(settings):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    code = _SERVE.format(
        http=settings.http_port, grpc=settings.grpc_port, metrics=settings.metrics_port
    )
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_ready(settings.http_url, timeout_s=120)
        process.send_signal(signum)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert f"received {signum.name}" in process.stderr.read()
    with pytest.raises(ServerUnavailableError, match="no Triton server answers"):
        server_health(settings.http_url, "http", timeout_s=1.0)
