"""Who is asking: session login for people, Bearer API tokens for machines.

Every request except ``/healthz``, ``/readyz``, ``/metrics``, the login page
and static files needs an identity. Pages redirect to the login form; ``/api``
answers 401 JSON. Passwords are hashed with :mod:`werkzeug.security`; API
tokens are random and stored only as their SHA-256. Failed logins are audited,
and a username with too many of them is throttled for a minute (429).

    python -m console create-admin --username admin      # prompts for the password
    python -m console create-token --username admin --name pacs-bridge
    curl -H "Authorization: Bearer ht_..." -F files=@slice.dcm http://localhost:5000/api/scans
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import time
from urllib.parse import urlsplit

import click
from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.cli import with_appcontext
from werkzeug.security import check_password_hash, generate_password_hash

from console.db import audit, connect, get_db
from console.errors import AuthenticationError

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__, url_prefix="/auth")

#: Endpoints anyone may reach: probes, metrics, the login form and static files.
PUBLIC_ENDPOINTS = frozenset({"auth.login", "static", "ops.healthz", "ops.readyz", "ops.metrics"})
#: Shortest password ``create-admin`` accepts.
MIN_PASSWORD_CHARS = 10
#: Longest username kept from a login form (the audit log records failed attempts).
MAX_USERNAME_CHARS = 150
_TOKEN_PREFIX = "ht_"


def hash_token(token: str) -> str:
    """The stored form of an API token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(db, username: str, password: str, is_admin: bool = False) -> int:
    """Insert a user with a hashed password; return the id.

    Raises:
        ValueError: an empty username, a short password, or a taken username.
    """
    username = username.strip()
    if not username or len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"username required, password at least {MIN_PASSWORD_CHARS} characters")
    if db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
        raise ValueError(f"user {username!r} exists already")
    with db:
        row = db.execute(
            "INSERT INTO users (username, password_hash, is_admin, created_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (username, generate_password_hash(password), int(is_admin), time.time()),
        ).fetchone()
        audit(db, username, "user-created", detail="admin" if is_admin else "")
    return row["id"]


def create_token(db, username: str, name: str) -> str:
    """Issue an API token for ``username``; the token is shown once and stored hashed.

    Raises:
        ValueError: no such user.
    """
    user = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
    if user is None:
        raise ValueError(f"no user {username!r}")
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db:
        db.execute(
            "INSERT INTO api_tokens (user_id, name, token_sha256, created_at) VALUES (?, ?, ?, ?)",
            (user["id"], name, hash_token(token), time.time()),
        )
        audit(db, username, "token-created", detail=name)
    return token


@bp.before_app_request
def load_identity() -> None:
    """Set ``g.user`` (a users row or None) and ``g.via`` (``session`` or ``token``)."""
    g.user, g.via = None, None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        db = get_db()
        token = db.execute(
            "SELECT user_id, id FROM api_tokens WHERE token_sha256 = ? AND revoked_at IS NULL",
            (hash_token(header.removeprefix("Bearer ").strip()),),
        ).fetchone()
        if token is None:
            raise AuthenticationError("invalid or revoked API token")
        with db:
            db.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (time.time(), token["id"])
            )
        g.user = db.execute("SELECT * FROM users WHERE id = ?", (token["user_id"],)).fetchone()
        g.via = "token"
    elif "user_id" in session:
        g.user = (
            get_db().execute("SELECT * FROM users WHERE id = ?", (session["user_id"],)).fetchone()
        )
        g.via = "session" if g.user is not None else None


@bp.before_app_request
def require_login():
    """Refuse anonymous requests outside :data:`PUBLIC_ENDPOINTS`."""
    if g.user is not None or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if request.path.startswith("/api/") or request.endpoint is None:
        raise AuthenticationError("log in or send 'Authorization: Bearer <token>'")
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def admin_required(view):
    """Only administrators may use ``view``."""

    @functools.wraps(view)
    def wrapped(**kwargs):
        if not g.user["is_admin"]:
            raise AuthenticationError("administrators only")
        return view(**kwargs)

    return wrapped


@bp.route("/login", methods=("GET", "POST"))
def login():
    """The login form; on success, a fresh session and a redirect to ``next``."""
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:MAX_USERNAME_CHARS]
        password = request.form.get("password", "")
        db = get_db()
        wait_s = seconds_until_login_allowed(db, username)
        if wait_s > 0:
            with db:
                audit(db, username, "login-throttled")
            logger.warning("login refused: too many failed attempts for one username")
            flash(f"Too many failed logins for this user. Try again in {math.ceil(wait_s)} s.")
            return render_template("auth/login.html"), 429
        user = db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        if user is not None and check_password_hash(user["password_hash"], password):
            session.clear()  # a new session id on login: no session fixation
            session["user_id"] = user["id"]
            session.permanent = True
            with db:
                audit(db, user["username"], "login")
            logger.info("user %d logged in", user["id"])
            return redirect(_safe_next(request.args.get("next")))
        with db:
            audit(db, username, "login-failed")
        flash("Wrong username or password.")
        return render_template("auth/login.html"), 401
    return render_template("auth/login.html")


def seconds_until_login_allowed(db, username: str) -> float:
    """How long ``username`` must wait before the next login attempt (0: now).

    Counts ``login-failed`` rows of the audit log since the user's last
    successful login: with ``LOGIN_MAX_FAILURES`` of them inside
    ``LOGIN_WINDOW_S``, attempts are refused until ``LOGIN_LOCKOUT_S`` after the
    latest. The lockout is short on purpose: a clinician locked out of the
    worklist is a hazard of its own, and a handful of guesses a minute is
    already hopeless against a 10-character password. Refused attempts are
    audited as ``login-throttled`` and do not extend the lockout.
    """
    config = current_app.config
    now = time.time()
    failures = db.execute(
        "SELECT MAX(at) AS latest, COUNT(*) AS n FROM audit_log"
        " WHERE username = ? AND action = 'login-failed' AND at > ? AND id > COALESCE("
        "  (SELECT MAX(id) FROM audit_log WHERE username = ? AND action = 'login'), 0)",
        (username, now - float(config["LOGIN_WINDOW_S"]), username),
    ).fetchone()
    if failures["n"] < int(config["LOGIN_MAX_FAILURES"]):
        return 0.0
    return max(0.0, failures["latest"] + float(config["LOGIN_LOCKOUT_S"]) - now)


@bp.route("/logout", methods=("POST",))
def logout():
    """End the session."""
    with get_db() as db:
        audit(db, g.user["username"], "logout")
    session.clear()
    return redirect(url_for("auth.login"))


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: ``//evil.example`` and absolute URLs go home."""
    if target and target.startswith("/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("worklist.index")


@click.command("create-admin")
@with_appcontext
@click.option("--username", default="admin", show_default=True)
@click.option(
    "--password",
    envvar="HEMOTRIAGE_ADMIN_PASSWORD",
    help="Prompted for when not given (or set HEMOTRIAGE_ADMIN_PASSWORD).",
)
@click.option("--generate-password", is_flag=True, help="Generate one and print it once.")
@click.option("--if-missing", is_flag=True, help="Succeed without change if the user exists.")
def create_admin_command(
    username: str, password: str | None, generate_password: bool, if_missing: bool
) -> None:
    """Create an administrator account (creates the tables first if needed)."""
    from console.db import init_db

    init_db(current_app.config["DATABASE"])
    db = connect(current_app.config["DATABASE"])
    try:
        if (
            if_missing
            and db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        ):
            click.echo(f"administrator {username!r} exists; log in with its password")
            return
        if generate_password:
            password = secrets.token_urlsafe(12)
        elif password is None:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        create_user(db, username, password, is_admin=True)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    finally:
        db.close()
    shown = f" with password {password}" if generate_password else ""
    click.echo(f"created administrator {username!r}{shown}")


@click.command("create-token")
@with_appcontext
@click.option("--username", required=True)
@click.option("--name", required=True, help="What the token is for, e.g. pacs-bridge.")
def create_token_command(username: str, name: str) -> None:
    """Issue an API token (printed once) for a machine client."""
    db = connect(current_app.config["DATABASE"])
    try:
        token = create_token(db, username, name)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    finally:
        db.close()
    click.echo(token)


def init_app(app) -> None:
    """Register the blueprint and the ``create-admin``/``create-token`` commands."""
    app.register_blueprint(bp)
    app.cli.add_command(create_admin_command)
    app.cli.add_command(create_token_command)
