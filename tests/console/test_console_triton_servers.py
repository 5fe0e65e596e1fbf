"""/readyz and /metrics name each Triton server of HEMOTRIAGE_TRITON_URL, up or down.

One server down of two leaves the console ready; an idle console (no request
flowing) notices a server that came up through its readiness probe.
"""

import pytest

from console.services import EXTENSION_KEY
from tests.console.conftest import wait_for

pytestmark = pytest.mark.integration


def _up(metrics: str, url: str) -> str:
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith(f'hemotriage_triton_server_up{{url="{url}"}}')
    )
    return line.split()[-1]


def test_readyz_and_metrics_report_each_triton_server(triton_server, app_factory, storage):
    from build_engines.serve import EmbeddedTriton, ServeSettings

    later = ServeSettings.from_env(models=("mobilenet_v2",)).with_free_ports()
    up, down = triton_server.grpc_url, later.grpc_url
    app = app_factory(storage, CLASSIFIER="triton", TRITON_URL=f"{up},{down}", INBOX_DIR="")
    app.extensions[EXTENSION_KEY].start()
    client = app.test_client()

    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    servers = ready.get_json()["triton"]
    assert servers[up] == "up"
    assert servers[down].startswith("down: ") and "no Triton server answers" in servers[down]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert (_up(metrics, up), _up(metrics, down)) == ("1.0", "0.0")

    with EmbeddedTriton(later):
        assert wait_for(lambda: client.get("/readyz").get_json()["triton"][down] == "up", 60)
        assert _up(client.get("/metrics").get_data(as_text=True), down) == "1.0"
