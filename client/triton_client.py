"""Triton over HTTP or gRPC as a :class:`client.classify.Classifier`.

:class:`TritonClassifier` checks on construction that the server answers, that
the model is loaded and that its input and output match the registry, so a
misconfigured deployment fails at start-up with one clear message instead of
at the first patient. Each ``predict`` call sends the whole batch, split into
requests of at most ``spec.max_batch_size`` slices, with the caller's priority
(``PRIORITY_URGENT`` jumps Triton's queue), a timeout, and retries with
exponential backoff on transient failures. tritonclient's exceptions are
wrapped into :mod:`client.errors` where they enter our code.

``url`` may list several servers, comma-separated: requests are spread over
the ready ones and a failed server leaves the rotation until a health check
passes again (:mod:`client.triton_pool`, which says why the client balances
rather than a Kubernetes Service). A request whose server goes away is sent
once more at once to another ready server; inference has no side effects, so
a repeat is safe.

    with TritonClassifier(get_model("resnet18"), url="localhost:8001", protocol="grpc") as c:
        probabilities = c.predict(batch, priority=PRIORITY_URGENT)
    TritonClassifier(get_model("resnet18"), url="triton-0:8001,triton-1:8001", protocol="grpc")
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from http.client import HTTPException
from typing import Literal

import numpy as np

from client.constants import INPUT_NAME, OUTPUT_NAME, PRIORITY_ROUTINE
from client.errors import (
    HemoTriageError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from client.registry import ModelSpec
from client.triton_pool import ServerPool, ServerStatus, parse_urls

logger = logging.getLogger(__name__)

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[Protocol, ...] = ("http", "grpc")

#: Column of the hemorrhage class in the model output [normal, hemorrhage].
_HEMORRHAGE = 1
#: gRPC status codes (and HTTP statuses) worth another try: the server is restarting or busy.
_TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
_TRANSIENT_HTTP = ("502", "503")
#: Longest health check of a server out of rotation: it runs on a request's path.
_RECHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ModelHealth:
    """Readiness of one model on a server."""

    name: str
    ready: bool
    state: str
    reason: str


@dataclass(frozen=True)
class ServerHealth:
    """What a server reports about itself and its models."""

    url: str
    protocol: Protocol
    live: bool
    ready: bool
    version: str
    models: tuple[ModelHealth, ...]


class TritonClassifier:
    """Scores preprocessed batches on a Triton server; see the module docstring.

    Args:
        spec: The registry entry; its name is the Triton model name.
        url: ``host:port`` of Triton's HTTP (default 8000) or gRPC (8001) endpoint,
            or several, comma-separated.
        protocol: ``http`` or ``grpc``.
        timeout_s: Limit for connecting and for each request, in seconds.
        retries: Further attempts after a transient failure (connection refused,
            503/UNAVAILABLE), besides the one immediate retry on another server.
            Timeouts are not retried: the deadline is the caller's.
        backoff_s: Wait before the first retry; doubled before each next one.
        recheck_backoff_s: Wait before health-checking a failed server (one of
            several) again; doubled after each failed check, up to 30 s.

    Raises:
        ServerUnavailableError: no server answers and is ready.
        ModelNotReadyError: the model is missing, not ready, or its input or
            output do not match ``spec`` (on every server that answers).
        ValueError: a bad protocol, URL list or limit.
    """

    def __init__(
        self,
        spec: ModelSpec,
        url: str,
        protocol: Protocol = "http",
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        recheck_backoff_s: float = 1.0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be positive, retries and backoff_s not negative")
        self.spec = spec
        self.urls = parse_urls(url)
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._local = threading.local()
        self._clients: list = []
        self._clients_lock = threading.Lock()
        recheck_timeout_s = min(timeout_s, _RECHECK_TIMEOUT_S)
        self._pool = ServerPool(
            self.urls,
            check=lambda u: self._check(u, recheck_timeout_s),
            backoff_initial_s=recheck_backoff_s,
        )
        failures = self._check_all()
        for server_url, error in failures.items():
            self._pool.mark_down(server_url, error)

    def predict(self, batch: np.ndarray, priority: int = PRIORITY_ROUTINE) -> np.ndarray:
        """Score a float32 (N, 3, S, S) batch; return N probabilities of hemorrhage.

        Args:
            batch: Preprocessed slices from :mod:`client.preprocess`.
            priority: Triton queue priority, ``PRIORITY_URGENT`` (1) or ``PRIORITY_ROUTINE`` (2).

        Returns:
            float32 (N,) P(hemorrhage).

        Raises:
            ValueError: ``batch`` has the wrong shape or dtype.
            InferenceTimeoutError: a request exceeded ``timeout_s``.
            ServerUnavailableError: no server answers (after one retry at once on
                another ready server, then the retries with backoff).
            InferenceFailedError: the server answered with an error for this request.
        """
        expected = (3, self.spec.input_size, self.spec.input_size)
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.float32:
            raise ValueError(
                f"{self.spec.name} takes float32 (N, {', '.join(map(str, expected))}); "
                f"got {batch.dtype} {batch.shape}"
            )
        if len(batch) == 0:
            return np.empty(0, dtype=np.float32)
        step = self.spec.max_batch_size
        parts = [
            self._infer_with_retries(np.ascontiguousarray(batch[i : i + step]), priority)
            for i in range(0, len(batch), step)
        ]
        return np.concatenate(parts)[:, _HEMORRHAGE].astype(np.float32)

    def statistics(self, url: str | None = None) -> dict:
        """Triton's inference statistics for this model (batch counts, queue times), as JSON.

        Args:
            url: The server to ask; the first listed by default.
        """
        url = url or self.urls[0]
        timeout = _grpc_timeout(self.protocol, self.timeout_s)
        return self._call(
            url, lambda c: _as_json(c.get_inference_statistics(self.spec.name, **timeout))
        )

    def servers(self) -> tuple[ServerStatus, ...]:
        """Each server's state as last seen: in rotation or not, and why (``/metrics``)."""
        return self._pool.statuses()

    def check_servers(self) -> tuple[ServerStatus, ...]:
        """Health-check the failed servers whose backoff has passed; then :meth:`servers`.

        Lets a readiness probe bring a restarted server back while no request flows.
        """
        self._pool.check_due()
        return self._pool.statuses()

    def close(self) -> None:
        """Close every connection this classifier opened (one per calling thread)."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _client(self, url: str):
        """This thread's client of ``url``: tritonclient's are not safe to share across threads."""
        clients = self._thread_clients()
        client = clients.get(url)
        if client is None:
            client = _make_client(url, self.protocol, self.timeout_s)
            clients[url] = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _thread_clients(self) -> dict:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        return clients

    def _infer_with_retries(self, chunk: np.ndarray, priority: int) -> np.ndarray:
        attempt = 0
        failed_over = False
        while True:
            url = self._pool.acquire()
            try:
                result = self._infer(url, chunk, priority)
            except ServerUnavailableError as e:
                self._pool.mark_down(url, e)
                if not failed_over and self._pool.has_ready():
                    failed_over = True
                    logger.warning(
                        "%s on %s unavailable; retrying at once on another server",
                        self.spec.name,
                        url,
                    )
                    continue
                if attempt == self.retries:
                    raise
                delay_s = self.backoff_s * 2**attempt
                logger.warning(
                    "%s on %s unavailable (attempt %d/%d); retrying in %.2f s",
                    self.spec.name,
                    url,
                    attempt + 1,
                    self.retries + 1,
                    delay_s,
                )
                time.sleep(delay_s)
                attempt += 1
            else:
                self._pool.mark_up(url)
                return result
            finally:
                self._pool.release(url)

    def _infer(self, url: str, chunk: np.ndarray, priority: int) -> np.ndarray:
        module = _module(self.protocol)
        tensor = module.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk)
        output = module.InferRequestedOutput(OUTPUT_NAME)
        timeout = _grpc_timeout(self.protocol, self.timeout_s)
        result = self._call(
            url,
            lambda c: c.infer(
                self.spec.name, [tensor], outputs=[output], priority=priority, **timeout
            ),
        )
        return result.as_numpy(OUTPUT_NAME)

    def _call(self, url: str, request):
        """Run ``request(client)`` on ``url`` and translate tritonclient's failures into ours."""
        from tritonclient.utils import InferenceServerException

        try:
            return request(self._client(url))
        except InferenceServerException as e:
            error = self._translate(url, e)
            if isinstance(error, ServerUnavailableError):
                # A new gRPC channel connects at once; the old one may sit out its
                # reconnect backoff long after the server is back.
                self._drop_client(url)
            raise error from e
        except TimeoutError as e:  # HTTP (geventhttpclient) network timeout
            raise InferenceTimeoutError(
                f"{self.spec.name} on {url}: no answer within {self.timeout_s:g} s"
            ) from e
        except (OSError, HTTPException) as e:
            # Connection refused or reset, or (HTTP: geventhttpclient's HTTPConnectionClosed)
            # closed before the answer: the server went away.
            self._drop_client(url)
            raise ServerUnavailableError(f"Triton at {url} ({self.protocol}): {e}") from e

    def _translate(self, url: str, e) -> Exception:
        status = str(e.status() or "")
        message = f"{self.spec.name} on {url} ({self.protocol}): {e.message()}"
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in (e.message() or "").lower():
            return InferenceTimeoutError(message)
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return ServerUnavailableError(message)
        return InferenceFailedError(message)

    def _drop_client(self, url: str) -> None:
        client = self._thread_clients().pop(url, None)
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _check_all(self) -> dict[str, HemoTriageError]:
        """Check every server at start; return the failures of those that are not usable.

        Raises:
            ServerUnavailableError, ModelNotReadyError: no server is usable; with
                one server its own error, as before lists were accepted.
        """
        failures: dict[str, HemoTriageError] = {}
        for url in self.urls:
            try:
                self._check(url, self.timeout_s)
            except (ServerUnavailableError, ModelNotReadyError) as e:
                failures[url] = e
        if len(failures) < len(self.urls):
            return failures
        errors = list(failures.values())
        if len(errors) == 1:
            raise errors[0]
        kind = next(
            (type(e) for e in errors if isinstance(e, ModelNotReadyError)), ServerUnavailableError
        )
        detail = "; ".join(map(str, errors))
        raise kind(f"none of {len(errors)} Triton servers is usable: {detail}")

    def _check(self, url: str, timeout_s: float) -> None:
        """Server ready, model ready and matching the registry, on a client of its own.

        Raises:
            ServerUnavailableError, ModelNotReadyError: see the class.
        """
        client = _make_client(url, self.protocol, timeout_s)
        try:
            self._check_server(client, url, timeout_s)
            self._check_model(client, url, timeout_s)
        finally:
            client.close()

    def _check_server(self, client, url: str, timeout_s: float) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            ready = client.is_server_ready(**_grpc_timeout(self.protocol, timeout_s))
        except (InferenceServerException, OSError) as e:
            raise ServerUnavailableError(
                f"no Triton server answers at {url} ({self.protocol}): {e}; "
                "start one with 'python -m build_engines serve'"
            ) from e
        if not ready:
            raise ServerUnavailableError(f"Triton at {url} is up but not ready")

    def _check_model(self, client, url: str, timeout_s: float) -> None:
        from tritonclient.utils import InferenceServerException

        name = self.spec.name
        timeout = _grpc_timeout(self.protocol, timeout_s)
        try:
            if not client.is_model_ready(name, **timeout):
                index = _as_json(client.get_model_repository_index(**timeout))
                known = {m["name"]: m for m in _index_models(index)}
                if name not in known:
                    raise ModelNotReadyError(
                        f"model {name!r} is not in the repository of {url}; "
                        f"it serves {', '.join(sorted(known)) or 'nothing'}"
                    )
                state = known[name].get("state", "UNKNOWN")
                reason = known[name].get("reason", "")
                raise ModelNotReadyError(f"model {name!r} on {url} is {state} {reason}".strip())
            metadata = _as_json(client.get_model_metadata(name, **timeout))
        except InferenceServerException as e:
            raise ModelNotReadyError(f"model {name!r} on {url}: {e.message()}") from e
        except OSError as e:
            raise ServerUnavailableError(f"Triton at {url}: {e}") from e
        self._check_tensors(url, metadata)

    def _check_tensors(self, url: str, metadata: dict) -> None:
        size = self.spec.input_size
        expected_in = {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]}
        expected_out = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 2]}
        for role, expected, tensors in (
            ("input", expected_in, metadata.get("inputs", [])),
            ("output", expected_out, metadata.get("outputs", [])),
        ):
            found = [
                {"name": t["name"], "datatype": t["datatype"], "shape": list(map(int, t["shape"]))}
                for t in tensors
            ]
            if found != [expected]:
                raise ModelNotReadyError(
                    f"model {self.spec.name!r} on {url} has {role} {found}, "
                    f"the registry expects {expected}; rebuild the model repository"
                )


def server_health(url: str, protocol: Protocol = "http", timeout_s: float = 5.0) -> ServerHealth:
    """Ask a server whether it is live and ready, and the state of every model it knows.

    Raises:
        ServerUnavailableError: nothing answers at ``url``.
    """
    from tritonclient.utils import InferenceServerException

    client = _make_client(url, protocol, timeout_s)
    timeout = _grpc_timeout(protocol, timeout_s)
    try:
        live = client.is_server_live(**timeout)
        ready = client.is_server_ready(**timeout)
        version = _as_json(client.get_server_metadata(**timeout)).get("version", "")
        index = _index_models(_as_json(client.get_model_repository_index(**timeout)))
    except (InferenceServerException, OSError) as e:
        raise ServerUnavailableError(f"no Triton server answers at {url} ({protocol}): {e}") from e
    finally:
        client.close()
    models = tuple(
        ModelHealth(
            m["name"], m.get("state") == "READY", m.get("state", "UNKNOWN"), m.get("reason", "")
        )
        for m in index
    )
    return ServerHealth(url, protocol, live, ready, version, models)


def _module(protocol: Protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _make_client(url: str, protocol: Protocol, timeout_s: float):
    module = _module(protocol)
    if protocol == "grpc":
        return module.InferenceServerClient(url)
    return module.InferenceServerClient(
        url, connection_timeout=timeout_s, network_timeout=timeout_s
    )


def _grpc_timeout(protocol: Protocol, timeout_s: float) -> dict[str, float]:
    """Per-call deadline keyword: gRPC takes one per call, HTTP set it on the connection."""
    return {"client_timeout": timeout_s} if protocol == "grpc" else {}


def _as_json(response) -> dict | list:
    """HTTP answers dicts already; gRPC answers protobuf messages."""
    if isinstance(response, (dict, list)):
        return response
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response, preserving_proto_field_name=True)


def _index_models(index: dict | list) -> list[dict]:
    """The repository index as a list of {name, version, state, reason} for both protocols."""
    return index if isinstance(index, list) else index.get("models", [])
