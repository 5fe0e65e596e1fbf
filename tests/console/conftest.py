import functools
import io
import re
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from benchmarks import stack
from benchmarks.phantoms import dicom_bytes as _dicom_bytes
from benchmarks.phantoms import phantom_series as _phantom_series
from benchmarks.postgres import Postgres
from build_engines.data import data_dir_from_env
from console import create_app
from console.auth import create_token, create_user
from console.db import connect
from console.services import EXTENSION_KEY
from tests.console import engines
from tests.console.engines import ON_POSTGRES, database_settings

REPO = Path(__file__).resolve().parents[2]
#: The calling AE title of the tests' scanner, and the node's default AE title.
SCANNER = "CTSCANNER"
NODE = "HEMOTRIAGE"
ADMIN = ("admin", "correct horse battery")
NURSE = ("nurse", "another long password")


def sqlite_only(why: str):
    """Skip a test about SQLite itself on the PostgreSQL run, saying why."""
    return pytest.mark.skipif(ON_POSTGRES, reason=f"SQLite only: {why}")


@pytest.fixture(scope="session", autouse=True)
def postgres_cluster():
    """On the PostgreSQL run, one cluster for the session; every console gets its own database."""
    if not ON_POSTGRES:
        yield None
        return
    with Postgres() as cluster:
        engines.CLUSTERS.append(cluster)
        yield cluster
        engines.CLUSTERS.clear()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir_from_env()
    if not (path / "kaggle_head_ct" / "head_ct").exists():
        pytest.skip(f"labelled data not found at {path} (set HEMOTRIAGE_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def kaggle_png(shared_data) -> Path:
    """A real hemorrhage slice (kaggle id 0, label 1)."""
    return shared_data / "kaggle_head_ct" / "head_ct" / "000.png"


@pytest.fixture(scope="session")
def normal_png(shared_data) -> Path:
    """A real normal slice (kaggle id 150, label 0)."""
    return shared_data / "kaggle_head_ct" / "head_ct" / "150.png"


@pytest.fixture(scope="session")
def cq500_series(shared_data) -> list[Path]:
    folder = shared_data / "cq500_ct1" / "series_thin_every8"
    if not folder.exists():
        pytest.skip(f"CQ500 series not found at {folder}")
    return sorted(folder.glob("*.dcm"))


def _zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def wait_for(predicate, timeout_s: float = 120.0, interval_s: float = 0.05) -> bool:
    """Poll an observable state (database rows, a server's report) until true or the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def make_app(storage: Path, **overrides):
    config = {
        "TESTING": True,
        "STORAGE_DIR": str(storage),
        "CLASSIFIER": "local",
        # The fp32 ONNX Runtime model these tests were written against (the Triton fixture
        # serves it); the default is the measured fastest variant (console/__init__.py).
        "MODEL_NAME": "mobilenet_v2",
        "WORKER_POLL_S": 0.05,
        "BACKOFF_INITIAL_S": 0.05,
        "BACKOFF_MAX_S": 0.4,
        "INBOX_POLL_S": 0.1,
        "INBOX_SETTLE_S": 0.0,
        "SSE_KEEPALIVE_S": 0.2,
        # The DICOM receiver stays off unless a test gives it a free port (11112 may be taken).
        "DICOM_PORT": 0,
        **database_settings(storage),
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def storage(tmp_path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def app(storage):
    app = make_app(storage)
    db = connect(app.config["DATABASE"])
    create_user(db, *ADMIN, role="admin")
    create_user(db, *NURSE)
    db.close()
    yield app
    app.extensions[EXTENSION_KEY].stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def services(app):
    return app.extensions[EXTENSION_KEY]


def csrf(client) -> str:
    """The session's CSRF token (created the way a page render creates it)."""
    page = client.get("/auth/login")
    match = re.search(r'name="csrf-token" content="([^"]+)"', page.get_data(as_text=True))
    return match.group(1)


class Auth:
    def __init__(self, client):
        self._client = client

    def login(self, username=ADMIN[0], password=ADMIN[1]):
        return self._client.post(
            "/auth/login",
            data={"username": username, "password": password, "csrf_token": csrf(self._client)},
        )

    def headers(self) -> dict:
        """Headers a logged-in page's fetch sends."""
        return {"X-CSRF-Token": csrf(self._client)}


@pytest.fixture
def auth(client):
    return Auth(client)


@pytest.fixture
def auth_for():
    """Log any test client in (or read its CSRF token)."""
    return Auth


@pytest.fixture
def logged_in_as(app):
    """A new browser session of ``username`` on ``app`` (default: the test app)."""

    def log_in(username: str, password: str, on=None):
        client = (on or app).test_client()
        assert Auth(client).login(username, password).status_code == 302
        return client

    return log_in


@pytest.fixture
def logged_in(client, auth):
    assert auth.login().status_code == 302
    return client


@pytest.fixture
def token(app) -> str:
    db = connect(app.config["DATABASE"])
    try:
        return create_token(db, ADMIN[0], "tests", scope="full", expires_days=1)
    finally:
        db.close()


@pytest.fixture
def api(app, token):
    """A machine client: Bearer token, no cookies, no CSRF."""
    client = app.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def api_client_of(app, token_for):
    """A machine client of ``app`` (another console than the test app), with an admin token."""
    client = app.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app)}"
    return client


def _upload(client, files: list[tuple[str, bytes]], **form):
    data = {"files": [(io.BytesIO(content), name) for name, content in files], **form}
    return client.post("/api/scans", data=data, content_type="multipart/form-data")


def _drain(services) -> int:
    """Run the worker synchronously until the queue is empty; return slices finished."""
    done = 0
    while (n := services.worker.run_once()) > 0:
        done += n
    return done


def rows_of(database: str, sql: str, *params) -> list:
    """One query's rows, on a connection of its own (a SQLite file or a PostgreSQL URL)."""
    db = connect(database)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture
def dicom_bytes():
    return _dicom_bytes


@pytest.fixture
def phantom_series():
    """New synthetic DICOM series, 256 px a side to keep the tests quick."""
    return functools.partial(_phantom_series, size=256)


@pytest.fixture
def zip_bytes():
    return _zip_bytes


@pytest.fixture
def upload():
    return _upload


@pytest.fixture
def drain():
    return _drain


@pytest.fixture
def db_rows(app):
    return lambda sql, *params: rows_of(app.config["DATABASE"], sql, *params)


@pytest.fixture
def app_factory():
    """Build further apps (a restarted console) on a storage folder; stopped at teardown."""
    made = []

    def build(storage: Path, **overrides):
        made.append(make_app(storage, **overrides))
        return made[-1]

    yield build
    for built in made:
        built.extensions[EXTENSION_KEY].stop()


@pytest.fixture
def token_for():
    """An admin API token for another app (the admin is created if missing)."""

    def issue(app) -> str:
        db = connect(app.config["DATABASE"])
        try:
            if db.execute("SELECT 1 FROM users WHERE username = ?", (ADMIN[0],)).fetchone() is None:
                create_user(db, *ADMIN, role="admin")
            return create_token(db, ADMIN[0], "tests", scope="full", expires_days=1)
        finally:
            db.close()

    return issue


class ConsoleServer(stack.ConsoleServer):
    """The shared launcher's console with the in-process classifier (no Triton) and ADMIN."""

    def __init__(self, storage: Path, **overrides: str) -> None:
        settings = {
            "CLASSIFIER": "local",
            "MODEL_NAME": "mobilenet_v2",  # as make_app
            "CONSOLE_THREADS": "8",
            **database_settings(storage),
            **overrides,
        }
        super().__init__(storage, settings, admin=ADMIN)


@pytest.fixture
def console_server(tmp_path):
    with ConsoleServer(tmp_path / "storage") as server:
        yield server


def associate(
    port: int,
    calling: str = SCANNER,
    called: str = NODE,
    contexts=((CTImageStorage, ExplicitVRLittleEndian), (Verification, ImplicitVRLittleEndian)),
    host: str = "127.0.0.1",
):
    """A real pynetdicom SCU association, as a scanner opens one."""
    scu = AE(ae_title=calling)
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 30
    for abstract, syntax in contexts:
        scu.add_requested_context(abstract, syntax)
    return scu.associate(host, port, ae_title=called)


def c_store(port: int, files: list[bytes], **kwargs) -> list:
    """C-STORE each Part 10 file as its dataset over one association; the status datasets."""
    assoc = associate(port, **kwargs)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))) for data in files]
    finally:
        assoc.release()
