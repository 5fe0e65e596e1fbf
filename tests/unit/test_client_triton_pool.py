"""ServerPool's choice of server and its rotation; the health checks are plain functions.

The same pool against real Triton servers: tests/integration/test_triton_pool.py.
"""

import pytest

from client.errors import ServerUnavailableError
from client.triton_pool import ServerPool, parse_urls


class Checks:
    """A health check whose answer per URL the test sets, counting calls."""

    def __init__(self):
        self.failing: set[str] = set()
        self.calls: list[str] = []

    def __call__(self, url: str) -> None:
        self.calls.append(url)
        if url in self.failing:
            raise ServerUnavailableError(f"{url} refused")


def test_parse_urls_splits_and_strips_a_comma_separated_list():
    assert parse_urls("triton:8001") == ("triton:8001",)
    assert parse_urls("a:8001, b:8001") == ("a:8001", "b:8001")


@pytest.mark.parametrize("text", ["", "a:8001,", "a:8001,,b:8001", "a:8001,a:8001"])
def test_parse_urls_refuses_empty_and_repeated_entries(text):
    with pytest.raises(ValueError):
        parse_urls(text)


def test_sequential_requests_alternate_between_idle_servers():
    pool = ServerPool(("a", "b", "c"), Checks())
    picked = []
    for _ in range(6):
        picked.append(pool.acquire())
        pool.release(picked[-1])
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_concurrent_requests_go_to_the_server_with_fewest_in_flight():
    pool = ServerPool(("a", "b"), Checks())
    assert [pool.acquire(), pool.acquire(), pool.acquire()] == ["a", "b", "a"]
    pool.release("a")
    pool.release("a")  # a has none in flight, b has one
    assert pool.acquire() == "a"
    assert [(s.url, s.outstanding) for s in pool.statuses()] == [("a", 1), ("b", 1)]


def test_a_failed_server_gets_no_request_until_its_health_check_passes():
    checks = Checks()
    pool = ServerPool(("a", "b"), checks, backoff_initial_s=60.0, backoff_max_s=600.0)
    pool.mark_down("b", ServerUnavailableError("b reset"))
    assert [pool.acquire() for _ in range(3)] == ["a", "a", "a"]
    assert checks.calls == []  # its backoff has not passed
    [_, b] = pool.statuses()
    assert not b.up and b.reason == "b reset"


def test_a_server_due_for_its_check_rejoins_when_the_check_passes():
    checks = Checks()
    pool = ServerPool(("a", "b"), checks, backoff_initial_s=0.0)
    pool.mark_down("b", ServerUnavailableError("b reset"))
    checks.failing.add("b")
    assert pool.acquire() == "a"
    assert checks.calls == ["b"] and not pool.statuses()[1].up
    checks.failing.clear()
    assert pool.acquire() == "b"
    assert checks.calls == ["b", "b"] and pool.statuses()[1].up


def test_failed_checks_double_the_wait_up_to_the_cap():
    pool = ServerPool(("a",), Checks(), backoff_initial_s=1.0, backoff_max_s=3.0)
    waits = []
    for _ in range(4):
        pool.mark_down("a", ServerUnavailableError("down"))
        waits.append(pool._server("a").backoff_s)
    assert waits == [1.0, 2.0, 3.0, 3.0]
    pool.mark_up("a")
    pool.mark_down("a", ServerUnavailableError("down again"))
    assert pool._server("a").backoff_s == 1.0


def test_with_every_server_down_the_one_due_soonest_is_tried():
    pool = ServerPool(("a", "b"), Checks(), backoff_initial_s=60.0, backoff_max_s=600.0)
    pool.mark_down("a", ServerUnavailableError("a down"))
    pool.mark_down("a", ServerUnavailableError("a still down"))  # a waits 120 s, b 60 s
    pool.mark_down("b", ServerUnavailableError("b down"))
    assert not pool.has_ready()
    assert pool.acquire() == "b"
