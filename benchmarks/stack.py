"""One launcher for the whole stack: the embedded Triton and the console, on free ports.

The load test, the benchmarks and the test fixtures start the stack the same
way. Triton is :class:`build_engines.serve.EmbeddedTriton`; the console runs as
it does in production, gunicorn with ``console/gunicorn.conf.py`` in a
subprocess, and its account and token come from its own CLI (``python -m
console``), so nothing here imports ``console/``. Every port is taken free at
start, so a run sits beside ``make demo``, the test suite and other runs.

    with ConsoleStack(StackSettings(models=("mobilenet_v2",))) as stack:
        ConsoleApi(stack.url, stack.token).upload(files, None)

    with ConsoleServer(tmp_path / "storage", {"CLASSIFIER": "local"}) as server:
        token = server.token()                     # the console alone, PyTorch in-process
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from build_engines.serve import (
    EmbeddedTriton,
    ServeSettings,
    free_ports,
    terminate,
    with_series_models,
)
from client.constants import ENV_PREFIX, REPO_ROOT
from client.errors import ServerUnavailableError

logger = logging.getLogger(__name__)

#: Seconds between progress lines while a server starts.
_PROGRESS_S = 10.0
_POLL_INTERVAL_S = 0.3
#: Seconds gunicorn gets to finish the current batch after SIGTERM before SIGKILL.
_STOP_TIMEOUT_S = 60.0
_LOG_TAIL_LINES = 30


def triton_on_free_ports(
    models: tuple[str, ...] | None = None, repository: Path | None = None
) -> EmbeddedTriton:
    """The embedded Triton (not started) for ``models`` (default all) on three free ports.

    From the model repository, with the series models their rules decide with
    (:func:`with_series_models`), so a client of each model finds everything it
    needs; a ``repository`` of the caller's serves ``models`` as given.
    ``HEMOTRIAGE_*`` variables set the rest (:meth:`ServeSettings.from_env`).
    """
    if models and repository is None:
        models = with_series_models(models)
    settings = ServeSettings.from_env(models=models, repository=repository)
    return EmbeddedTriton(settings.with_free_ports())


def wait_until_ready(
    name: str,
    url: str,
    process: subprocess.Popen,
    timeout_s: float,
    log_tail: Callable[[], str],
) -> None:
    """Poll ``url`` until it answers 200, with a progress line now and then.

    Args:
        name: What starts, for messages.
        url: Its readiness URL (a 503 counts as not yet).
        process: The server process; its exit ends the wait.
        timeout_s: Longest wait.
        log_tail: The end of the server's log, for the error message.

    Raises:
        ServerUnavailableError: ``process`` exited, or ``url`` did not answer in time.
    """
    start = time.monotonic()
    next_note = start + _PROGRESS_S
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise ServerUnavailableError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    logger.info("%s ready at %s", name, url)
                    return
        except OSError as e:  # refused, timed out, or an HTTPError such as 503
            if time.monotonic() > next_note:
                logger.info("waiting for %s at %s (%s)", name, url, e)
                next_note += _PROGRESS_S
        time.sleep(_POLL_INTERVAL_S)
    raise ServerUnavailableError(
        f"{name} not ready at {url} after {timeout_s:.0f} s:\n{log_tail()}"
    )


class ConsoleServer:
    """The console under gunicorn on free HTTP and DICOM ports, ready (``/readyz``) on start.

    Args:
        storage: Its storage folder (images and the SQLite database); gunicorn's
            log goes beside it, appended to across restarts on the same storage.
        overrides: ``HEMOTRIAGE_<KEY>`` values, keyed without the prefix (``CLASSIFIER``).
            Other ``HEMOTRIAGE_*`` variables of this environment reach the console too.
        admin: Username and password of the administrator created at start
            (if missing); a ``bench`` user with a random password by default.
        ready_timeout_s: Longest wait for ``/readyz``.

    Attributes:
        url: Base URL, ``http://127.0.0.1:<port>``.
        port: HTTP port.
        dicom_port: The DICOM receiver's port.
        database: The SQLite file (unless ``overrides`` give a ``DATABASE_URL``).
        log: gunicorn's log file.
        env: The environment gunicorn and the console CLI run with.
        process: The gunicorn master, once started.

    Raises:
        RuntimeError: (on start) the console CLI fails.
        ServerUnavailableError: (on start) gunicorn exits or is not ready in time.
    """

    def __init__(
        self,
        storage: Path,
        overrides: Mapping[str, str] | None = None,
        admin: tuple[str, str] | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.port, self.dicom_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.database = storage / "hemotriage.sqlite"
        self.log = storage.parent / "gunicorn.log"
        self.admin = admin or ("bench", secrets.token_urlsafe(16))
        settings = {
            "STORAGE_DIR": str(storage),
            "DATABASE": str(self.database),
            # The SQLite file above, whatever this environment says: the load test and the
            # benchmarks audit that file (pass DATABASE_URL in overrides for PostgreSQL).
            "DATABASE_URL": "",
            "CONSOLE_BIND": f"127.0.0.1:{self.port}",
            "DICOM_PORT": str(self.dicom_port),
            "ADMIN_PASSWORD": self.admin[1],
            **(overrides or {}),
        }
        self.env = {**os.environ, **{ENV_PREFIX + k: v for k, v in settings.items()}}
        self.process: subprocess.Popen | None = None
        self._ready_timeout_s = ready_timeout_s
        self._log_file = None

    def start(self) -> ConsoleServer:
        """Create the administrator if missing, start gunicorn, wait until it is ready."""
        self._cli("create-admin", "--username", self.admin[0], "--if-missing")
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "console/gunicorn.conf.py"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # kill() takes the master and its worker together
        )
        try:
            wait_until_ready(
                "console", self.url + "/readyz", self.process, self._ready_timeout_s, self._log_tail
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM gunicorn (it lets the current batch finish); SIGKILL if it hangs."""
        if self.process is not None:
            terminate(self.process, _STOP_TIMEOUT_S, "gunicorn")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL gunicorn's master and worker at once, as a power cut or OOM kill would."""
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=_STOP_TIMEOUT_S)

    def token(self, name: str = "benchmark") -> str:
        """A new full-scope API token of the administrator (it reads the stream too)."""
        output = self._cli(
            "create-token", "--username", self.admin[0], "--name", name, "--scope", "full"
        )
        return output.split()[-1]

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _cli(self, *args: str) -> str:
        """Run ``python -m console ...`` on this console's storage; return its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "console", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"python -m console {args[0]} failed:\n{result.stderr}")
        return result.stdout

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])


@dataclass(frozen=True)
class StackSettings:
    """What a stack serves.

    Attributes:
        models: Models Triton loads; the first is the console's ``MODEL_NAME``.
        ready_timeout_s: Longest wait for the console's ``/readyz``.
    """

    models: tuple[str, ...] = ("mobilenet_v2",)
    ready_timeout_s: float = 120.0


class ConsoleStack:
    """Embedded Triton plus the console under gunicorn, on a temporary storage folder.

    ``HEMOTRIAGE_*`` variables in the environment reach the console (for example
    ``HEMOTRIAGE_BATCH_SIZE=32``), except the ones this class sets: storage,
    database, ports, Triton URL and protocol, and the model.

    Attributes:
        url: The console's base URL.
        token: A full-scope API token of the ``bench`` administrator.
        database: The console's SQLite file.
        triton_grpc_url: ``localhost:<port>`` of Triton's gRPC endpoint.
        dicom_port: The console's DICOM receiver on 127.0.0.1.
        log_path: gunicorn's log (deleted with the storage folder on exit).

    Raises:
        HemoTriageError: (on enter) Triton or the console does not start or become ready.
        RuntimeError: (on enter) the console CLI fails.
    """

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.url = ""
        self.token = ""
        self.database = Path()
        self.triton_grpc_url = ""
        self.dicom_port = 0
        self.log_path = Path()
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> ConsoleStack:
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._exit.close()

    def _start(self) -> None:
        s = self.settings
        root = Path(self._exit.enter_context(tempfile.TemporaryDirectory(prefix="hemotriage-")))
        triton = self._exit.enter_context(triton_on_free_ports(s.models))
        self.triton_grpc_url = triton.grpc_url
        console = ConsoleServer(
            root / "storage",
            {"TRITON_URL": triton.grpc_url, "TRITON_PROTOCOL": "grpc", "MODEL_NAME": s.models[0]},
            ready_timeout_s=s.ready_timeout_s,
        )
        self._exit.enter_context(console)
        self.url, self.database, self.log_path = console.url, console.database, console.log
        self.dicom_port = console.dicom_port
        self.token = console.token()
