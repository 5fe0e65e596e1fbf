"""One classifier over two real Triton servers: spread, failover, re-admission.

Every assertion on where requests went reads each server's own statistics
(Triton's per-model count of successful requests), never the client's view;
"mid-request" is what the server's verbose log says it is executing.
"""

import logging
import re
import threading

import numpy as np
import pytest

from client.registry import get_model
from client.triton_client import TritonClassifier
from tests.console.conftest import wait_for

pytestmark = pytest.mark.integration

SPEC = get_model("mobilenet_v2")
SLICE = np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
#: One full request: long enough on the CPU server to be caught executing.
FULL = np.random.default_rng(1).integers(0, 256, (SPEC.max_batch_size, 3, 224, 224), dtype=np.uint8)


@pytest.fixture(scope="module")
def two_servers():
    from build_engines.serve import EmbeddedTriton, ServeSettings, missing_model_files

    if missing_model_files(ServeSettings.from_env(models=(SPEC.name,))):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    servers = []
    try:
        for _ in range(2):  # ports taken one server at a time, so the two never collide
            settings = ServeSettings.from_env(models=(SPEC.name,), log_verbose=1).with_free_ports()
            servers.append(EmbeddedTriton(settings).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def servers(two_servers):
    """Both servers running when a test starts (the one before may have killed one)."""
    for server in two_servers:
        if not server.running:
            server.start()
    return two_servers


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _executing(server) -> bool:
    """The server has started executing a request it has not released (its verbose log)."""
    log = server.log_path.read_text(errors="replace")
    started = len(re.findall(r"executing \d+ requests", log))
    return started > len(re.findall(r"released \d+ requests", log))


def _served(classifier: TritonClassifier, url: str) -> int:
    """Requests the server at ``url`` answered successfully, by its own statistics."""
    stats = classifier.statistics(url)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def _served_since(classifier, urls: list[str], before: list[int], total: int) -> list[int]:
    """Requests each server answered since ``before``, once they add up to ``total``.

    Triton updates its statistics after sending the response, so they may lag a little.
    """
    since = []

    def counted() -> bool:
        since[:] = [_served(classifier, u) - b for u, b in zip(urls, before, strict=True)]
        return sum(since) >= total

    wait_for(counted, timeout_s=30)
    return since


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_are_spread_evenly_over_both_servers(servers, protocol):
    urls = [_url(s, protocol) for s in servers]
    with TritonClassifier(SPEC, ",".join(urls), protocol) as classifier:
        before = [_served(classifier, u) for u in urls]
        for _ in range(6):
            classifier.predict(SLICE)
        assert _served_since(classifier, urls, before, 6) == [3, 3]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_killed_mid_request_loses_no_request_and_the_other_takes_over(
    servers, protocol, caplog
):
    caplog.set_level(logging.WARNING)
    urls = [_url(s, protocol) for s in servers]
    with TritonClassifier(SPEC, ",".join(urls), protocol, recheck_backoff_s=30.0) as classifier:
        expected = classifier.predict(FULL)  # on the first server; the next goes to the second
        results = []
        run = threading.Thread(
            target=lambda: results.extend(classifier.predict(FULL) for _ in range(4))
        )
        run.start()
        assert wait_for(lambda: _executing(servers[1]), timeout_s=60)
        servers[1].kill()
        run.join(timeout=120)
        assert len(results) == 4  # every request answered, the one cut off included
        for probabilities in results:
            np.testing.assert_allclose(probabilities, expected, atol=1e-5)
        failovers = [r for r in caplog.records if "retrying at once on another" in r.getMessage()]
        assert len(failovers) == 1 and urls[1] in failovers[0].getMessage()
        assert not classifier.servers()[1].up

        # Triton counts a request once it releases it: read the count when nothing runs.
        assert wait_for(lambda: not _executing(servers[0]), timeout_s=30)
        before = _served(classifier, urls[0])
        for _ in range(4):
            classifier.predict(SLICE)
        assert _served_since(classifier, urls[:1], [before], 4) == [4]


def test_a_restarted_server_is_used_again(servers):
    urls = [s.grpc_url for s in servers]
    with TritonClassifier(SPEC, ",".join(urls), "grpc", recheck_backoff_s=0.05) as classifier:
        servers[1].kill()
        classifier.predict(SLICE)
        classifier.predict(SLICE)  # the second server's turn: refused, sent to the first
        assert not classifier.servers()[1].up
        servers[1].start()  # the same ports, as a restarted pod behind the same name
        assert wait_for(
            lambda: classifier.predict(SLICE) is not None and _served(classifier, urls[1]) > 0,
            timeout_s=30,
        )
        assert classifier.servers()[1].up
        before = [_served(classifier, u) for u in urls]
        for _ in range(4):
            classifier.predict(SLICE)
        assert _served_since(classifier, urls, before, 4) == [2, 2]
