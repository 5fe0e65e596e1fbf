"""The embedded CPU Triton: the real ``tritonserver`` from the nvidia-pytriton wheel.

The wheel ships a tritonserver 2.51 binary with only the python backend, which
runs each model's ``model.onnx`` in ONNX Runtime (see
``model_repository/onnx_runtime_model.py``). :class:`EmbeddedTriton` starts it
on the model repository with ``--model-config-name cpu`` (each model's
``configs/cpu.pbtxt``), waits until every model is ready and stops it on exit;
tests, the console demo and ``python -m build_engines serve`` all use it.

    with EmbeddedTriton(ServeSettings.from_env()) as server:
        TritonClassifier(get_model("resnet18"), url=server.http_url)

Two setup steps make the wheel's server work outside pytriton itself: the
python backend needs ``triton_python_backend_stub`` beside
``libtriton_python.so`` (the wheel keeps one per Python version under
``python_backend_stubs/``), and the stub links ``libpython3.11`` dynamically,
so this interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (a different
system libpython crashes the stub with ``_recursion_count`` errors) and this
environment's site-packages go on ``PYTHONPATH`` (for onnxruntime and numpy).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from client.constants import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ENV_PREFIX,
    MODEL_REPOSITORY,
)
from client.errors import HemoTriageError, ModelNotReadyError, ServerUnavailableError
from client.registry import get_model, list_models, series_model_names
from client.series import SERIES_MODEL_RULE

logger = logging.getLogger(__name__)

#: Per-model config file the embedded (CPU, python backend) server reads: configs/cpu.pbtxt.
CPU_CONFIG_NAME = "cpu"
#: Seconds between readiness polls while the server loads its models.
_POLL_INTERVAL_S = 0.25
#: Seconds past --exit-timeout-secs before a server that ignores SIGTERM is killed.
_KILL_GRACE_S = 15.0
#: Lines of the server log kept for error messages.
_LOG_TAIL_LINES = 40


class TritonNotInstalledError(HemoTriageError):
    """The nvidia-pytriton wheel (which carries the tritonserver binary) is missing."""


@dataclass(frozen=True)
class ServeSettings:
    """How to start the embedded server; defaults in code, overrides from ``HEMOTRIAGE_*``.

    Attributes:
        http_port: KServe v2 HTTP port (``HEMOTRIAGE_HTTP_PORT``).
        grpc_port: gRPC port (``HEMOTRIAGE_GRPC_PORT``).
        metrics_port: Prometheus metrics port (``HEMOTRIAGE_METRICS_PORT``).
        model_config_name: ``configs/<name>.pbtxt`` to use (``HEMOTRIAGE_MODEL_CONFIG_NAME``).
        models: Models to load; all registered models and their series models by default.
        repository: The model repository folder.
        startup_timeout_s: Longest wait for every model to be ready.
        exit_timeout_s: How long tritonserver waits for open requests and client
            connections on shutdown (its ``--exit-timeout-secs``).
        log_verbose: tritonserver ``--log-verbose`` level.
    """

    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    model_config_name: str = CPU_CONFIG_NAME
    models: tuple[str, ...] = field(
        default_factory=lambda: (*(s.name for s in list_models()), *series_model_names())
    )
    repository: Path = MODEL_REPOSITORY
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 5
    log_verbose: int = 0

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != 3:
            raise ValueError(f"ports must be three distinct values in 1..65535, got {ports}")
        if not self.models:
            raise ValueError("no models to serve")
        if self.startup_timeout_s <= 0 or self.exit_timeout_s < 0:
            raise ValueError("startup_timeout_s must be positive, exit_timeout_s not negative")

    @classmethod
    def from_env(cls, **overrides) -> ServeSettings:
        """Defaults, then ``HEMOTRIAGE_*`` variables, then ``overrides`` (None values skipped)."""
        env = {
            "http_port": ("HTTP_PORT", int),
            "grpc_port": ("GRPC_PORT", int),
            "metrics_port": ("METRICS_PORT", int),
            "model_config_name": ("MODEL_CONFIG_NAME", str),
            "startup_timeout_s": ("TRITON_STARTUP_TIMEOUT_S", float),
        }
        values = {
            key: cast(os.environ[ENV_PREFIX + name])
            for key, (name, cast) in env.items()
            if ENV_PREFIX + name in os.environ
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_free_ports(self) -> ServeSettings:
        """A copy on three ports the OS reports free now (for tests beside a running server)."""
        http_port, grpc_port, metrics_port = free_ports(3)
        return replace(self, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)

    @property
    def http_url(self) -> str:
        """``localhost:<http_port>``, as tritonclient takes it."""
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``localhost:<grpc_port>``, as tritonclient takes it."""
        return f"localhost:{self.grpc_port}"


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server binary, its backends and the python stubs."""

    root: Path

    @property
    def binary(self) -> Path:
        """The tritonserver executable."""
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        """The ``--backend-directory``."""
        return self.root / "backends"

    @property
    def stub(self) -> Path:
        """Where the python backend looks for its stub process."""
        return self.backends / "python" / "triton_python_backend_stub"

    def bundled_stub(self) -> Path:
        """The wheel's stub built for this interpreter's Python version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_triton() -> TritonInstall:
    """Locate the tritonserver shipped in the nvidia-pytriton wheel.

    Raises:
        TritonNotInstalledError: pytriton is not installed or lacks the binary.
    """
    try:
        import pytriton
    except ImportError as e:
        raise TritonNotInstalledError(
            "nvidia-pytriton is not installed; run 'make venv' (it carries tritonserver)"
        ) from e
    install = TritonInstall(Path(pytriton.__file__).parent / "tritonserver")
    if not install.binary.exists():
        raise TritonNotInstalledError(f"no tritonserver binary at {install.binary}")
    return install


def ensure_python_stub(install: TritonInstall) -> Path:
    """Copy the wheel's python-backend stub for this Python beside ``libtriton_python.so``.

    Raises:
        TritonNotInstalledError: the wheel has no stub for this Python version, or
            its backends folder is read-only.
    """
    if install.stub.exists():
        return install.stub
    source = install.bundled_stub()
    if not source.exists():
        raise TritonNotInstalledError(f"nvidia-pytriton has no python backend stub at {source}")
    try:
        shutil.copy2(source, install.stub)
    except OSError as e:
        raise TritonNotInstalledError(
            f"cannot install the python backend stub into {install.stub.parent} ({e}); "
            f"copy {source} there once with write access"
        ) from e
    logger.info("installed python backend stub %s", install.stub)
    return install.stub


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: this libpython first, this venv's packages importable."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
    )
    # The embedded interpreter finds its prefix (and so a venv's pyvenv.cfg) from
    # the first ``python`` on PATH, as pytriton itself arranges it.
    env["PATH"] = os.pathsep.join(
        p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p
    )
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(
            p for p in (paths["purelib"], paths["platlib"], env.get("PYTHONPATH", "")) if p
        )
    )
    return env


def server_command(install: TritonInstall, settings: ServeSettings) -> list[str]:
    """The tritonserver command line for ``settings``."""
    return [
        str(install.binary),
        f"--model-repository={settings.repository}",
        f"--backend-directory={install.backends}",
        f"--model-config-name={settings.model_config_name}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in settings.models),
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-port={settings.http_port}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-port={settings.metrics_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        f"--log-verbose={settings.log_verbose}",
    ]


def with_series_models(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and the series models their rules decide with: what Triton must load for them.

    The rule is each model's default, or ``HEMOTRIAGE_SERIES_RULE`` as the console reads it.
    """
    chosen = os.environ.get(f"{ENV_PREFIX}SERIES_RULE") or None
    slice_models = (get_model(n, chosen) for n in names if n not in series_model_names())
    needed = (s.series_model_name for s in slice_models if s.series_rule == SERIES_MODEL_RULE)
    return tuple(dict.fromkeys((*names, *needed)))


def missing_model_files(settings: ServeSettings) -> list[Path]:
    """Built files the CPU config needs but the repository lacks (model.onnx per model)."""
    return [
        settings.repository / name / "1" / "model.onnx"
        for name in settings.models
        if not (settings.repository / name / "1" / "model.onnx").exists()
    ]


def terminate(process: subprocess.Popen, timeout_s: float, name: str) -> None:
    """SIGTERM a server started in its own session; SIGKILL its whole group if it hangs.

    Args:
        process: The server, leader of its process group (``start_new_session``).
        timeout_s: How long it may take to drain and exit.
        name: What the warning calls it.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("%s ignored SIGTERM for %.0f s; killing it", name, timeout_s)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class EmbeddedTriton:
    """A tritonserver subprocess on the model repository, ready when entered.

    Args:
        settings: Ports, models and config name; :meth:`ServeSettings.from_env` by default.

    Attributes:
        settings: The settings it runs with.
        log_path: File that collects the server's stdout and stderr; removed by
            :meth:`stop` unless the server failed to start.

    Raises:
        ModelNotReadyError: (on enter) a model's built file is missing or fails to load.
        ServerUnavailableError: (on enter) the server exits or is not ready in time.
        TritonNotInstalledError: (on enter) the wheel's tritonserver is missing.
    """

    def __init__(self, settings: ServeSettings | None = None) -> None:
        self.settings = settings or ServeSettings.from_env()
        self.log_path: Path | None = None
        self._keep_log = False
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        """HTTP endpoint, ``localhost:<port>``."""
        return self.settings.http_url

    @property
    def grpc_url(self) -> str:
        """GRPC endpoint, ``localhost:<port>``."""
        return self.settings.grpc_url

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (its backend stubs are its children)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedTriton:
        """Start the server and block until every model is ready; see the class Raises."""
        missing = missing_model_files(self.settings)
        if missing:
            raise ModelNotReadyError(
                "not built: "
                + ", ".join(str(p) for p in missing)
                + "; run 'python -m build_engines export' and 'python -m build_engines quantize'"
            )
        install = find_triton()
        ensure_python_stub(install)
        command = server_command(install, self.settings)
        handle, log_name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(handle)
        self.log_path = Path(log_name)
        self._log_file = self.log_path.open("wb")
        logger.info("starting %s (log %s)", " ".join(command), self.log_path)
        self._keep_log = False
        self._process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=server_environment(),
            start_new_session=True,  # our Ctrl-C reaches it only through stop()
        )
        try:
            self._wait_ready()
        except BaseException:
            self._keep_log = True  # the error message points at it
            self.stop()
            raise
        logger.info(
            "tritonserver ready: HTTP %s, gRPC %s, metrics :%d, models %s",
            self.http_url,
            self.grpc_url,
            self.settings.metrics_port,
            ", ".join(self.settings.models),
        )
        return self

    def stop(self) -> None:
        """SIGTERM the server (it drains, unloads models and exits); SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, self.settings.exit_timeout_s + _KILL_GRACE_S, "tritonserver")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            if not self._keep_log:
                self.log_path.unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP the server and its backend stubs, as a hung server would (fault tests).

        Connections are still accepted by the kernel, and requests wait.
        """
        if self.running:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server: the requests that waited are served."""
        if self.running:
            os.killpg(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server and its backend stubs at once, as a crash would (fault tests)."""
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + self.settings.startup_timeout_s
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    raise self._startup_error(f"tritonserver exited with {code}")
                if _all_ready(client, self.settings.models):
                    return
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()
        raise ServerUnavailableError(
            f"tritonserver not ready after {self.settings.startup_timeout_s:.0f} s "
            f"(log {self.log_path}):\n{self.log_tail()}"
        )

    def _startup_error(self, reason: str) -> HemoTriageError:
        tail = self.log_tail()
        if "failed to load" in tail or "Poll failed for model" in tail:
            return ModelNotReadyError(f"{reason}; a model failed to load:\n{tail}")
        return ServerUnavailableError(f"{reason} (log {self.log_path}):\n{tail}")


def serve(settings: ServeSettings) -> int:
    """Run the embedded server until SIGINT or SIGTERM; return the exit status.

    Raises:
        HemoTriageError: the server cannot start (see :class:`EmbeddedTriton`).
    """
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping tritonserver", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedTriton(settings) as server:
            while not stop.wait(1.0):
                if not server.running:
                    logger.error("tritonserver exited unexpectedly:\n%s", server.log_tail())
                    return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _all_ready(client, models: tuple[str, ...]) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return client.is_server_ready() and all(client.is_model_ready(m) for m in models)
    except (InferenceServerException, ConnectionError, OSError):
        return False  # not listening yet: keep polling until the deadline


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that the OS reports free now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
