import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from werkzeug.security import check_password_hash, generate_password_hash

from console.auth import dummy_password_hash, hash_token
from console.db import connect, init_db
from console.security import SECURITY_HEADERS
from tests.console.conftest import sqlite_only

OLD_SCHEMA = Path(__file__).parents[1] / "assets" / "console_schema_v1.sql"
NURSE = ("nurse", "another long password")


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
    rows = db_rows("SELECT action FROM audit_log WHERE username = 'admin' ORDER BY id")
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
    assert [r["action"] for r in db_rows("SELECT action FROM audit_log ORDER BY id")][-1] == "login"


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
    assert user["role"] == "admin" and user["password_hash"].startswith("scrypt:")
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
    token = runner.invoke(
        args=["create-token", "--username", "chief", "--name", "pacs", "--scope", "full"]
    ).output
    client = app.test_client(use_cookies=False)
    ok = client.get("/api/studies", headers={"Authorization": f"Bearer {token.strip()}"})
    assert ok.status_code == 200


def _bearer(app, token: str):
    client = app.test_client(use_cookies=False)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def _cli_token(runner, *args: str) -> str:
    result = runner.invoke(args=["create-token", *args])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_create_user_makes_clinicians_and_admins_with_their_roles(runner, db_rows):
    for username, role in (("doc", "clinician"), ("boss", "admin")):
        result = runner.invoke(
            args=["create-user", "--username", username, "--role", role, "--generate-password"]
        )
        assert result.exit_code == 0 and f"created {role} '{username}'" in result.output
    assert runner.invoke(args=["create-user", "--username", "x", "--role", "root"]).exit_code != 0
    rows = db_rows("SELECT username, role FROM users ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("admin", "admin"),
        ("nurse", "clinician"),
        ("doc", "clinician"),
        ("boss", "admin"),
    ]


def test_upload_only_token_uploads_but_reads_and_acknowledges_nothing(
    app, runner, phantom_series, upload, services, drain
):
    scanner = _bearer(app, _cli_token(runner, "--username", "nurse", "--name", "ct-scanner"))
    response = upload(scanner, [(f"{i}.dcm", b) for i, b in enumerate(phantom_series(2))])
    assert response.status_code == 201
    study_id, slice_id = response.get_json()["study_id"], response.get_json()["slice_ids"][0]
    drain(services)
    refused = [
        scanner.get("/api/studies"),
        scanner.get(f"/api/studies/{study_id}"),
        scanner.get("/api/stream"),
        scanner.get(f"/studies/{study_id}/slices/{slice_id}.png"),
        scanner.get(f"/studies/{study_id}/slices/{slice_id}/cam.png"),
        scanner.post(f"/api/studies/{study_id}/acknowledge"),
        scanner.post(f"/studies/{study_id}/acknowledge"),
        scanner.get(f"/studies/{study_id}"),
        scanner.get("/"),
        scanner.get("/audit"),
    ]
    for response in refused:
        assert response.status_code == 403, response.request.path
        assert response.get_json()["error"] == "ForbiddenError"
    assert scanner.get("/healthz").status_code == 200


def test_clinicians_work_the_worklist_and_only_admins_read_the_audit_log(
    app, client, auth, runner, phantom_series, services, drain, logged_in_as
):
    assert auth.login(*NURSE).status_code == 302
    response = client.post(
        "/api/scans",
        data={"files": [(io.BytesIO(phantom_series(1)[0]), "a.dcm")]},
        content_type="multipart/form-data",
        headers=auth.headers(),
    )
    assert response.status_code == 201
    study_id, slice_id = response.get_json()["study_id"], response.get_json()["slice_ids"][0]
    drain(services)
    for path in ("/", "/upload", "/api/studies", f"/studies/{study_id}"):
        assert client.get(path).status_code == 200, path
    assert client.get(f"/studies/{study_id}/slices/{slice_id}.png").status_code == 200
    acknowledged = client.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert acknowledged.status_code == 200
    assert client.get("/audit").status_code == 403
    assert "Audit log" not in client.get("/").get_data(as_text=True)

    full = _bearer(app, _cli_token(runner, "--username", "nurse", "--name", "s", "--scope", "full"))
    assert full.get("/api/studies").status_code == 200  # a full token has its user's role
    assert full.get("/audit").status_code == 403

    admin = logged_in_as("admin", "correct horse battery")
    assert admin.get("/audit").status_code == 200
    assert "Audit log" in admin.get("/").get_data(as_text=True)


def test_every_upload_is_audited_with_its_token_or_user_and_slice_count(
    app, runner, client, auth, phantom_series, upload, db_rows
):
    scanner = _bearer(app, _cli_token(runner, "--username", "admin", "--name", "ct-scanner"))
    series = phantom_series(3)
    first = upload(scanner, [(f"{i}.dcm", b) for i, b in enumerate(series)]).get_json()
    again = upload(scanner, [("0.dcm", series[0])]).get_json()
    auth.login(*NURSE)
    page = client.post(
        "/api/scans",
        data={"files": [(io.BytesIO(phantom_series(1)[0]), "b.dcm")]},
        content_type="multipart/form-data",
        headers=auth.headers(),
    ).get_json()
    rows = db_rows("SELECT * FROM audit_log WHERE action = 'upload' ORDER BY id")
    assert [(r["username"], r["study_id"], r["detail"]) for r in rows] == [
        (
            "admin",
            first["study_id"],
            f"3 slices (0 duplicates) into studies {first['study_id']} via token ct-scanner",
        ),
        (
            "admin",
            again["study_id"],
            f"0 slices (1 duplicates) into studies {again['study_id']} via token ct-scanner",
        ),
        (
            "nurse",
            page["study_id"],
            f"1 slices (0 duplicates) into studies {page['study_id']} via upload page",
        ),
    ]


def test_expired_token_is_refused_with_401_saying_it_expired(app, runner, db_rows):
    token = _cli_token(runner, "--username", "admin", "--name", "old", "--expires-days", "1e-9")
    response = _bearer(app, token).post("/api/scans")
    assert response.status_code == 401
    assert "API token 'old' expired on" in response.get_json()["message"]
    assert (
        runner.invoke(
            args=["create-token", "--username", "admin", "--name", "x", "--expires-days", "0"]
        ).exit_code
        != 0
    )
    (row,) = db_rows("SELECT created_at, expires_at FROM api_tokens WHERE name = 'old'")
    assert row["expires_at"] - row["created_at"] < 1e-3
    default = _cli_token(runner, "--username", "admin", "--name", "year")
    (row,) = db_rows("SELECT created_at, expires_at FROM api_tokens WHERE name = 'year'")
    assert row["expires_at"] - row["created_at"] == pytest.approx(365 * 86400)
    assert _bearer(app, default).get("/api/studies").status_code == 403  # upload scope


def test_revoke_token_refuses_it_from_then_on_and_audits(app, runner, db_rows):
    token = _cli_token(runner, "--username", "admin", "--name", "pacs-bridge", "--scope", "full")
    keep = _cli_token(runner, "--username", "admin", "--name", "other", "--scope", "full")
    assert _bearer(app, token).get("/api/studies").status_code == 200
    result = runner.invoke(args=["revoke-token", "--name", "pacs-bridge"])
    assert result.exit_code == 0 and "revoked 1 token(s)" in result.output
    refused = _bearer(app, token).get("/api/studies")
    assert refused.status_code == 401 and "revoked" in refused.get_json()["message"]
    assert _bearer(app, keep).get("/api/studies").status_code == 200
    assert runner.invoke(args=["revoke-token", "--name", "pacs-bridge"]).exit_code != 0
    (row,) = db_rows("SELECT * FROM audit_log WHERE action = 'token-revoked'")
    assert (row["username"], row["detail"]) == ("admin", "pacs-bridge")


@sqlite_only("upgrades a SQLite file made by a release before schema versions")
def test_init_db_upgrades_a_database_of_the_old_schema_in_place(
    tmp_path, app_factory, logged_in_as
):
    """A database made before roles and token scopes keeps its accounts, tokens and audit."""
    storage = tmp_path / "old"
    storage.mkdir()
    db = connect(storage / "hemotriage.sqlite")
    db.executescript(OLD_SCHEMA.read_text())
    with db:
        for username, password, is_admin in (("admin", "correct horse battery", 1), (*NURSE, 0)):
            db.execute(
                "INSERT INTO users (username, password_hash, is_admin, created_at)"
                " VALUES (?, ?, ?, 0)",
                (username, generate_password_hash(password), is_admin),
            )
        db.execute(
            "INSERT INTO api_tokens (user_id, name, token_sha256, created_at)"
            " VALUES (1, 'legacy', ?, ?)",
            (hash_token("ht_legacy"), time.time()),
        )
        db.execute("INSERT INTO audit_log (at, username, action) VALUES (0, 'admin', 'login')")
        # The old release stored a re-sent SOP instance twice, and UID-less DICOM as ''.
        db.execute(
            "INSERT INTO studies (study_key, label, source, priority, received_at, updated_at)"
            " VALUES ('dicom:1/2', 'CT', 'api', 2, 0, 0)"
        )
        for sha, sop in (("a", "1.2.3"), ("b", "1.2.3"), ("c", ""), ("d", "")):
            db.execute(
                "INSERT INTO slices (study_id, filename, stored_path, sha256, sop_uid, priority,"
                " queued_at) VALUES (1, 'x.dcm', 'x', ?, ?, 2, 0)",
                (sha, sop),
            )
    db.close()

    app = app_factory(storage)
    init_db(app.config["DATABASE"])  # a second run changes nothing
    admin = logged_in_as("admin", "correct horse battery", app)
    assert admin.get("/audit").status_code == 200  # is_admin became the admin role
    assert logged_in_as(*NURSE, app).get("/audit").status_code == 403
    legacy = _bearer(app, "ht_legacy")
    assert legacy.get("/api/studies").status_code == 403  # old tokens become upload-only
    db = connect(app.config["DATABASE"])
    (token,) = db.execute("SELECT * FROM api_tokens").fetchall()
    assert token["scope"] == "upload"
    assert token["expires_at"] == pytest.approx(token["created_at"] + 365 * 86400)
    assert "purged_at" in {r["name"] for r in db.execute("PRAGMA table_info(slices)")}
    assert db.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'login'").fetchone()[0] == 3
    sops = [r["sop_uid"] for r in db.execute("SELECT sop_uid FROM slices ORDER BY id")]
    assert sops == ["1.2.3", None, None, None]  # every slice kept; the copies lost the UID
    db.close()


def test_login_body_over_the_form_limit_is_refused_413_before_parsing(client):
    body = {"username": "admin", "password": "x" * (64 * 1024), "csrf_token": "not checked"}
    response = client.post("/auth/login", data=body)
    # 413 and not the CSRF check's 400: the form was never parsed.
    assert response.status_code == 413
    assert response.get_json()["error"] == "RequestTooLargeError"


def test_chunked_body_without_length_is_cut_at_the_form_limit(client):
    response = client.post(
        "/auth/login",
        input_stream=io.BytesIO(b"password=" + b"x" * (128 * 1024)),
        content_type="application/x-www-form-urlencoded",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413


def test_form_limit_is_configurable_and_leaves_uploads_alone(app, api, upload, phantom_series):
    app.config["MAX_FORM_BYTES"] = 16
    assert api.post("/api/studies/1/acknowledge", data={"x": "y" * 32}).status_code == 413
    series = phantom_series(2)  # about 130 KiB a slice
    assert upload(api, [(f"{i}.dcm", b) for i, b in enumerate(series)]).status_code == 201


def test_parallel_wrong_passwords_are_checked_and_recorded_atomically(app, auth_for, db_rows):
    app.config.update(LOGIN_MAX_FAILURES=5, LOGIN_LOCKOUT_S=60.0)
    clients = [app.test_client() for _ in range(20)]
    tokens = [auth_for(c).headers()["X-CSRF-Token"] for c in clients]
    barrier = threading.Barrier(len(clients))

    def attempt(i: int) -> int:
        barrier.wait()  # all 20 are in flight before any is answered
        form = {"username": "admin", "password": "parallel guess!", "csrf_token": tokens[i]}
        return clients[i].post("/auth/login", data=form).status_code

    with ThreadPoolExecutor(len(clients)) as pool:
        statuses = list(pool.map(attempt, range(len(clients))))
    assert Counter(statuses) == {401: 5, 429: 15}
    rows = db_rows(
        "SELECT action, COUNT(*) AS n FROM audit_log WHERE action LIKE 'login%' GROUP BY 1"
    )
    assert {r["action"]: r["n"] for r in rows} == {"login-failed": 5, "login-throttled": 15}


def test_failures_from_one_address_throttle_it_for_every_username(app, auth_for, db_rows):
    app.config.update(LOGIN_MAX_FAILURES_PER_ADDRESS=3)
    attacker, ward = app.test_client(), app.test_client()
    attacker.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    ward.environ_base["REMOTE_ADDR"] = "198.51.100.8"
    for username in ("alice", "bob", "carol"):
        assert auth_for(attacker).login(username, "sprayed password").status_code == 401
    refused = auth_for(attacker).login()  # the right password of another user, same address
    assert refused.status_code == 429
    assert "from this address" in refused.get_data(as_text=True)
    assert auth_for(ward).login().status_code == 302
    rows = db_rows("SELECT client_addr FROM audit_log WHERE action = 'login-failed'")
    assert {r["client_addr"] for r in rows} == {"198.51.100.7"}


def test_forwarded_for_counts_only_behind_a_trusted_proxy(
    tmp_path, app_factory, token_for, auth_for
):
    for hops, throttled_elsewhere in ((0, True), (1, False)):
        app = app_factory(
            tmp_path / f"hops{hops}",
            TRUSTED_PROXY_HOPS=hops,
            LOGIN_MAX_FAILURES_PER_ADDRESS=2,
        )
        token_for(app)  # creates the admin
        for _ in range(2):
            spoofed = app.test_client()
            spoofed.environ_base["HTTP_X_FORWARDED_FOR"] = "203.0.113.5"
            assert auth_for(spoofed).login("mallory", "wrong password!").status_code == 401
        other = app.test_client()
        other.environ_base["HTTP_X_FORWARDED_FOR"] = "203.0.113.6"
        expected = 429 if throttled_elsewhere else 302
        assert auth_for(other).login().status_code == expected, f"TRUSTED_PROXY_HOPS={hops}"


def test_unknown_usernames_cost_a_password_hash_like_known_ones(app, auth, db_rows, monkeypatch):
    """An unknown username is checked against a hash of the same method and cost as a real one.

    Asserted through the calls made (a spy around werkzeug's real check), not the clock.
    """
    import console.auth

    app.config.update(LOGIN_MAX_FAILURES=1000, LOGIN_MAX_FAILURES_PER_ADDRESS=1000)
    (admin,) = db_rows("SELECT password_hash FROM users WHERE username = 'admin'")
    method = admin["password_hash"].split("$")[0]
    assert dummy_password_hash().split("$")[0] == method  # same method and cost
    checked: list[str] = []
    real_check = console.auth.check_password_hash

    def spy(stored: str, password: str) -> bool:
        checked.append(stored)
        return real_check(stored, password)

    monkeypatch.setattr(console.auth, "check_password_hash", spy)
    assert auth.login("admin", "a wrong password").status_code == 401
    assert auth.login("nobody-by-this-name", "a wrong password").status_code == 401
    assert checked == [admin["password_hash"], dummy_password_hash()]
