"""What every part of the web stage shares: the notice on each answer, and the signed-in user.

Kept apart from the application factory so that the blueprints (auth, api, views) import it
without importing the app that imports them.
"""

from __future__ import annotations

from flask import abort, current_app, request
from flask_login import current_user

from core import audit
from core.db import session_scope
from core.models import User
from core.settings import Settings

NOTICE = "Research and triage support only: results are unverified AI output, not a diagnosis."


def settings() -> Settings:
    """The service's settings, as the application factory stored them."""
    return current_app.config["COVIDCT"]  # type: ignore[no-any-return]


class SessionUser:
    """What Flask-Login keeps for a request: a detached snapshot of the user row."""

    def __init__(self, user: User) -> None:
        self.id = user.id
        self.username = user.username
        self.is_admin = user.is_admin
        self.is_active = user.active
        self.is_authenticated = True
        self.is_anonymous = False
        self.session_version = user.session_version

    def upload_owner(self, shared: bool) -> int | None:
        """Whose uploads this user sees: all (None) for an admin or a shared site, else own."""
        return None if self.is_admin or shared else self.id

    def get_id(self) -> str:
        """What the session cookie keeps: the user and the session version it began under,
        so that moving the version on (logout) ends the session on the server's side."""
        return f"{self.id}:{self.session_version}"


def admin_required() -> None:
    """403 for anyone but an admin; the refused attempt is audited (who, what, from where)."""
    if current_user.is_admin:
        return
    with session_scope(settings().database_url) as s:
        audit.record(
            s,
            current_user.username,
            "admin.refused",
            request.path[:128],
            outcome="refused",
            remote=request.remote_addr or "",
        )
    abort(403, "Only administrators may do this.")
