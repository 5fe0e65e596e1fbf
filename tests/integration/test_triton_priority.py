"""An urgent request overtakes routine requests already waiting in Triton's queue.

The precondition is read from what the server reports, not from a sleep:
Triton's ``nv_inference_pending_request_count`` metric must show several
routine batches waiting before the urgent request is sent.
"""

import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from client.constants import PRIORITY_ROUTINE, PRIORITY_URGENT
from client.registry import get_model
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration

#: Full batches of routine work sent at once; each runs alone (one instance, max batch size).
ROUTINE_BATCHES = 6
#: Routine batches that must be waiting in Triton's queue before the urgent request goes.
WAITING_BEFORE_URGENT = 3


def _pending_requests(metrics_url: str, model: str) -> int:
    """Requests queued and not yet executing, as Triton's Prometheus metrics report them."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = rf'^nv_inference_pending_request_count\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def test_urgent_request_is_served_before_queued_routine_ones(triton_server, real_batch):
    spec = get_model("resnet18")
    metrics_url = f"http://127.0.0.1:{triton_server.settings.metrics_port}/metrics"
    full = np.resize(real_batch, (spec.max_batch_size, *real_batch.shape[1:]))
    done: dict[str, int] = {}
    order = iter(range(10_000))
    lock = threading.Lock()
    with TritonClassifier(spec, triton_server.grpc_url, "grpc", timeout_s=300) as classifier:

        def send(label: str, batch: np.ndarray, priority: int) -> None:
            classifier.predict(batch, priority=priority)
            with lock:
                done[label] = next(order)

        routine = [
            threading.Thread(target=send, args=(f"routine{i}", full, PRIORITY_ROUTINE))
            for i in range(ROUTINE_BATCHES)
        ]
        for thread in routine:
            thread.start()
        deadline = time.monotonic() + 120
        waiting = 0
        while waiting < WAITING_BEFORE_URGENT and time.monotonic() < deadline:
            waiting = _pending_requests(metrics_url, spec.name)
        assert waiting >= WAITING_BEFORE_URGENT, f"Triton never queued routine work: {waiting}"
        send("urgent", real_batch[:1], PRIORITY_URGENT)
        for thread in routine:
            thread.join()
    overtaken = [label for label, rank in done.items() if rank > done["urgent"]]
    assert overtaken, f"the urgent request finished after every routine batch: {done}"
