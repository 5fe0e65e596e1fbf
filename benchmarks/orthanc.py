"""A real PACS for tests and benchmarks: Debian's Orthanc on free ports, in a folder of its own.

Orthanc runs as a child process with a generated JSON configuration (never the
system service): HTTP REST and DICOM on free loopback ports, its database and
files under ``folder``, no plugins, HemoTriage registered as the modality
``hemotriage`` so Orthanc can push series to it. ``make orthanc`` installs the
package (``apt-get install orthanc``).

    with Orthanc(tmp_path / "orthanc", node=("HEMOTRIAGE", 11112)) as pacs:
        pacs.upload(Path("slice.dcm").read_bytes())
        pacs.push_series(series_id)                # C-STORE to HemoTriage
        pacs.instances(study_uid)                  # what the PACS holds for a study
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from build_engines.serve import free_ports

#: Orthanc's own AE title, as HemoTriage's allow-list names it.
ORTHANC_AE = "ORTHANC"
#: The modality id under which HemoTriage is registered in Orthanc.
NODE_ID = "hemotriage"
_BINARY = "Orthanc"
_START_TIMEOUT_S = 60.0


class OrthancError(RuntimeError):
    """Orthanc is missing, did not start, or answered a REST call with an error."""


class Orthanc:
    """One Orthanc process; :meth:`stop` and :meth:`start` again keep its ports and files.

    Args:
        folder: Its configuration, database, stored files and log.
        node: HemoTriage's AE title and DICOM port (on 127.0.0.1); None: set it later
            with :meth:`register_node`, once the console has its port.
    """

    def __init__(self, folder: Path, node: tuple[str, int] | None = None) -> None:
        if shutil.which(_BINARY) is None:
            raise OrthancError("Orthanc is not installed: run 'make orthanc' (apt-get)")
        self.folder = folder
        self.http_port, self.dicom_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = folder / "orthanc.log"
        self._process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self._config = folder / "orthanc.json"
        self._config.write_text(json.dumps(self._configuration(node), indent=2))

    def _configuration(self, node: tuple[str, int] | None) -> dict:
        storage = str(self.folder / "storage")
        return {
            "Name": "HemoTriage test PACS",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {} if node is None else {NODE_ID: [node[0], "127.0.0.1", node[1]]},
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomScuTimeout": 30,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }

    def start(self) -> Orthanc:
        """Start it and wait until its REST API answers.

        Raises:
            OrthancError: it exited or did not answer within a minute (log tail included).
        """
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [_BINARY, str(self._config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                self.get("/system")
                return self
            except (OrthancError, OSError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Terminate it (the PACS is down until :meth:`start`)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)
        self._process = None

    def is_running(self) -> bool:
        """The process runs (started and not stopped)."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def get(self, path: str) -> dict | list:
        """GET a REST resource as JSON."""
        return self._call(urllib.request.Request(self.url + path))

    def post(self, path: str, body: dict | bytes) -> dict | list:
        """POST JSON (a dict) or raw bytes (a DICOM file); the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._call(urllib.request.Request(self.url + path, data=data, method="POST"))

    def _call(self, request: urllib.request.Request) -> dict | list:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body = response.read()
                return json.loads(body) if body else {}  # PUT answers with no body
        except urllib.error.HTTPError as e:
            raise OrthancError(f"{request.full_url}: {e.code} {e.read()[:500]!r}") from e

    def register_node(self, node: tuple[str, int]) -> None:
        """Point the ``hemotriage`` modality at another AE title and port (until a restart)."""
        body = {"AET": node[0], "Host": "127.0.0.1", "Port": node[1]}
        request = urllib.request.Request(
            f"{self.url}/modalities/{NODE_ID}", data=json.dumps(body).encode(), method="PUT"
        )
        self._call(request)

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file in Orthanc; its ``ID``, ``ParentSeries``, ``ParentStudy``."""
        return self.post("/instances", data)

    def push(self, resources: list[str], local_ae: str = ORTHANC_AE) -> dict:
        """C-STORE Orthanc resources (series ids) to HemoTriage and wait for the job.

        Args:
            resources: Orthanc ids of series, studies or instances.
            local_ae: The calling AE title Orthanc uses.

        Raises:
            OrthancError: the job failed (HemoTriage refused the association or an instance).
        """
        return self.post(
            f"/modalities/{NODE_ID}/store",
            {"Resources": resources, "Synchronous": True, "LocalAet": local_ae},
        )

    def instances(self, study_uid: str) -> list[dict]:
        """Every instance Orthanc holds for a study: ``ID`` and ``MainDicomTags``."""
        return self.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )

    def has_instance(self, sop_uid: str) -> bool:
        """Whether Orthanc stores an instance with this SOP Instance UID."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
        )
        return bool(found)

    def file(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        request = urllib.request.Request(f"{self.url}/instances/{instance_id}/file")
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
