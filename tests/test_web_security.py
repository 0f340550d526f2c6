"""The web side under an attacker's hands: sessions that end, guessing throttled, CSRF only
waived for valid tokens, ids out of range.  Against the real app (#22)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import session_scope
from core.models import AuditEvent, User
from core.settings import Settings
from core.users import create_token
from tests.test_web import csrf_token, login
from web.app import create_app

pytest_plugins = ["tests.test_web"]  # settings, app, client, reader, study


def attempt(client: FlaskClient, user: str, password: str, address: str) -> int:
    token = csrf_token(client)
    return client.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": address},
    ).status_code


def test_a_cookie_saved_before_logout_is_refused_after_it(app: Flask) -> None:
    first, second = app.test_client(), app.test_client()
    login(first)
    login(second)  # the same user in another browser
    saved = first.get_cookie("session")
    assert saved is not None
    assert first.get("/api/studies").status_code == 200
    first.post("/logout", data={"csrf_token": csrf_token(first, "/")})
    thief = app.test_client()
    thief.set_cookie("session", saved.value)
    assert thief.get("/api/studies").status_code == 401  # the replayed cookie is dead
    assert second.get("/api/studies").status_code == 401  # logout ends every session
    login(second)
    assert second.get("/api/studies").status_code == 200  # a new login works


def test_disabling_a_user_ends_their_session(reader: FlaskClient, settings: Settings) -> None:
    assert reader.get("/api/studies").status_code == 200
    with session_scope(settings.database_url) as db:
        user = db.scalar(select(User).where(User.username == "reader"))
        assert user is not None
        user.active = False
    assert reader.get("/api/studies").status_code == 401


def test_csrf_is_waived_only_for_a_valid_token(reader: FlaskClient, settings: Settings) -> None:
    junk = reader.post("/api/uploads", headers={"Authorization": "Bearer junk"})
    assert junk.status_code == 400 and "not sent by this site" in junk.get_data(as_text=True)
    with session_scope(settings.database_url) as db:
        token = create_token(db, "reader")
    valid = reader.post("/api/uploads", headers={"Authorization": f"Bearer {token}"})
    assert valid.status_code == 400 and "send one image" in valid.get_data(as_text=True)


@pytest.mark.parametrize(
    "path",
    [
        "/api/uploads/99999999999999999999",
        "/slices/99999999999999999999/model.png",
        "/slices/2147483648/view.png",
        "/uploads/9223372036854775808/model.png",
    ],
)
def test_ids_out_of_range_are_404(reader: FlaskClient, path: str) -> None:
    assert reader.get(path).status_code == 404


def test_a_huge_page_number_is_not_an_error(reader: FlaskClient) -> None:
    assert reader.get("/?page=9223372036854775807").status_code == 200
    assert reader.get("/api/studies?page=9223372036854775807").status_code == 200


def test_guessing_one_name_from_one_address_waits(client: FlaskClient, settings: Settings) -> None:
    for _ in range(settings.login_max_failures):
        assert attempt(client, "reader", "wrong guess", "10.0.0.9") == 401
    # the right password does not help now, and says nothing about it
    blocked = client.post(
        "/login",
        data={
            "username": "reader",
            "password": "reader password",
            "csrf_token": csrf_token(client),
        },
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
    )
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    assert "Too many failed logins" in blocked.get_data(as_text=True)
    for _ in range(settings.login_max_failures):
        attempt(client, "nobody", "wrong guess", "10.0.0.9")
    assert attempt(client, "nobody", "wrong guess", "10.0.0.9") == 429  # unknown: the same
    # the owner, from their own desk, is not locked out
    assert attempt(client, "reader", "reader password", "10.0.0.10") == 302
    with session_scope(settings.database_url) as db:
        outcomes = db.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "login"))
        assert "throttled" in set(outcomes)


def test_a_name_guessed_from_everywhere_is_held_briefly(settings: Settings) -> None:
    """Ten times the limit from as many addresses holds the name for 60 s, from everywhere:
    the guessing slows down, and the owner waits a minute, not the whole window."""
    from web import auth

    app = create_app(replace(settings, login_max_failures=2), {"TESTING": True})
    client = app.test_client()
    for i in range(20):
        assert attempt(client, "admin", "wrong guess", f"10.1.0.{i}") == 401
    assert attempt(client, "admin", "admin password", "10.2.0.1") == 429
    with session_scope(settings.database_url) as db:
        wait = auth.wait_before_login(db, replace(settings, login_max_failures=2), "admin", "x")
    assert 0 < wait <= auth.NAME_LOCK_SECONDS


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[int]:
    """A real `covidct web` (waitress) on a free port."""
    import os
    import subprocess
    import sys
    import time

    from covidct.testbed import free_port, launched
    from tests.conftest import port_open

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(tmp_path / "var"),
        "COVIDCT_WEB_PORT": str(port),
    }
    log = (tmp_path / "web.log").open("w")
    root = Path(__file__).resolve().parent.parent
    with launched(
        [sys.executable, "-m", "covidct.cli", "web"],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    ) as proc:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None, (tmp_path / "web.log").read_text()
            assert time.monotonic() < deadline, "covidct web did not open its port"
            time.sleep(0.1)
        yield port


def raw(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[str, float]:
    """Send ``head`` and ``body`` on a socket of our own; the status line, and how long the
    answer took from the first byte sent."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        try:
            sock.sendall(head)
            for i in range(0, len(body), 65536):
                sock.sendall(body[i : i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: what we want
        answer = b""
        try:
            while b"\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except ConnectionResetError:
            pass
        return answer.split(b"\r\n", 1)[0].decode("latin-1"), time.monotonic() - started


def test_a_chunk_size_line_without_end_is_refused_at_once(web_server: int) -> None:
    """8 MiB of chunk-size digits and no CRLF held waitress's I/O thread for 3.97 s (a
    230 MB one for about 15 minutes); the bounded reader refuses it after 4 KiB."""
    head = (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    status, took = raw(web_server, head, b"1" * (8 * 1024 * 1024))
    assert status.split()[1:2] == ["400"], status
    assert took < 3.0, f"the refusal took {took:.1f} s"
    ok, _ = raw(web_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.split()[1:2] == ["200"], ok  # the server still answers


def test_an_oversized_body_is_refused_before_it_is_read(web_server: int) -> None:
    head = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 943718400\r\n\r\n"
    )
    status, took = raw(web_server, head)  # no body sent at all: the answer comes anyway
    assert status.split()[1:2] == ["413"], status
    assert took < 3.0


def test_oversized_headers_are_refused(web_server: int) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (100 * 1024) + b"\r\n\r\n"
    status, _ = raw(web_server, head)
    assert status.split()[1:2] == ["431"], status


def test_an_uploads_picture_is_made_once_at_upload(reader: FlaskClient, settings: Settings) -> None:
    """A 6320x6320 16-bit PNG cost 751 ms and 640 MB per view when every view decoded it;
    the picture of what the model sees is made once, at upload, and served as stored."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("I;16", (900, 900), 30000).save(buf, format="PNG")
    token = csrf_token(reader, "/uploads")
    r = reader.post(
        "/api/uploads",
        data={"csrf_token": token, "file": (io.BytesIO(buf.getvalue()), "big.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.json
    (stored,) = settings.uploads_dir.glob("*.model.png")
    assert Image.open(stored).size == (200, 200)
    original = next(p for p in settings.uploads_dir.iterdir() if not p.name.endswith(".model.png"))
    original.unlink()  # a view that decoded the upload would fail now
    view = reader.get(f"/uploads/{r.json['id']}/model.png")
    assert view.status_code == 200 and view.data == stored.read_bytes()
    assert view.headers["Cache-Control"] == "no-store"


def test_uploads_are_their_owners(app: Flask, settings: Settings) -> None:
    """A second user's token read the first user's upload and its picture; now each user
    sees their own (admins all), unless the site shares uploads."""
    import io

    from PIL import Image

    from core.users import create_user

    with session_scope(settings.database_url) as db:
        create_user(db, "other", "another reader")
        tokens = {name: create_token(db, name) for name in ("reader", "other", "admin")}

    def as_(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    client = app.test_client()
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("L").save(buf, format="PNG")
    r = client.post(
        "/api/uploads",
        data={"file": (io.BytesIO(buf.getvalue()), "mine.png")},
        content_type="multipart/form-data",
        headers=as_("reader"),
    )
    assert r.status_code == 202
    upload_id = r.json["id"]
    for path in (f"/api/uploads/{upload_id}", f"/uploads/{upload_id}/model.png"):
        assert client.get(path, headers=as_("other")).status_code == 404
        assert client.get(path, headers=as_("reader")).status_code == 200
        assert client.get(path, headers=as_("admin")).status_code == 200
    assert client.get("/api/uploads", headers=as_("other")).json["items"] == []
    assert len(client.get("/api/uploads", headers=as_("admin")).json["items"]) == 1
    shared = create_app(replace(settings, shared_uploads=True), {"TESTING": True}).test_client()
    assert shared.get(f"/api/uploads/{upload_id}", headers=as_("other")).status_code == 200


def test_nothing_with_patient_data_is_cached(reader: FlaskClient, study: int) -> None:
    for path in ("/", "/studies/1.2.826.0.1.3680043.10.1404.77", "/api/studies", "/uploads"):
        assert reader.get(path).headers["Cache-Control"] == "no-store", path
    assert reader.get("/static/style.css").headers.get("Cache-Control") != "no-store"


def test_the_admin_page_disables_users_and_revokes_tokens(app: Flask, settings: Settings) -> None:
    with session_scope(settings.database_url) as db:
        token = create_token(db, "reader", days=30)
    admin, reader = app.test_client(), app.test_client()
    login(reader)
    assert reader.get("/admin/users").status_code == 403
    login(admin, "admin", "admin password")
    page = admin.get("/admin/users").get_data(as_text=True)
    assert "reader" in page and "live" in page
    csrf = csrf_token(admin, "/admin/users")
    token_id = re.search(r"/admin/tokens/(\d+)/revoke", page)
    assert token_id is not None
    admin.post(f"/admin/tokens/{token_id[1]}/revoke", data={"csrf_token": csrf})
    bare = app.test_client()
    assert bare.get("/api/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    admin.post("/admin/users/reader/disable", data={"csrf_token": csrf})
    assert reader.get("/api/studies").status_code == 401  # their session ended
    selfish = admin.post(
        "/admin/users/admin/disable", data={"csrf_token": csrf}, follow_redirects=True
    )
    assert "You cannot disable yourself." in selfish.get_data(as_text=True)
    with session_scope(settings.database_url) as db:
        actions = set(db.scalars(select(AuditEvent.action)))
    assert {"token.revoke", "user.disable"} <= actions


def test_hsts_when_cookies_are_secure(settings: Settings) -> None:
    plain = create_app(settings, {"TESTING": True}).test_client()
    assert "Strict-Transport-Security" not in plain.get("/healthz").headers
    secure = create_app(replace(settings, web_secure_cookies=True), {"TESTING": True})
    hsts = secure.test_client().get("/healthz").headers["Strict-Transport-Security"]
    assert hsts == "max-age=31536000"


def test_a_refused_admin_attempt_is_audited(reader: FlaskClient, settings: Settings) -> None:
    assert reader.get("/admin/users").status_code == 403
    with session_scope(settings.database_url) as db:
        event = db.scalar(select(AuditEvent).where(AuditEvent.action == "admin.refused"))
        assert event is not None and event.actor == "reader" and event.object == "/admin/users"


def test_an_expired_token_is_refused(client: FlaskClient, settings: Settings) -> None:
    from datetime import timedelta

    from core.models import ApiToken, utcnow

    with session_scope(settings.database_url) as db:
        token = create_token(db, "reader", days=1)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/studies", headers=headers).status_code == 200
    with session_scope(settings.database_url) as db:
        row = db.scalar(select(ApiToken))
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    assert client.get("/api/studies", headers=headers).status_code == 401
