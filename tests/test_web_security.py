"""The web side under an attacker's hands: sessions that end, guessing throttled, CSRF only
waived for valid tokens, ids out of range.  Against the real app (#22)."""

from __future__ import annotations

from dataclasses import replace

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
