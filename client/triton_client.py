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

Where client and server share a host (the edge box, ``make demo``) the input
tensor can go through Triton's system shared memory instead of the socket
(issue 10): ``shm`` (or ``HEMOTRIAGE_TRITON_SHM``) is ``off`` (the default),
``auto`` (shared memory to the servers listed as localhost, 127.0.0.1 or ::1)
or ``on`` (every listed server; a remote one falls back). Off by default because
it measured no faster than the 150 KB-a-slice uint8 wire on loopback
(``benchmarks/results/wire_format/``), and a container with a small /dev/shm
dies of SIGBUS where the wire would only be slow. Each calling thread
gets one region sized for ``spec.max_batch_size`` slices, registered once with
each server it talks to and reused for every request; :meth:`close`
unregisters and destroys them. A server that refuses the registration (another
host, no /dev/shm) is served over the wire, and the reason is logged once.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Literal, TypeVar

import numpy as np

from client.constants import (
    ENV_PREFIX,
    INPUT_NAME,
    OUTPUT_NAME,
    PRIORITY_ROUTINE,
    SERIES_INPUT_NAME,
    SERIES_OUTPUT_NAME,
    SERIES_SLICE_OUTPUT_NAME,
)
from client.errors import (
    HemoTriageError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from client.registry import ModelSpec
from client.series import SERIES_MODEL_RULE
from client.triton_pool import ServerPool, ServerStatus, parse_urls

logger = logging.getLogger(__name__)

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[Protocol, ...] = ("http", "grpc")
ShmMode = Literal["auto", "on", "off"]
SHM_MODES: tuple[ShmMode, ...] = ("auto", "on", "off")
#: Environment variable that chooses the shared-memory mode when the caller does not.
SHM_ENV = f"{ENV_PREFIX}TRITON_SHM"
#: Host names that mean "this machine": ``auto`` uses shared memory with these only.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

#: Triton datatype of the model input: the client's uint8 view, normalized in the graph.
INPUT_DATATYPE = "UINT8"
#: Column of the hemorrhage class in the model output [normal, hemorrhage].
_HEMORRHAGE = 1
#: gRPC status codes (and HTTP statuses) worth another try: the server is restarting or busy.
_TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
_TRANSIENT_HTTP = ("502", "503")
#: Longest health check of a server out of rotation: it runs on a request's path.
_RECHECK_TIMEOUT_S = 2.0


_REGION_IDS = itertools.count()
_Result = TypeVar("_Result")


@dataclass
class _ShmRegion:
    """One thread's input region: created once, registered with each server it is used on."""

    name: str
    key: str
    byte_size: int
    handle: object
    registered: set[str] = field(default_factory=set)


def shm_mode_from_env() -> ShmMode:
    """``HEMOTRIAGE_TRITON_SHM`` (``off`` when unset), read when a classifier is made.

    Raises:
        ValueError: a value other than auto, on or off.
    """
    mode = os.environ.get(SHM_ENV, "off").strip().lower() or "off"
    if mode not in SHM_MODES:
        raise ValueError(f"{SHM_ENV} must be one of {', '.join(SHM_MODES)}, got {mode!r}")
    return mode


def is_local_url(url: str) -> bool:
    """Whether ``host:port`` names this machine (loopback), where shared memory can work."""
    host = url.rsplit(":", 1)[0] if url.count(":") == 1 or url.startswith("[") else url
    return host.lower() in LOCAL_HOSTS


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
        shm: ``auto``, ``on`` or ``off``: send the input through system shared
            memory (see the module docstring); ``HEMOTRIAGE_TRITON_SHM`` by default.

    Raises:
        ServerUnavailableError: no server answers and is ready.
        ModelNotReadyError: the model is missing, not ready, or its input or
            output do not match ``spec`` (on every server that answers).
        ValueError: a bad protocol, URL list, limit or shared-memory mode.
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
        shm: ShmMode | None = None,
    ) -> None:
        shm = shm_mode_from_env() if shm is None else shm
        if shm not in SHM_MODES:
            raise ValueError(f"shm must be one of {SHM_MODES}, got {shm!r}")
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
        self.shm = shm
        self._shm_urls = {
            u for u in self.urls if shm == "on" or (shm == "auto" and is_local_url(u))
        }
        self._shm_regions: list[_ShmRegion] = []
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
        """Score a uint8 (N, 3, S, S) batch; return N probabilities of hemorrhage.

        Args:
            batch: The model input of :func:`client.preprocess.model_input`
                (the graph normalizes it).
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
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
            raise ValueError(
                f"{self.spec.name} takes uint8 (N, {', '.join(map(str, expected))}); "
                f"got {batch.dtype} {batch.shape}"
            )
        if len(batch) == 0:
            return np.empty(0, dtype=np.float32)
        step = self.spec.max_batch_size
        chunks = [np.ascontiguousarray(batch[i : i + step]) for i in range(0, len(batch), step)]
        parts = [
            self._infer_with_retries(lambda url, c=chunk: self._infer(url, c, priority))
            for chunk in chunks
        ]
        return np.concatenate(parts)[:, _HEMORRHAGE].astype(np.float32)

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """Run the model's series model (``<base>_series``) on one series, on the wire.

        Args:
            features: float32 (T, F) :func:`client.series.series_features`.

        Returns:
            (T,) refined slice probabilities and P(the series bleeds).

        Raises:
            The errors of :meth:`predict`.
        """
        series = np.ascontiguousarray(np.asarray(features, np.float32)[None])
        module = _module(self.protocol)
        name = self.spec.series_model_name
        timeout = _grpc_timeout(self.protocol, self.timeout_s)

        def infer(url: str) -> tuple[np.ndarray, float]:
            tensor = module.InferInput(SERIES_INPUT_NAME, list(series.shape), "FP32")
            tensor.set_data_from_numpy(series)
            outputs = [
                module.InferRequestedOutput(n)
                for n in (SERIES_SLICE_OUTPUT_NAME, SERIES_OUTPUT_NAME)
            ]
            result = self._call(url, lambda c: c.infer(name, [tensor], outputs=outputs, **timeout))
            slices = result.as_numpy(SERIES_SLICE_OUTPUT_NAME)[0].astype(np.float32)
            return slices, float(result.as_numpy(SERIES_OUTPUT_NAME)[0])

        return self._infer_with_retries(infer)

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

    def transport(self, url: str | None = None) -> str:
        """``shm`` or ``wire``: how requests to ``url`` (the first server) carry their input now."""
        return "shm" if (url or self.urls[0]) in self._shm_urls else "wire"

    def close(self) -> None:
        """Unregister and destroy the shared-memory regions, close every connection."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
            regions, self._shm_regions = self._shm_regions, []
            # Every thread's connections and region go with them; a later call opens new ones.
            self._local = threading.local()
        for client in clients:
            client.close()
        for region in regions:
            self._release_region(region)

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

    def _infer_with_retries(self, infer: Callable[[str], _Result]) -> _Result:
        """``infer(url)`` on a ready server, failing over and retrying as the class says."""
        attempt = 0
        failed_over = False
        while True:
            url = self._pool.acquire()
            try:
                result = infer(url)
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

    def _infer(
        self, url: str, chunk: np.ndarray, priority: int, reregistered: bool = False
    ) -> np.ndarray:
        module = _module(self.protocol)
        tensor = module.InferInput(INPUT_NAME, list(chunk.shape), INPUT_DATATYPE)
        output = module.InferRequestedOutput(OUTPUT_NAME)
        timeout = _grpc_timeout(self.protocol, self.timeout_s)

        def send(client):
            return client.infer(
                self.spec.name, [tensor], outputs=[output], priority=priority, **timeout
            )

        region = self._shm_region(url)
        if region is None:
            tensor.set_data_from_numpy(chunk)
            return self._call(url, send).as_numpy(OUTPUT_NAME)
        from tritonclient.utils import shared_memory

        shared_memory.set_shared_memory_region(region.handle, [chunk])
        tensor.set_shared_memory(region.name, chunk.nbytes)
        try:
            return self._call(url, send).as_numpy(OUTPUT_NAME)
        except InferenceFailedError as e:
            if reregistered or "shared memory" not in str(e).lower():
                raise
            # The server forgot the region (restarted between two health checks):
            # register again and send once more.
            logger.warning(
                "%s on %s lost its shared-memory region; registering again", self.spec.name, url
            )
            region.registered.discard(url)
            return self._infer(url, chunk, priority, reregistered=True)

    def _shm_region(self, url: str) -> _ShmRegion | None:
        """This thread's input region, registered with ``url``; None: use the wire."""
        if url not in self._shm_urls:
            return None
        region = getattr(self._local, "shm_region", None)
        if region is None:
            region = self._local.shm_region = self._create_region()
            if region is None:
                return None
        if url in region.registered:
            return region
        # A server that is down raises ServerUnavailableError: the caller's retries apply.
        try:
            self._register(url, region)
        except (InferenceFailedError, InferenceTimeoutError) as e:
            with self._clients_lock:
                self._shm_urls.discard(url)
            logger.warning(
                "%s on %s: shared memory refused (%s); falling back to the wire",
                self.spec.name,
                url,
                e,
            )
            return None
        region.registered.add(url)
        return region

    def _create_region(self) -> _ShmRegion | None:
        """A region for ``spec.max_batch_size`` slices; None (and no more shm) when it fails."""
        from tritonclient.utils import shared_memory

        size = self.spec.input_size
        byte_size = self.spec.max_batch_size * 3 * size * size  # uint8
        name = f"hemotriage_{os.getpid()}_{next(_REGION_IDS)}_{self.spec.name}"
        try:
            handle = shared_memory.create_shared_memory_region(name, "/" + name, byte_size)
        except shared_memory.SharedMemoryException as e:
            with self._clients_lock:
                self._shm_urls.clear()
            logger.warning(
                "%s: cannot create shared memory (%s); falling back to the wire", self.spec.name, e
            )
            return None
        region = _ShmRegion(name, "/" + name, byte_size, handle)
        with self._clients_lock:
            self._shm_regions.append(region)
        return region

    def _register(self, url: str, region: _ShmRegion) -> None:
        """Register ``region`` with the server at ``url`` (dropping a stale one of that name).

        Through :meth:`_call`, so a server that is down drops this thread's connection
        like a failed request does, and the caller's retries apply.
        """
        timeout = _grpc_timeout(self.protocol, self.timeout_s)

        def register(client) -> None:
            client.unregister_system_shared_memory(region.name, **timeout)
            client.register_system_shared_memory(
                region.name, region.key, region.byte_size, **timeout
            )

        self._call(url, register)

    def _release_region(self, region: _ShmRegion) -> None:
        """Unregister ``region`` from every server that has it, then destroy it."""
        from tritonclient.utils import InferenceServerException, shared_memory

        for url in region.registered:
            client = _make_client(url, self.protocol, self.timeout_s)
            try:
                client.unregister_system_shared_memory(
                    region.name, **_grpc_timeout(self.protocol, self.timeout_s)
                )
            except (InferenceServerException, OSError) as e:
                logger.warning("could not unregister %s from %s: %s", region.name, url, e)
            finally:
                client.close()
        region.registered.clear()
        try:
            shared_memory.destroy_shared_memory_region(region.handle)
        except shared_memory.SharedMemoryException as e:
            logger.info("could not destroy %s: %s", region.name, e)

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
        region = getattr(self._local, "shm_region", None)
        if region is not None:
            # A server that went away forgot its registrations; register again on return.
            region.registered.discard(url)
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
        """The slice model is ready with the registry's tensors; so is the series model if used."""
        metadata = self._check_ready(client, url, self.spec.name, timeout_s)
        self._check_tensors(url, metadata)
        if self.spec.series_rule == SERIES_MODEL_RULE:
            self._check_ready(client, url, self.spec.series_model_name, timeout_s)

    def _check_ready(self, client, url: str, name: str, timeout_s: float) -> dict:
        """Model ``name``'s metadata, once it is ready on ``url``."""
        from tritonclient.utils import InferenceServerException

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
        return metadata

    def _check_tensors(self, url: str, metadata: dict) -> None:
        size = self.spec.input_size
        expected_in = {"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, 3, size, size]}
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
