"""The admin page: users and API tokens, and the three things done to them from the browser
(disable or enable a user, revoke a token).  Admins only; every change audited."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from core import audit
from core.db import session_scope
from core.users import UserError, list_tokens, list_users, revoke_token, set_active
from web.session import admin_required, settings

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.route("/users")
@login_required
def users() -> Any:
    admin_required()
    with session_scope(settings().database_url) as s:
        people = [
            {
                "username": u.username,
                "admin": u.is_admin,
                "active": u.active,
                "created_at": u.created_at.isoformat(timespec="seconds"),
            }
            for u in list_users(s)
        ]
        tokens = [
            {
                "id": t.id,
                "user": name,
                "created_at": t.created_at.isoformat(timespec="seconds"),
                "expires_at": t.expires_at.isoformat(timespec="seconds") if t.expires_at else None,
                "last_used_at": (
                    t.last_used_at.isoformat(timespec="seconds") if t.last_used_at else None
                ),
                "revoked": t.revoked_at is not None,
            }
            for t, name in list_tokens(s)
        ]
    return render_template("admin.html", people=people, tokens=tokens)


@bp.route("/users/<username>/<any(disable, enable):action>", methods=["POST"])
@login_required
def user_state(username: str, action: str) -> Any:
    admin_required()
    if username == current_user.username and action == "disable":
        flash("You cannot disable yourself.", "error")
        return redirect(url_for("admin.users"))
    with session_scope(settings().database_url) as s:
        try:
            set_active(s, username, action == "enable")
        except UserError as exc:
            abort(404, str(exc))
        audit.record(
            s, current_user.username, f"user.{action}", username, remote=request.remote_addr or ""
        )
    flash(f"{username} {action}d.")
    return redirect(url_for("admin.users"))


@bp.route("/tokens/<int(max=2147483647):token_id>/revoke", methods=["POST"])
@login_required
def token_revoke(token_id: int) -> Any:
    admin_required()
    with session_scope(settings().database_url) as s:
        try:
            revoke_token(s, token_id)
        except UserError as exc:
            abort(404, str(exc))
        audit.record(
            s,
            current_user.username,
            "token.revoke",
            str(token_id),
            remote=request.remote_addr or "",
        )
    flash(f"Token {token_id} revoked.")
    return redirect(url_for("admin.users"))
