"""CSRF protection, request body limits and security headers for every response.

Every request but ``POST /api/scans`` may carry at most ``MAX_FORM_BYTES``
(64 KiB): a larger declared body is refused with 413 before anything parses
it, and the per-request limit stops a chunked body at that size, so an
anonymous login cannot make the server read half a gigabyte. Behind a reverse
proxy, ``TRUSTED_PROXY_HOPS`` wraps the app in Werkzeug's ``ProxyFix`` so
``request.remote_addr`` (login throttling, the audit log) is the client's.

Session-authenticated requests that change state (POST, PUT, PATCH, DELETE)
must carry the session's CSRF token, as the form field ``csrf_token`` or the
``X-CSRF-Token`` header (the upload page's fetch sends the header). Bearer-token
clients send no cookies, so CSRF cannot reach them and they are exempt.
Templates get the token as ``csrf_token()``; base.html puts it in a meta tag.

    <input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
"""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, current_app, g, request, session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from console.errors import CsrfError

_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Endpoints that take bodies up to MAX_CONTENT_LENGTH; all others get MAX_FORM_BYTES.
LARGE_BODY_ENDPOINTS = frozenset({"api.upload_scans"})
#: Scripts, styles and connections from this origin only; no inline code, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def csrf_token() -> str:
    """This session's CSRF token, created on first use."""
    if "csrf_token" not in session:
        session["csrf_token"] = secrets.token_urlsafe(32)
    return session["csrf_token"]


def limit_body() -> None:
    """Hold every request but uploads to ``MAX_FORM_BYTES``, before anything reads the body.

    Raises:
        RequestEntityTooLarge: the declared length is over the limit (413 JSON); a chunked
            body is cut at the limit by ``request.max_content_length`` when it is read.
    """
    if request.endpoint in LARGE_BODY_ENDPOINTS:
        return
    limit = int(current_app.config["MAX_FORM_BYTES"])
    request.max_content_length = limit
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(f"request bodies here are limited to {limit} bytes")


def check_csrf() -> None:
    """Refuse a state-changing, cookie-authenticated request without the right token.

    Raises:
        CsrfError: the token is missing or wrong.
    """
    if request.method not in _UNSAFE_METHODS or g.get("via") == "token":
        return
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    expected = session.get("csrf_token", "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfError("missing or wrong CSRF token; reload the page and try again")


def add_security_headers(response):
    """Set the headers of :data:`SECURITY_HEADERS` (and no caching of pages with PHI)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def init_app(app: Flask) -> None:
    """Install ProxyFix if configured, the body limit and the CSRF check, and the header hook.

    Runs after :func:`console.auth.init_app`: the CSRF check needs the identity, and
    the identity hooks read no body, so the limit still comes before any parsing.
    """
    hops = int(app.config["TRUSTED_PROXY_HOPS"])
    if hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    app.before_request(limit_body)
    app.before_request(check_csrf)
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
