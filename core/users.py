"""Users and API tokens: argon2id password hashes, tokens kept only as SHA-256."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import ApiToken, User, utcnow

_hasher = PasswordHasher()
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 12  # NIST SP 800-63B asks for at least 8, 15 without a second factor


class UserError(ValueError):
    """A user could not be created or found; the message says why."""


def check_password(password: str) -> None:
    """The password policy; :class:`UserError` says what is wrong.  At least
    :data:`MIN_PASSWORD` characters, not only spaces, and not one of the
    30,000 most common passwords (zxcvbn's list), however capitalised or spaced."""
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
    if not password.strip():
        raise UserError("the password cannot be only spaces")
    folded = password.strip().lower()
    if folded in _common_passwords() or folded.replace(" ", "") in _common_passwords():
        raise UserError("that password is one of the most common ones: choose another")


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def create_user(session: Session, username: str, password: str, *, admin: bool = False) -> User:
    if not USERNAME_RE.match(username):
        raise UserError("a user name is 1-64 letters, digits or _ . @ -")
    check_password(password)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), is_admin=admin)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this password, or None (same cost whether or not it exists)."""
    user = session.scalar(select(User).where(User.username == username))
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def end_sessions(session: Session, user_id: int) -> None:
    """Every browser session of the user ends now (they log in again)."""
    user = session.get(User, user_id)
    if user is not None:
        user.session_version += 1


def create_token(session: Session, username: str, days: float | None = None) -> str:
    """Make a bearer token for ``username`` that expires after ``days`` (None: never); the
    token itself is returned once, never stored."""
    user = _user(session, username)
    token = "cct_" + secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(days=days) if days else None
    session.add(ApiToken(user_id=user.id, token_sha256=_sha256(token), expires_at=expires))
    session.flush()
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """The active user a live token (not expired, not revoked) belongs to."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == _sha256(token)))
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    user = session.get(User, row.user_id)
    if user is None or not user.active:
        return None
    row.last_used_at = utcnow()
    return user


def _user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def set_active(session: Session, username: str, active: bool) -> User:
    """Enable or disable a user; disabling ends their sessions, and their tokens stop
    working while they are disabled."""
    user = _user(session, username)
    user.active = active
    if not active:
        user.session_version += 1
    return user


def set_password(session: Session, username: str, password: str) -> User:
    """A new password (the policy applies); every session of the user ends."""
    check_password(password)
    user = _user(session, username)
    user.password_hash = hash_password(password)
    user.session_version += 1
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def list_tokens(session: Session, username: str | None = None) -> list[tuple[ApiToken, str]]:
    """Tokens with their user's name, newest first; only ``username``'s when given."""
    query = select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
    if username:
        query = query.where(User.username == username)
    return [(t, name) for t, name in session.execute(query.order_by(ApiToken.id.desc()))]


def revoke_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise UserError(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
