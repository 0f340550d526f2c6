"""The command line, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SUBCOMMANDS = [
    "serve",
    "listener",
    "worker",
    "web",
    "evaluate",
    "predict",
    "create-user",
    "create-token",
    "user",
    "token",
    "demo",
    "db",
]


def run(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | env
    return subprocess.run(
        [sys.executable, "-m", "covidct.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_help_lists_every_subcommand(env: dict[str, str]) -> None:
    out = run(["--help"], env)
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(env: dict[str, str], name: str) -> None:
    out = run([name, "--help"], env)
    assert out.returncode == 0, out.stderr
    assert "usage: covidct" in out.stdout


def test_bad_setting_is_one_line_and_nonzero(env: dict[str, str]) -> None:
    out = run(["db", "upgrade"], env | {"COVIDCT_DICOM_PORT": "99999"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "COVIDCT_DICOM_PORT" in lines[0]


def test_db_upgrade_create_user_and_token(env: dict[str, str], tmp_path: Path) -> None:
    out = run(["db", "upgrade"], env)
    assert out.returncode == 0, out.stderr
    from core.db import MIGRATIONS_DIR

    newest = max(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert out.stdout.strip() == f"database at revision {newest}"  # the newest migration
    database = Path(env["COVIDCT_DATA_DIR"]) / "covidct.sqlite3"
    assert database.stat().st_mode & 0o077 == 0o040  # 0640: nothing for other accounts
    out = run(["create-user", "rad1", "--admin", "--password-stdin"], env, "a long password\n")
    assert out.returncode == 0, out.stderr
    out = run(["create-user", "rad1", "--password-stdin"], env, "a long password\n")
    assert out.returncode == 1 and "already exists" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(["create-token", "rad1"], env)
    assert out.returncode == 0 and out.stdout.startswith("cct_")
    out = run(["create-token", "nobody"], env)
    assert out.returncode == 1 and "no user" in out.stderr
    assert (tmp_path / "var" / "covidct.sqlite3").is_file()


def test_a_database_that_cannot_be_used_is_one_line_with_the_password_hidden(
    env: dict[str, str],
) -> None:
    from tests.conftest import free_port

    url = f"postgresql+psycopg://bob:s3cret@127.0.0.1:{free_port()}/nothing"
    out = run(["db", "upgrade"], env | {"COVIDCT_DATABASE_URL": url})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "bob:***@127.0.0.1" in lines[0] and "s3cret" not in lines[0]
    assert "refused" in lines[0] or "failed" in lines[0]


def test_create_user_without_a_terminal_says_to_use_password_stdin(env: dict[str, str]) -> None:
    out = run(["create-user", "bob"], env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "--password-stdin" in lines[0]
    out = run(["create-user", "bob", "--password-stdin"], env, stdin="a long password\n")
    assert out.returncode == 0 and "created reader bob" in out.stdout


def test_users_and_tokens_are_managed_and_audited(env: dict[str, str]) -> None:
    """List, disable, enable and set a password; list and revoke tokens, with expiry."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import AuditEvent, User
    from core.settings import load_settings
    from core.users import authenticate, user_for_token

    assert run(["create-user", "ann", "--password-stdin"], env, "a long password\n").returncode == 0
    token = run(["create-token", "ann", "--days", "1"], env).stdout.strip()
    forever = run(["create-token", "ann", "--days", "0"], env).stdout.strip()
    listed = run(["user", "list"], env)
    assert listed.returncode == 0 and "ann" in listed.stdout and "active" in listed.stdout
    tokens = run(["token", "list", "ann"], env).stdout.splitlines()
    assert len(tokens) == 2 and all("live" in line for line in tokens)
    assert "expires -" in tokens[0] and "expires 20" in tokens[1]  # newest first: forever
    url = load_settings(env).database_url
    assert run(["user", "disable", "ann"], env).stdout.strip() == "ann disabled"
    with session_scope(url) as db:
        assert user_for_token(db, token) is None  # a disabled user's tokens stop working
    assert run(["user", "enable", "ann"], env).returncode == 0
    weak = run(["user", "set-password", "ann", "--password-stdin"], env, "password1234\n")
    assert weak.returncode == 1 and "most common" in weak.stderr
    changed = run(["user", "set-password", "ann", "--password-stdin"], env, "a new long one\n")
    assert changed.returncode == 0 and "sessions have ended" in changed.stdout
    token_id = tokens[1].split()[0]
    assert run(["token", "revoke", token_id], env).returncode == 0
    assert "revoked" in run(["token", "list", "ann"], env).stdout
    with session_scope(url) as db:
        assert user_for_token(db, token) is None and user_for_token(db, forever) is not None
        assert authenticate(db, "ann", "a new long one") is not None
        user = db.scalar(select(User).where(User.username == "ann"))
        assert user is not None and user.session_version == 2  # disabled, new password
        actions = set(db.scalars(select(AuditEvent.action)))
    assert {"user.disable", "user.enable", "user.set_password", "token.revoke"} <= actions
    bad = run(["token", "revoke", "999"], env)
    assert bad.returncode == 1 and "no token 999" in bad.stderr
