"""Triton's dynamic batcher merges concurrent single-slice requests into larger batches."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from client.registry import get_model
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration


def _executed_batch_sizes(classifier: TritonClassifier) -> dict[int, int]:
    stats = classifier.statistics()["model_stats"][0]
    return {
        int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats.get("batch_stats", [])
    }


def _batches_since(
    classifier: TritonClassifier, before: dict[int, int], slices: int, timeout_s: float = 10.0
) -> dict[int, int]:
    """Batches executed since ``before``, once they cover ``slices`` (or the timeout passed).

    Triton records a batch's statistics after sending its responses, so they can lag.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        after = _executed_batch_sizes(classifier)
        new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
        covered = sum(size * count for size, count in new.items())
        if covered >= slices or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_requests_are_batched(triton_server, real_batch, protocol):
    spec = get_model("resnet18_int8" if protocol == "grpc" else "resnet18")
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with TritonClassifier(spec, url, protocol) as classifier:
        before = _executed_batch_sizes(classifier)
        slices = [real_batch[i % len(real_batch)][None] for i in range(48)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(classifier.predict, slices))
        new = _batches_since(classifier, before, len(slices))
    assert all(r.shape == (1,) for r in results)
    assert sum(size * count for size, count in new.items()) == len(slices)
    assert max(size for size, count in new.items() if count > 0) > 1, new
