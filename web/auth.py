"""Login, logout and bearer tokens.  Every login attempt is audited, by user name only."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from core import audit
from core.db import session_scope
from core.settings import Settings
from core.users import authenticate, user_for_token
from web.session import SessionUser

bp = Blueprint("auth", __name__)


def settings() -> Settings:
    return current_app.config["COVIDCT"]


def user_from_bearer(s: Settings, header: str) -> Any:
    if not header.startswith("Bearer "):
        return None
    token = header[len("Bearer ") :].strip()
    if not token:
        return None
    with session_scope(s.database_url) as db:
        user = user_for_token(db, token)
        return SessionUser(user) if user is not None else None


def _safe_next(target: str | None) -> str:
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and not urlsplit(target).netloc
    ):
        return target
    return url_for("views.worklist")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:64]
        password = request.form.get("password", "")
        with session_scope(settings().database_url) as db:
            user = authenticate(db, username, password) if username and password else None
            audit.record(
                db,
                username or "?",
                "login",
                outcome="ok" if user else "refused",
                remote=request.remote_addr or "",
            )
            snapshot = SessionUser(user) if user is not None else None
        if snapshot is not None:
            login_user(snapshot)
            return redirect(_safe_next(request.args.get("next")))
        flash("Wrong user name or password.", "error")
        return render_template("login.html"), 401
    return render_template("login.html")


@bp.route("/logout", methods=["POST"])
@login_required
def logout() -> Any:
    with session_scope(settings().database_url) as db:
        audit.record(db, current_user.username, "logout", remote=request.remote_addr or "")
    logout_user()
    return redirect(url_for("auth.login"))
