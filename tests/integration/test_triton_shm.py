"""System shared memory between client and the embedded Triton on one host (issue 10).

The input tensor goes through a region registered once per thread and server
and reused; the answers are the wire's, bit for bit; close() unregisters; a
refused registration falls back to the wire with the reason logged.
"""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client.registry import get_model
from client.triton_client import (
    SHM_ENV,
    TritonClassifier,
    _ShmRegion,
    is_local_url,
    shm_mode_from_env,
)

pytestmark = pytest.mark.integration

SPEC = get_model("mobilenet_v2_int8")


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _registered(server) -> set[str]:
    """Names of the system shared-memory regions the server holds, asked over HTTP."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        return {r["name"] for r in client.get_system_shared_memory_status()}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shm_and_wire_give_equal_answers_and_regions_are_reused_then_released(
    triton_server, real_batch, protocol
):
    url = _url(triton_server, protocol)
    with TritonClassifier(SPEC, url, protocol, shm="off") as wire:
        expected = wire.predict(real_batch)
        assert wire.transport() == "wire"
    with TritonClassifier(SPEC, url, protocol, shm="auto") as classifier:
        assert classifier.transport() == "shm"  # auto: the fixture's server is on localhost
        first = classifier.predict(real_batch)
        second = classifier.predict(real_batch[::-1])
        regions = _registered(triton_server)
        ours = {r.name for r in classifier._shm_regions}
        assert len(ours) == 1 and ours <= regions  # one region for this thread, reused
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected[::-1])
    assert not ours & _registered(triton_server)  # unregistered on close


def test_each_thread_gets_its_own_region_and_answers_stay_in_order(triton_server, real_batch):
    with TritonClassifier(SPEC, triton_server.grpc_url, "grpc", shm="on") as wire_free:
        slices = [real_batch[i % len(real_batch)][None] for i in range(24)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(wire_free.predict, slices))
        regions = len(wire_free._shm_regions)
    with TritonClassifier(SPEC, triton_server.grpc_url, "grpc", shm="off") as wire:
        expected = wire.predict(np.concatenate(slices))
    np.testing.assert_array_equal(np.concatenate(results), expected)
    assert 1 <= regions <= 4


def test_refused_registration_falls_back_to_the_wire_with_the_reason(
    triton_server, real_batch, monkeypatch, caplog
):
    created = TritonClassifier._create_region

    def unknown_key(self):
        region = created(self)
        # A key the server cannot open: what a remote server or a missing /dev/shm answers.
        return _ShmRegion(region.name, "/hemotriage_no_such_key", region.byte_size, region.handle)

    monkeypatch.setattr(TritonClassifier, "_create_region", unknown_key)
    with (
        caplog.at_level(logging.WARNING, logger="client.triton_client"),
        TritonClassifier(SPEC, triton_server.http_url, "http", shm="on") as classifier,
    ):
        served = classifier.predict(real_batch)
        assert classifier.transport() == "wire"
    with TritonClassifier(SPEC, triton_server.http_url, "http", shm="off") as wire:
        np.testing.assert_array_equal(served, wire.predict(real_batch))
    assert "falling back to the wire" in caplog.text


def test_setting_comes_from_the_environment_and_is_validated(monkeypatch):
    monkeypatch.delenv(SHM_ENV, raising=False)
    assert shm_mode_from_env() == "off"  # measured no faster than the uint8 wire
    monkeypatch.setenv(SHM_ENV, "AUTO")
    assert shm_mode_from_env() == "auto"
    monkeypatch.setenv(SHM_ENV, "sometimes")
    with pytest.raises(ValueError, match="HEMOTRIAGE_TRITON_SHM"):
        shm_mode_from_env()
    assert is_local_url("localhost:8001") and is_local_url("127.0.0.1:8000")
    assert is_local_url("[::1]:8001") and not is_local_url("triton-0:8001")


def test_a_closed_classifier_opens_a_new_region_when_used_again(triton_server, real_batch):
    classifier = TritonClassifier(SPEC, triton_server.grpc_url, "grpc", shm="on")
    try:
        first = classifier.predict(real_batch[:2])
        classifier.close()
        again = classifier.predict(real_batch[:2])
        assert len(classifier._shm_regions) == 1
    finally:
        classifier.close()
    np.testing.assert_array_equal(first, again)
