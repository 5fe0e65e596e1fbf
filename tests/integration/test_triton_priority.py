"""An urgent request overtakes routine requests already waiting in Triton's queue."""

import threading
import time

import numpy as np
import pytest

from client.constants import PRIORITY_ROUTINE, PRIORITY_URGENT
from client.registry import get_model
from client.triton_client import TritonClassifier

pytestmark = pytest.mark.integration


def test_urgent_request_is_served_before_queued_routine_ones(triton_server, real_batch):
    spec = get_model("resnet18")
    full = np.resize(real_batch, (spec.max_batch_size, *real_batch.shape[1:]))
    done: dict[str, float] = {}
    with TritonClassifier(spec, triton_server.grpc_url, "grpc", timeout_s=120) as classifier:

        def send(label: str, batch: np.ndarray, priority: int) -> None:
            classifier.predict(batch, priority=priority)
            done[label] = time.monotonic()

        routine = [
            threading.Thread(target=send, args=(f"routine{i}", full, PRIORITY_ROUTINE))
            for i in range(3)
        ]
        for thread in routine:
            thread.start()
        time.sleep(0.5)  # the first full batch runs, the other two wait in the queue
        send("urgent", real_batch[:1], PRIORITY_URGENT)
        for thread in routine:
            thread.join()
    routine_done = sorted(t for label, t in done.items() if label.startswith("routine"))
    assert done["urgent"] < routine_done[1], done
