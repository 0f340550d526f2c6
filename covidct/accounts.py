"""``covidct create-user``, ``user ...``, ``create-token`` and ``token ...``: who may use the
dashboard and the API.  Every change is audited (actor ``cli``); a disabled user, a new
password or a revoked token take effect at the next request.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from datetime import datetime

from core.audit import record
from core.db import session_scope, upgrade
from core.settings import Settings
from core.users import (
    UserError,
    create_token,
    create_user,
    list_tokens,
    list_users,
    revoke_token,
    set_active,
    set_password,
)

SettingsOf = Callable[[argparse.Namespace], Settings]
Adder = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def read_password(args: argparse.Namespace, command: str) -> str:
    """From stdin with ``--password-stdin``, else asked twice on the terminal."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UserError(
            "no terminal to ask for the password: pipe it in with --password-stdin, e.g. "
            f"printf '%s\\n' \"$PASSWORD\" | covidct {command} {args.username} --password-stdin"
        )
    try:
        password = getpass.getpass(f"Password for {args.username}: ")
        again = getpass.getpass("Repeat it: ")
    except EOFError:
        raise UserError("no password given (use --password-stdin to pipe one)") from None
    if again != password:
        raise UserError("the passwords differ")
    return password


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def add_account_commands(add: Adder, settings_of: SettingsOf) -> None:
    """Register the commands on the CLI's parser (``add`` makes a subcommand)."""

    def store(args: argparse.Namespace) -> str:
        settings = settings_of(args)
        upgrade(settings.database_url)
        return settings.database_url

    def cmd_create_user(args: argparse.Namespace) -> int:
        password = read_password(args, "create-user")
        with session_scope(store(args)) as session:
            user = create_user(session, args.username, password, admin=args.admin)
            record(session, "cli", "user.create", user.username, admin=args.admin)
        print(f"created {'admin' if args.admin else 'reader'} {args.username}")
        return 0

    def cmd_user(args: argparse.Namespace) -> int:
        url = store(args)
        with session_scope(url) as session:
            if args.action == "list":
                for u in list_users(session):
                    role = "admin" if u.is_admin else "reader"
                    state = "active" if u.active else "disabled"
                    print(f"{u.username:<24} {role:<7} {state:<9} created {_when(u.created_at)}")
                return 0
            if args.username is None:
                raise UserError(f"covidct user {args.action} needs a user name")
            if args.action in ("disable", "enable"):
                set_active(session, args.username, args.action == "enable")
                record(session, "cli", f"user.{args.action}", args.username)
                print(f"{args.username} {args.action}d")
                return 0
        password = read_password(args, "user set-password")  # outside the transaction
        with session_scope(url) as session:
            set_password(session, args.username, password)
            record(session, "cli", "user.set_password", args.username)
        print(f"password of {args.username} changed; their sessions have ended")
        return 0

    def cmd_create_token(args: argparse.Namespace) -> int:
        settings = settings_of(args)
        days = settings.token_days if args.days is None else args.days
        with session_scope(store(args)) as session:
            token = create_token(session, args.username, days or None)
            record(session, "cli", "token.create", args.username, days=days or "never")
        print(token)
        return 0

    def cmd_token(args: argparse.Namespace) -> int:
        with session_scope(store(args)) as session:
            if args.action == "list":
                for t, name in list_tokens(session, args.which):
                    state = "revoked" if t.revoked_at else "live"
                    print(
                        f"{t.id:>5} {name:<24} {state:<8} created {_when(t.created_at)}"
                        f"  expires {_when(t.expires_at)}  last used {_when(t.last_used_at)}"
                    )
                return 0
            if args.which is None or not args.which.isdigit():
                raise UserError("covidct token revoke needs a token id (see covidct token list)")
            row = revoke_token(session, int(args.which))
            record(session, "cli", "token.revoke", str(row.id))
        print(f"token {args.which} revoked")
        return 0

    p = add("create-user", cmd_create_user, "create a dashboard user")
    p.add_argument("username")
    p.add_argument("--admin", action="store_true", help="may re-run, re-send, manage users")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p = add("user", cmd_user, "list, disable, enable users, or set a user's password")
    p.add_argument("action", choices=("list", "disable", "enable", "set-password"))
    p.add_argument("username", nargs="?")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p = add("create-token", cmd_create_token, "print a new API bearer token for a user")
    p.add_argument("username")
    p.add_argument(
        "--days",
        type=float,
        help="days until it expires (default COVIDCT_TOKEN_DAYS; 0: never)",
    )
    p = add("token", cmd_token, "list API tokens (all, or one user's), or revoke one by id")
    p.add_argument("action", choices=("list", "revoke"))
    p.add_argument("which", nargs="?", metavar="USER|ID")
