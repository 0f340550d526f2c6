"""What every part of the web stage shares: the notice on each answer, and the signed-in user.

Kept apart from the application factory so that the blueprints (auth, api, views) import it
without importing the app that imports them.
"""

from __future__ import annotations

from core.models import User

NOTICE = "Research and triage support only: results are unverified AI output, not a diagnosis."


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
