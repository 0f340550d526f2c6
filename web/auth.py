"""Login, logout and bearer tokens.  Every login attempt is audited, by user name only."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit
from core.db import session_scope
from core.models import AuditEvent, utcnow
from core.settings import Settings
from core.users import authenticate, end_sessions, user_for_token
from web.session import SessionUser, settings

bp = Blueprint("auth", __name__)


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


NAME_LOCK_SECONDS = 60.0  # a name guessed from everywhere waits this long, no longer


def wait_before_login(db: Session, s: Settings, username: str, remote: str) -> float:
    """Seconds before ``username`` may be tried from ``remote`` again (0: now), from the
    refused logins in the audit log: ``LOGIN_MAX_FAILURES`` for this name from this address,
    four times as many from this address for any name, or ten times as many for this name
    from anywhere within ``LOGIN_WINDOW_SECONDS``.  The last only holds the name for
    :data:`NAME_LOCK_SECONDS`: guessing from many addresses slows down, and nobody can keep
    the name's owner out for long."""
    now, window = utcnow(), s.login_window_seconds
    refused = select(AuditEvent.at).where(
        AuditEvent.action == "login",
        AuditEvent.outcome == "refused",
        AuditEvent.at >= now - timedelta(seconds=window),
    )
    limit = s.login_max_failures
    pair = refused.where(AuditEvent.actor == username, AuditEvent.remote == remote)
    wait = 0.0
    # (failures, how many, held from the oldest of them for the window; else from the latest
    # for NAME_LOCK_SECONDS)
    rules = (
        (pair, limit, True),
        (refused.where(AuditEvent.remote == remote), 4 * limit, True),
        (refused.where(AuditEvent.actor == username), 10 * limit, False),
    )
    for query, most, sliding in rules:
        recent = db.scalars(query.order_by(AuditEvent.at.desc()).limit(most)).all()
        if len(recent) < most:
            continue
        until = (
            recent[-1] + timedelta(seconds=window)
            if sliding
            else recent[0] + timedelta(seconds=NAME_LOCK_SECONDS)
        )
        wait = max(wait, (until - now).total_seconds())
    return wait


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:64]
        password = request.form.get("password", "")
        remote = request.remote_addr or ""
        snapshot = None
        with session_scope(settings().database_url) as db:
            wait = wait_before_login(db, settings(), username or "?", remote)
            if wait > 0:  # the password is not even checked: no answer to learn from
                audit.record(db, username or "?", "login", outcome="throttled", remote=remote)
            else:
                user = authenticate(db, username, password) if username and password else None
                outcome = "ok" if user else "refused"
                audit.record(db, username or "?", "login", outcome=outcome, remote=remote)
                snapshot = SessionUser(user) if user is not None else None
        if wait > 0:
            minutes = max(1, math.ceil(wait / 60))
            flash(f"Too many failed logins: try again in {minutes} minute(s).", "error")
            response = current_app.make_response((render_template("login.html"), 429))
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
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
        if not getattr(g, "bearer", False):  # a token is revoked, not logged out
            end_sessions(db, current_user.id)
        audit.record(db, current_user.username, "logout", remote=request.remote_addr or "")
    logout_user()
    return redirect(url_for("auth.login"))
