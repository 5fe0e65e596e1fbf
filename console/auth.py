"""Who is asking and what they may do: session login for people, Bearer API tokens for machines.

Every request except ``/healthz``, ``/readyz``, ``/metrics``, the login page
and static files needs an identity. Pages redirect to the login form; ``/api``
answers 401 JSON. Passwords are hashed with :mod:`werkzeug.security`; API
tokens are random, stored only as their SHA-256, and expire.

Three kinds of principal (:data:`ROLES`, least privileged first):

- ``uploader``: an API token of scope ``upload`` (a scanner, a PACS bridge). It
  may only ``POST /api/scans``; everything else answers 403.
- ``clinician``: the worklist, study pages, slice images, acknowledging, uploads.
- ``admin``: all of that plus the audit log (users and tokens are managed with
  the commands below, on the server).

A token of scope ``full`` acts with its user's role (a screen, the load test).
Views need ``clinician`` unless :func:`role_required` says otherwise, so an
upload-only token is refused everywhere not opened to it on purpose.

Failed logins are audited; too many for one username, or from one client
address, are throttled (429). The check and the recording happen in one write
transaction, so parallel guesses cannot all pass the check first.

    python -m console create-admin --username admin      # prompts for the password
    python -m console create-user --username nurse --role clinician
    python -m console create-token --username admin --name pacs-bridge   # upload-only, 365 days
    python -m console revoke-token --name pacs-bridge
    curl -H "Authorization: Bearer ht_..." -F files=@slice.dcm http://localhost:5000/api/scans
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
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

from console.db import Connection, Row, audit, begin_write, connect, get_db, init_db
from console.errors import AuthenticationError, ForbiddenError

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__, url_prefix="/auth")

#: Endpoints anyone may reach: probes, metrics, the login form and static files.
PUBLIC_ENDPOINTS = frozenset({"auth.login", "static", "ops.healthz", "ops.readyz", "ops.metrics"})
#: Shortest password ``create-admin`` accepts.
MIN_PASSWORD_CHARS = 10
#: Longest username kept from a login form (the audit log records failed attempts).
MAX_USERNAME_CHARS = 150
_TOKEN_PREFIX = "ht_"
#: Principals, least privileged first; each may do what those before it may.
ROLES = ("uploader", "clinician", "admin")
#: Roles a user account can have (``uploader`` is a token scope, never a person).
USER_ROLES = ("clinician", "admin")
#: ``upload``: POST /api/scans only. ``full``: whatever the token's user may do.
TOKEN_SCOPES = ("upload", "full")
#: What a view needs unless :func:`role_required` marks it: closed to upload-only tokens.
DEFAULT_ROLE = "clinician"


def hash_token(token: str) -> str:
    """The stored form of an API token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(db, username: str, password: str, role: str = "clinician") -> int:
    """Insert a user with a hashed password; return the id.

    Raises:
        ValueError: an empty username, a short password, a taken username or an unknown role.
    """
    username = username.strip()
    if not username or len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"username required, password at least {MIN_PASSWORD_CHARS} characters")
    if role not in USER_ROLES:
        raise ValueError(f"role must be one of {', '.join(USER_ROLES)}, not {role!r}")
    if db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
        raise ValueError(f"user {username!r} exists already")
    with db:
        row = db.execute(
            "INSERT INTO users (username, password_hash, role, created_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (username, generate_password_hash(password), role, time.time()),
        ).fetchone()
        audit(db, username, "user-created", detail=role)
    return row["id"]


def create_token(db, username: str, name: str, *, scope: str, expires_days: float) -> str:
    """Issue an API token for ``username``; the token is shown once and stored hashed.

    Args:
        db: A connection.
        username: The user the token acts for (``full`` scope) and is audited under.
        name: What the token is for (``pacs-bridge``); uploads are audited with it.
        scope: ``upload`` (POST /api/scans only) or ``full`` (the user's role).
        expires_days: Days until the token is refused.

    Raises:
        ValueError: no such user, an unknown scope or a lifetime not above zero.
    """
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(TOKEN_SCOPES)}, not {scope!r}")
    if not expires_days > 0:
        raise ValueError("a token must expire: --expires-days above 0")
    user = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
    if user is None:
        raise ValueError(f"no user {username!r}")
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    with db:
        db.execute(
            "INSERT INTO api_tokens (user_id, name, token_sha256, scope, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (user["id"], name, hash_token(token), scope, now, now + expires_days * 86400),
        )
        audit(db, username, "token-created", detail=f"{name} ({scope}, {expires_days:g} days)")
    return token


def revoke_tokens(db, name: str) -> int:
    """Revoke every live token called ``name``; audit each under its user; return how many."""
    with db:
        begin_write(db)
        tokens = db.execute(
            "SELECT api_tokens.id, username FROM api_tokens JOIN users ON users.id = user_id"
            " WHERE name = ? AND revoked_at IS NULL",
            (name,),
        ).fetchall()
        for token in tokens:
            db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (time.time(), token["id"])
            )
            audit(db, token["username"], "token-revoked", detail=name)
    return len(tokens)


@bp.before_app_request
def load_identity() -> None:
    """Set who is asking: ``g.user``, ``g.via``, ``g.role`` and ``g.token_name``.

    ``g.user`` is a users row or None, ``g.via`` ``session`` or ``token``,
    ``g.role`` one of :data:`ROLES` and ``g.token_name`` None for sessions.

    Raises:
        AuthenticationError: a Bearer token that is unknown, revoked or expired.
    """
    g.user, g.via, g.role, g.token_name = None, None, None, None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        db = get_db()
        token = _live_token(db, header.removeprefix("Bearer ").strip())
        with db:
            db.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (time.time(), token["id"])
            )
        g.user = db.execute("SELECT * FROM users WHERE id = ?", (token["user_id"],)).fetchone()
        g.via, g.token_name = "token", token["name"]
        g.role = g.user["role"] if token["scope"] == "full" else "uploader"
    elif "user_id" in session:
        g.user = (
            get_db().execute("SELECT * FROM users WHERE id = ?", (session["user_id"],)).fetchone()
        )
        if g.user is not None:
            g.via, g.role = "session", g.user["role"]


def _live_token(db: Connection, token: str) -> Row:
    """The api_tokens row of a token that may be used now.

    Raises:
        AuthenticationError: unknown, revoked or expired (the message says which, and when).
    """
    row = db.execute(
        "SELECT * FROM api_tokens WHERE token_sha256 = ?", (hash_token(token),)
    ).fetchone()
    if row is None or row["revoked_at"] is not None:
        raise AuthenticationError("invalid or revoked API token")
    if row["expires_at"] is not None and row["expires_at"] <= time.time():
        expired = datetime.fromtimestamp(row["expires_at"], UTC).strftime("%Y-%m-%d %H:%M")
        raise AuthenticationError(
            f"API token {row['name']!r} expired on {expired} UTC; "
            "ask an administrator for a new one"
        )
    return row


@bp.before_app_request
def require_login():
    """Refuse anonymous requests outside :data:`PUBLIC_ENDPOINTS`."""
    if g.user is not None or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if request.path.startswith("/api/") or request.endpoint is None:
        raise AuthenticationError("log in or send 'Authorization: Bearer <token>'")
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


@bp.before_app_request
def authorize() -> None:
    """Refuse an identity whose role is below what the view needs (:func:`role_required`).

    Raises:
        ForbiddenError: e.g. an upload-only token reading studies, a clinician the audit log.
    """
    if g.role is None or request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
        return  # anonymous on a public endpoint, open to all, or no such route (404)
    needed = getattr(current_app.view_functions[request.endpoint], "required_role", DEFAULT_ROLE)
    if ROLES.index(g.role) < ROLES.index(needed):
        raise ForbiddenError(f"this needs the {needed} role; this identity is {g.role}")


def role_required(role: str) -> Callable:
    """Open a view to ``role`` and every role above it (place it under the route decorator).

    Views without it need :data:`DEFAULT_ROLE`; :func:`authorize` enforces both.

        @bp.get("/audit")
        @role_required("admin")
        def audit_log(): ...
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")

    def mark(view: Callable) -> Callable:
        view.required_role = role
        return view

    return mark


@bp.route("/login", methods=("GET", "POST"))
def login():
    """The login form; on success, a fresh session and a redirect to ``next``."""
    if request.method == "GET":
        return render_template("auth/login.html")
    username = request.form.get("username", "").strip()[:MAX_USERNAME_CHARS]
    password = request.form.get("password", "")
    # The proxy's address unless TRUSTED_PROXY_HOPS is set (console/security.py, ProxyFix).
    address = request.remote_addr or ""
    db = get_db()
    with db:
        # One write transaction for check, verify and record: of N parallel guesses,
        # only LOGIN_MAX_FAILURES are verified before the lockout starts.
        begin_write(db)
        wait_s = seconds_until_login_allowed(db, username, address)
        user = None if wait_s > 0 else _verify_password(db, username, password)
        action = "login-throttled" if wait_s > 0 else "login" if user else "login-failed"
        audit(db, username, action, client_addr=address)
    if wait_s > 0:
        logger.warning("login refused: too many failed attempts for a username or address")
        flash(
            "Too many failed logins for this user or from this address. "
            f"Try again in {math.ceil(wait_s)} s."
        )
        return render_template("auth/login.html"), 429
    if user is None:
        flash("Wrong username or password.")
        return render_template("auth/login.html"), 401
    session.clear()  # a new session id on login: no session fixation
    session["user_id"] = user["id"]
    session.permanent = True
    logger.info("user %d logged in", user["id"])
    return redirect(_safe_next(request.args.get("next")))


def _verify_password(db: Connection, username: str, password: str) -> Row | None:
    """The user if the password is right, else None, in the same time for unknown usernames."""
    user = db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    # An unknown username is checked against a hash of the same cost, so the answer's
    # timing does not tell which usernames exist.
    stored = user["password_hash"] if user is not None else dummy_password_hash()
    if check_password_hash(stored, password) and user is not None:
        return user
    return None


@functools.cache
def dummy_password_hash() -> str:
    """A hash of a random password, made like real ones (same method and cost), once per process."""
    return generate_password_hash(secrets.token_urlsafe(16))


def seconds_until_login_allowed(db: Connection, username: str, address: str) -> float:
    """How long a login for ``username`` from ``address`` must wait (0: now).

    Per username: ``login-failed`` rows since the user's last successful login;
    with ``LOGIN_MAX_FAILURES`` of them inside ``LOGIN_WINDOW_S``, attempts are
    refused until ``LOGIN_LOCKOUT_S`` after the latest. Per address: the same
    with ``LOGIN_MAX_FAILURES_PER_ADDRESS`` failures for any usernames (a
    success does not reset it, or one known account would reset a spray). The
    lockout is short on purpose: a clinician locked out of the worklist is a
    hazard of its own, and a handful of guesses a minute is already hopeless
    against a 10-character password. Refused attempts are audited as
    ``login-throttled`` and do not extend the lockout.
    """
    config = current_app.config
    now = time.time()
    since = now - float(config["LOGIN_WINDOW_S"])
    per_user = db.execute(
        "SELECT MAX(at) AS latest, COUNT(*) AS n FROM audit_log"
        " WHERE action = 'login-failed' AND at > ? AND username = ? AND id > COALESCE("
        "  (SELECT MAX(id) FROM audit_log WHERE username = ? AND action = 'login'), 0)",
        (since, username, username),
    ).fetchone()
    per_address = db.execute(
        "SELECT MAX(at) AS latest, COUNT(*) AS n FROM audit_log"
        " WHERE action = 'login-failed' AND at > ? AND client_addr = ?",
        (since, address),
    ).fetchone()
    lockout_s = float(config["LOGIN_LOCKOUT_S"])
    waits = [
        failures["latest"] + lockout_s - now
        for failures, limit in (
            (per_user, config["LOGIN_MAX_FAILURES"]),
            (per_address, config["LOGIN_MAX_FAILURES_PER_ADDRESS"]),
        )
        if failures["n"] >= int(limit)
    ]
    return max([0.0, *waits])


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


def _password_options(envvar: str | None) -> Callable:
    """The options ``create-admin`` and ``create-user`` share (``--password`` from ``envvar``)."""
    options = [
        click.option(
            "--password",
            envvar=envvar,
            help="Prompted for when not given" + (f" (or set {envvar})." if envvar else "."),
        ),
        click.option("--generate-password", is_flag=True, help="Generate one, print it once."),
        click.option("--if-missing", is_flag=True, help="Succeed unchanged if the user exists."),
    ]

    def add(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return add


def _create_user_from_cli(
    username: str, password: str | None, generate_password: bool, if_missing: bool, role: str
) -> None:
    """Create the tables if needed, then the account; print the generated password once."""
    init_db(current_app.config["DATABASE"])
    db = connect(current_app.config["DATABASE"])
    try:
        if (
            if_missing
            and db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        ):
            click.echo(f"user {username!r} exists; log in with its password")
            return
        if generate_password:
            password = secrets.token_urlsafe(12)
        elif password is None:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        create_user(db, username, password, role)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    finally:
        db.close()
    shown = f" with password {password}" if generate_password else ""
    click.echo(f"created {role} {username!r}{shown}")


@click.command("create-admin")
@with_appcontext
@click.option("--username", default="admin", show_default=True)
@_password_options(envvar="HEMOTRIAGE_ADMIN_PASSWORD")
def create_admin_command(
    username: str, password: str | None, generate_password: bool, if_missing: bool
) -> None:
    """Create an administrator account (creates the tables first if needed)."""
    _create_user_from_cli(username, password, generate_password, if_missing, "admin")


@click.command("create-user")
@with_appcontext
@click.option("--username", required=True)
@click.option("--role", type=click.Choice(USER_ROLES), default="clinician", show_default=True)
@_password_options(envvar=None)
def create_user_command(
    username: str, role: str, password: str | None, generate_password: bool, if_missing: bool
) -> None:
    """Create a clinician or administrator account (creates the tables first if needed)."""
    _create_user_from_cli(username, password, generate_password, if_missing, role)


@click.command("create-token")
@with_appcontext
@click.option("--username", required=True, help="The user the token is issued under.")
@click.option("--name", required=True, help="What the token is for, e.g. pacs-bridge.")
@click.option(
    "--scope",
    type=click.Choice(TOKEN_SCOPES),
    default="upload",
    show_default=True,
    help="upload: POST /api/scans only (scanners, PACS bridges); full: the user's role.",
)
@click.option(
    "--expires-days",
    type=float,
    default=None,
    help="Days until it is refused (default HEMOTRIAGE_TOKEN_EXPIRES_DAYS, 365).",
)
def create_token_command(username: str, name: str, scope: str, expires_days: float | None) -> None:
    """Issue an API token (printed once) for a machine client."""
    if expires_days is None:
        expires_days = float(current_app.config["TOKEN_EXPIRES_DAYS"])
    db = connect(current_app.config["DATABASE"])
    try:
        token = create_token(db, username, name, scope=scope, expires_days=expires_days)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    finally:
        db.close()
    click.echo(token)


@click.command("revoke-token")
@with_appcontext
@click.option("--name", required=True, help="The name given at create-token.")
def revoke_token_command(name: str) -> None:
    """Revoke every live API token of that name (audited); it answers 401 from now on."""
    db = connect(current_app.config["DATABASE"])
    try:
        revoked = revoke_tokens(db, name)
    finally:
        db.close()
    if revoked == 0:
        raise click.ClickException(f"no live token named {name!r}")
    click.echo(f"revoked {revoked} token(s) named {name!r}")


def init_app(app) -> None:
    """Register the blueprint and the user and token commands."""
    app.register_blueprint(bp)
    for command in (
        create_admin_command,
        create_user_command,
        create_token_command,
        revoke_token_command,
    ):
        app.cli.add_command(command)
