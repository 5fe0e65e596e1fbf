import io
import time

import pytest
from werkzeug.security import check_password_hash

from console.db import connect
from console.security import SECURITY_HEADERS


@pytest.mark.parametrize("path", ["/", "/upload", "/audit", "/studies/1"])
def test_pages_redirect_anonymous_users_to_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login?next=")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/studies"),
        ("get", "/api/stream"),
        ("post", "/api/scans"),
        ("get", "/studies/1/slices/1.png"),
    ],
)
def test_api_answers_401_json_without_identity(client, method, path):
    response = getattr(client, method)(path)
    if path.startswith("/api"):
        assert response.status_code == 401
        assert response.get_json()["error"] == "AuthenticationError"
    else:
        assert response.status_code == 302


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_probes_and_metrics_need_no_login(client, path):
    assert client.get(path).status_code == 200


def test_login_with_a_wrong_password_fails(client, auth):
    response = auth.login(password="wrong password!")
    assert response.status_code == 401
    assert "Wrong username or password" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_repeated_wrong_passwords_throttle_that_username_for_a_while(app, client, auth, db_rows):
    app.config.update(LOGIN_MAX_FAILURES=3, LOGIN_LOCKOUT_S=1.0)
    for _ in range(3):
        assert auth.login(password="guess number n").status_code == 401

    refused = auth.login()  # even the right password waits out the lockout
    assert refused.status_code == 429
    assert "Too many failed logins for this user" in refused.get_data(as_text=True)
    assert auth.login("nurse", "another long password").status_code == 302  # others unaffected

    time.sleep(1.1)
    assert auth.login().status_code == 302
    rows = db_rows("SELECT action FROM audit_log WHERE username = 'admin'")
    actions = [r["action"] for r in rows]
    assert actions[-5:] == ["login-failed"] * 3 + ["login-throttled", "login"]


def test_login_sets_a_secure_httponly_samesite_cookie_and_audits(client, auth, db_rows):
    response = auth.login()
    assert response.status_code == 302 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "hemotriage_session=" in cookie
    for flag in ("HttpOnly", "Secure", "SameSite=Lax"):
        assert flag in cookie
    assert client.get("/").status_code == 200
    assert [r["action"] for r in db_rows("SELECT action FROM audit_log")][-1] == "login"


def test_login_without_csrf_token_is_refused(client):
    response = client.post("/auth/login", data={"username": "admin", "password": "x" * 12})
    assert response.status_code == 400
    assert response.get_json()["error"] == "CsrfError"


def test_login_redirects_only_to_local_paths(client, auth):
    client.get("/auth/login")
    token = auth.headers()["X-CSRF-Token"]
    for target, expected in [
        ("/audit", "/audit"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
    ]:
        response = client.post(
            f"/auth/login?next={target}",
            data={"username": "admin", "password": "correct horse battery", "csrf_token": token},
        )
        assert response.headers["Location"] == expected
        token = auth.headers()["X-CSRF-Token"]


def test_session_upload_needs_the_csrf_header(logged_in, auth, kaggle_png):
    data = {"files": [(io.BytesIO(kaggle_png.read_bytes()), "a.png")]}
    refused = logged_in.post("/api/scans", data=data, content_type="multipart/form-data")
    assert refused.status_code == 400 and refused.get_json()["error"] == "CsrfError"
    data = {"files": [(io.BytesIO(kaggle_png.read_bytes()), "a.png")]}
    accepted = logged_in.post(
        "/api/scans", data=data, content_type="multipart/form-data", headers=auth.headers()
    )
    assert accepted.status_code == 201


def test_logout_needs_post_with_csrf_and_ends_the_session(logged_in, auth):
    assert logged_in.get("/auth/logout").status_code == 405
    response = logged_in.post("/auth/logout", data={"csrf_token": auth.headers()["X-CSRF-Token"]})
    assert response.status_code == 302
    assert logged_in.get("/").status_code == 302


def test_bearer_token_works_without_cookies_or_csrf(api, upload, kaggle_png):
    assert upload(api, [("a.png", kaggle_png.read_bytes())]).status_code == 201
    assert api.get("/api/studies").status_code == 200


def test_invalid_or_revoked_token_is_401(app, token, db_rows):
    client = app.test_client(use_cookies=False)
    bad = client.get("/api/studies", headers={"Authorization": "Bearer ht_not-a-token"})
    assert bad.status_code == 401
    db = connect(app.config["DATABASE"])
    with db:
        db.execute("UPDATE api_tokens SET revoked_at = 1")
    db.close()
    revoked = client.get("/api/studies", headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 401
    (row,) = db_rows("SELECT token_sha256 FROM api_tokens")
    assert token not in row["token_sha256"]  # only the hash is stored


def test_security_headers_on_pages_api_and_errors(client, logged_in):
    for response in (client.get("/healthz"), logged_in.get("/"), client.get("/api/nothing")):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
    assert "script-src 'self'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert logged_in.get("/").headers["Cache-Control"] == "no-store"


def test_pages_have_no_inline_script_or_style(logged_in):
    for path in ("/", "/upload", "/audit", "/auth/login"):
        html = logged_in.get(path).get_data(as_text=True)
        assert "<script>" not in html and "style=" not in html and "<style" not in html


def test_cli_init_db_create_admin_and_token(runner, app, db_rows):
    assert "initialized the database" in runner.invoke(args=["init-db"]).output
    result = runner.invoke(
        args=["create-admin", "--username", "chief", "--password", "a long enough password"]
    )
    assert result.exit_code == 0, result.output
    (user,) = db_rows("SELECT * FROM users WHERE username = 'chief'")
    assert user["is_admin"] == 1 and user["password_hash"].startswith("scrypt:")
    short = runner.invoke(args=["create-admin", "--username", "x", "--password", "short"])
    assert short.exit_code != 0
    again = runner.invoke(
        args=["create-admin", "--username", "chief", "--if-missing", "--generate-password"]
    )
    assert again.exit_code == 0 and "exists" in again.output
    made = runner.invoke(
        args=["create-admin", "--username", "demo", "--if-missing", "--generate-password"]
    )
    password = made.output.strip().rsplit(" ", 1)[-1]
    db = connect(app.config["DATABASE"])
    (user,) = db.execute("SELECT password_hash FROM users WHERE username = 'demo'").fetchall()
    db.close()
    assert check_password_hash(user["password_hash"], password)
    token = runner.invoke(args=["create-token", "--username", "chief", "--name", "pacs"]).output
    client = app.test_client(use_cookies=False)
    ok = client.get("/api/studies", headers={"Authorization": f"Bearer {token.strip()}"})
    assert ok.status_code == 200
