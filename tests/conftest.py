"""Shared fixtures: databases on SQLite and PostgreSQL, tools that must exist in CI."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from covidct.testbed import free_port  # noqa: F401  (tests import it from here)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get(
    "COVIDCT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def need(condition: bool, what: str) -> None:
    """Skip when a service or tool is missing, but fail in CI, where .ci/run provides it."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (.ci/run installs and starts it)")
    pytest.skip(f"{what} is not available")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"the program {name}")
    return str(path)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.sqlite3'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    import sqlalchemy as sa

    name = f"covidct_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from core.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both backends the results store supports, migrated to head."""
    from core.db import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    return url


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A minimal environment for load_settings with its own data dir."""
    return {"COVIDCT_DATA_DIR": str(tmp_path / "var")}


@pytest.fixture
def redis_db() -> Iterator[int]:
    """A Redis database of our own on the shared server, emptied before and after."""
    need(port_open(REDIS_HOST, REDIS_PORT), "Redis on 127.0.0.1:6379")
    import redis

    db = 5 + os.getpid() % 10
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    yield db
    client.flushdb()
