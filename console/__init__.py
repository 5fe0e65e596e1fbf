"""The Flask triage console: upload, queue, worklist, alerts, study view.

Configuration: the defaults below, then ``HEMOTRIAGE_*`` environment variables
(``HEMOTRIAGE_TRITON_URL=triton:8001``; values are parsed as JSON when they
can be, so ``HEMOTRIAGE_BATCH_SIZE=8`` is a number), then ``test_config``.

    python -m console init-db && python -m console create-admin
    gunicorn -c console/gunicorn.conf.py          # starts the worker thread once
    # or, in-process classifier, no Triton:
    HEMOTRIAGE_CLASSIFIER=local gunicorn -c console/gunicorn.conf.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import RequestEntityTooLarge

from client.constants import DEFAULT_DICOM_PORT, DEFAULT_GRPC_PORT, REPO_ROOT
from client.errors import HemoTriageError
from client.registry import get_model, parse_series_threshold
from client.triton_client import PROTOCOLS
from console.errors import STORAGE_ERRORS, storage_error
from console.shadow import parse_shadow_mode

logger = logging.getLogger(__name__)

#: Documented defaults; every key can be overridden as ``HEMOTRIAGE_<KEY>``.
DEFAULTS = {
    # Where uploads, the database, the inbox and the session key live (default: instance/).
    "STORAGE_DIR": None,
    # SQLite file (default: <STORAGE_DIR>/hemotriage.sqlite), used unless DATABASE_URL is set.
    "DATABASE": None,
    # PostgreSQL instead, "postgresql://user:password@host:5432/name": the one database of
    # several console nodes (queue, leases and live events shared). Empty: the SQLite file.
    "DATABASE_URL": "",
    # PostgreSQL connections request handlers may hold at once (one per gunicorn thread).
    "DATABASE_POOL_SIZE": 32,
    # This node's name on its queue claims (PostgreSQL): at start it takes back only its own
    # unfinished claims (and expired ones of any node). Default: the host name; set a stable
    # one where containers come back under new names.
    "NODE_ID": None,
    # How long a write waits for another writer before the request gets a 503.
    "DATABASE_BUSY_TIMEOUT_S": 10.0,
    # Watched folder (default: <STORAGE_DIR>/inbox); set to "" to disable the watcher.
    "INBOX_DIR": None,
    "INBOX_POLL_S": 2.0,
    "INBOX_SETTLE_S": 2.0,
    # DICOM receiver (console/dicom_node.py): CT by C-STORE from scanners and PACS routers.
    # DICOM_PORT 0 or "" turns it off. It listens on 127.0.0.1 only: a deployer whose
    # scanners reach it over the network sets DICOM_BIND=0.0.0.0 (or the host's address).
    "DICOM_AE_TITLE": "HEMOTRIAGE",
    "DICOM_BIND": "127.0.0.1",
    "DICOM_PORT": DEFAULT_DICOM_PORT,
    # Calling AE titles allowed to send, comma-separated ("CTSCANNER,PACSROUTER"); others are
    # rejected at association. Empty: only senders on this host's loopback, never the network.
    "DICOM_ALLOWED_AES": "",
    # A series is complete when no instance of it arrived for this long (as gateways do).
    "DICOM_QUIET_S": 10.0,
    # Where results go back, "AE@host:port" (checked at start); empty: results are not sent.
    # Each completed series' SR and Grad-CAM secondary capture wait in the outbox (SQLite)
    # until the PACS stores them: retried after RESULTS_BACKOFF_INITIAL_S, doubling up to
    # RESULTS_BACKOFF_MAX_S; RESULTS_TIMEOUT_S bounds connecting and each C-STORE.
    "RESULTS_DESTINATION": "",
    # Shadow mode, for a site's validation period (console/shadow.py): classify and record
    # everything, but raise no alert, give flags no worklist boost, send nothing outward
    # (results to PACS included) and show results to admins only. Every page says so.
    "SHADOW_MODE": False,
    "RESULTS_BACKOFF_INITIAL_S": 2.0,
    "RESULTS_BACKOFF_MAX_S": 300.0,
    "RESULTS_TIMEOUT_S": 30.0,
    # Session signing key (default: random, kept in <STORAGE_DIR>/secret_key with mode 0600).
    "SECRET_KEY": None,
    # "triton" (TRITON_URL + TRITON_PROTOCOL) or "local" (in-process PyTorch). TRITON_URL may
    # list several servers, comma-separated: requests are spread over those that are ready
    # (client/triton_pool.py; /readyz and /metrics show each one).
    "CLASSIFIER": "triton",
    "TRITON_URL": f"localhost:{DEFAULT_GRPC_PORT}",
    "TRITON_PROTOCOL": "grpc",
    "TRITON_TIMEOUT_S": 30.0,
    # The fastest CPU variant of mobilenet_v2 within 0.01 ROC-AUC of fp32 whose ct_ich_dev
    # series decisions are no worse, as measured (build_engines.variants.fastest_within on
    # build_engines/reports/mobilenet_v2/variants.json, the model card's table; a test keeps
    # the two equal; re-measured whenever the weights change). A GPU server sets
    # mobilenet_v2 (the TensorRT plan) instead.
    "MODEL_NAME": "mobilenet_v2_openvino_int8",
    # How a series is decided (client.series.decide_series): empty for the rule chosen by
    # nested cross-validation and recorded with the weights; a site that validated another
    # of the model's recorded rules on its own series (neighbour_pair, max_slice,
    # series_model) may set it. series_model needs <base>_series on the Triton server.
    "SERIES_RULE": "",
    # The series threshold on the rule's score: empty for the recorded one; a site that
    # checked its own reviewed series on the Accuracy page ("Series operating point on this
    # site") may set the threshold it validated there, a number in (0, 1].
    "SERIES_THRESHOLD": "",
    # Queue worker: slices per predict call, idle poll, backoff while Triton is down.
    "BATCH_SIZE": 16,
    # Threads that decode and preprocess a batch (while Triton computes the one before).
    "PREPARE_THREADS": 2,
    "WORKER_POLL_S": 1.0,
    "BACKOFF_INITIAL_S": 0.5,
    "BACKOFF_MAX_S": 30.0,
    # Tries a slice gets when inference fails with the server there (timeouts, error
    # answers, a full disk...); then it is failed with the reason. A server that is
    # down uses no attempts: the queue waits for it.
    "MAX_INFERENCE_ATTEMPTS": 5,
    # A claimed batch not finished within CLAIM_LEASE_S goes back to the queue
    # (checked every LEASE_CHECK_S); well above TRITON_TIMEOUT_S times its retries.
    "CLAIM_LEASE_S": 300.0,
    "LEASE_CHECK_S": 10.0,
    # Worklist order (see console/priority.py).
    "PRIORITY_WEIGHT_FLAGGED": 1000.0,
    "PRIORITY_WEIGHT_FAILED": 500.0,
    "PRIORITY_WEIGHT_SCORE": 100.0,
    "PRIORITY_WEIGHT_WAIT_PER_MIN": 1.0,
    # Upload limits: whole request, files per upload (zip entries included), and the
    # uncompressed bytes all the zips of one upload may expand to together.
    "MAX_CONTENT_LENGTH": 512 * 1024 * 1024,
    "MAX_UPLOAD_FILES": 1000,
    "MAX_ZIP_UNCOMPRESSED_BYTES": 1024 * 1024 * 1024,
    "SSE_KEEPALIVE_S": 15.0,
    # Live screens at once; each holds a gunicorn thread (CONSOLE_THREADS, 32), so the
    # rest stay free for uploads, /healthz and pages. Past it /api/stream answers 503.
    "MAX_STREAMS": 16,
    # Benchmark reports and plots shown on /latency (default: <repo>/benchmarks/results).
    "RESULTS_DIR": None,
    # Session cookie: HttpOnly, SameSite=Lax, Secure (browsers allow it on http://localhost).
    "SESSION_COOKIE_NAME": "hemotriage_session",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_SECURE": True,
    "PERMANENT_SESSION_LIFETIME": timedelta(hours=12),
    # Login throttling (console/auth.py): after LOGIN_MAX_FAILURES wrong passwords for one
    # username within LOGIN_WINDOW_S, refuse it until LOGIN_LOCKOUT_S after the last one.
    "LOGIN_MAX_FAILURES": 5,
    "LOGIN_WINDOW_S": 300.0,
    "LOGIN_LOCKOUT_S": 60.0,
    # ... and after LOGIN_MAX_FAILURES_PER_ADDRESS from one client address, for any usernames.
    "LOGIN_MAX_FAILURES_PER_ADDRESS": 20,
    # Behind a reverse proxy: how many proxies to trust for X-Forwarded-For/-Proto (Werkzeug's
    # ProxyFix). 0 (default): the client address is the TCP peer and the headers are ignored,
    # since anyone can send them; set it to 1 behind one proxy, or throttling sees only the proxy.
    "TRUSTED_PROXY_HOPS": 0,
    # Body limit of every request but POST /api/scans (login, acknowledge, logout): 64 KiB.
    "MAX_FORM_BYTES": 64 * 1024,
    # Days a new API token is valid (python -m console create-token --expires-days).
    "TOKEN_EXPIRES_DAYS": 365,
    # Days stored slice files are kept after their study finished (python -m console purge).
    "RETENTION_DAYS": 30,
}


def create_app(test_config: dict | None = None) -> Flask:
    """Build the console app: config, database, blueprints, error handlers, services.

    Args:
        test_config: Overrides applied last (tests point ``STORAGE_DIR`` at tmp_path).

    Returns:
        The app; its background threads are not started (see
        :meth:`console.services.Services.start`, called by gunicorn's hook).

    Raises:
        ValueError: an invalid setting (classifier kind, protocol, a ``DICOM_*`` value,
            ``RESULTS_DESTINATION``, ``SHADOW_MODE``).
        UnknownModelError: ``MODEL_NAME`` is not registered.
    """
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("HEMOTRIAGE")
    if test_config is not None:
        app.config.from_mapping(test_config)
    _resolve_paths(app)

    from console import (
        alerts,
        api,
        auth,
        db,
        feedback,
        latency,
        ops,
        retention,
        security,
        shadow,
        worklist,
    )
    from console.services import EXTENSION_KEY, Services

    db.init_app(app)
    auth.init_app(app)
    security.init_app(app)
    retention.init_app(app)
    shadow.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(worklist.bp)
    app.register_blueprint(alerts.bp)
    app.register_blueprint(feedback.bp)
    app.register_blueprint(latency.bp)
    app.register_blueprint(ops.bp)
    app.after_request(ops.count_request)
    app.register_error_handler(HemoTriageError, _typed_error)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    for error_class in STORAGE_ERRORS:
        app.register_error_handler(error_class, _storage_failure)
    app.extensions[EXTENSION_KEY] = Services.from_app(app)
    db.init_db(app.config["DATABASE"])
    return app


def _resolve_paths(app: Flask) -> None:
    """Fill the path defaults, check the choices, and load or create the session key."""
    config = app.config
    if config["CLASSIFIER"] not in ("triton", "local"):
        raise ValueError(
            f"HEMOTRIAGE_CLASSIFIER must be triton or local, not {config['CLASSIFIER']!r}"
        )
    if config["TRITON_PROTOCOL"] not in PROTOCOLS:
        raise ValueError(f"HEMOTRIAGE_TRITON_PROTOCOL must be one of {PROTOCOLS}")
    try:
        config["SERIES_THRESHOLD"] = parse_series_threshold(config["SERIES_THRESHOLD"])
    except ValueError as e:
        raise ValueError(f"HEMOTRIAGE_SERIES_THRESHOLD: {e}") from None
    get_model(config["MODEL_NAME"], config["SERIES_RULE"], config["SERIES_THRESHOLD"])
    config["SHADOW_MODE"] = parse_shadow_mode(config["SHADOW_MODE"])
    storage_dir = Path(config["STORAGE_DIR"] or app.instance_path)
    storage_dir.mkdir(parents=True, exist_ok=True)
    config["STORAGE_DIR"] = str(storage_dir)
    # DATABASE is what console.db.connect opens: the PostgreSQL URL or the SQLite file.
    config["DATABASE"] = str(
        config["DATABASE_URL"] or config["DATABASE"] or storage_dir / "hemotriage.sqlite"
    )
    config["NODE_ID"] = str(config["NODE_ID"] or socket.gethostname())
    results_dir = config["RESULTS_DIR"] or REPO_ROOT / "benchmarks" / "results"
    config["RESULTS_DIR"] = str(Path(results_dir).resolve())
    if config["INBOX_DIR"] is None:
        config["INBOX_DIR"] = str(storage_dir / "inbox")
    # Flask's multipart parser refuses more parts than this; one part per file plus fields.
    config["MAX_FORM_PARTS"] = max(config["MAX_FORM_PARTS"], int(config["MAX_UPLOAD_FILES"]) + 16)
    if not config["SECRET_KEY"]:
        config["SECRET_KEY"] = _session_key(storage_dir / "secret_key")


def _session_key(path: Path) -> str:
    """A random key kept in the data folder, so sessions survive restarts; never in git.

    Console nodes sharing the folder start together: the key is written to a
    file of its own and linked into place, which only the first node manages,
    so every node reads one complete key.
    """
    if path.exists():
        return path.read_text().strip()
    descriptor, draft = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
    try:
        with os.fdopen(descriptor, "w") as out:  # mkstemp makes it 0600
            out.write(secrets.token_hex(32))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
    finally:
        os.unlink(draft)
    return path.read_text().strip()


def _typed_error(error: HemoTriageError):
    """One handler for every typed error: its class name, message and HTTP status."""
    # The message may name the uploaded file; log the class only (file names can carry PHI).
    logger.warning("request refused: %s (%d)", type(error).__name__, error.http_status)
    return jsonify(error=type(error).__name__, message=str(error)), error.http_status


def _storage_failure(error: Exception):
    """A locked, full or unreachable database in any request: a typed 503/507, not an HTML 500.

    Any other database error is a bug in the SQL, and stays a 500.
    """
    typed = storage_error(error, Path(current_app.config["STORAGE_DIR"]))
    if typed is None:
        raise error
    return _typed_error(typed)


def _too_large(error: RequestEntityTooLarge):
    """The request body exceeded ``MAX_CONTENT_LENGTH`` (or a form limit)."""
    return jsonify(error="RequestTooLargeError", message=error.description), 413
