"""What a readiness probe and the stages agree on: free disk, and which workers are alive.

Workers say they are alive in the ``workers`` table (:func:`beat`, every ``heartbeat_seconds``
from the worker's main process); a worker not seen for ``task_stale_seconds`` is gone.  The
listener refuses associations below ``min_free_disk_mb`` of free disk; ``/readyz`` says so.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update

from core.db import session_scope
from core.models import WorkerProcess, utcnow
from core.settings import Settings


def free_disk_mb(path: Path) -> float:
    """Free space where ``path`` lives (the nearest existing folder above it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / (1024 * 1024)


def beat(settings: Settings, name: str) -> None:
    """Record that worker ``name`` (host:pid) is alive now."""
    now = utcnow()
    with session_scope(settings.database_url) as s:
        seen = s.execute(
            update(WorkerProcess).where(WorkerProcess.name == name).values(seen_at=now)
        ).rowcount
        if not seen:
            s.add(WorkerProcess(name=name, started_at=now, seen_at=now))


def gone(settings: Settings, name: str) -> None:
    """A worker that stops cleanly removes itself."""
    with session_scope(settings.database_url) as s:
        s.execute(delete(WorkerProcess).where(WorkerProcess.name == name))


def live_workers(settings: Settings) -> int:
    since = utcnow() - timedelta(seconds=settings.task_stale_seconds)
    with session_scope(settings.database_url) as s:
        return int(
            s.scalar(
                select(func.count()).select_from(WorkerProcess).where(WorkerProcess.seen_at > since)
            )
            or 0
        )


def readiness(settings: Settings, broker_ok: str) -> tuple[bool, dict[str, str]]:
    """Every check by name, ``ok`` or why the service cannot take work."""
    checks: dict[str, str] = {}
    try:
        n = live_workers(settings)
        checks["database"] = "ok"
        checks["workers"] = (
            "ok"
            if n
            else (f"no live worker (none seen in the last {settings.task_stale_seconds:.0f} s)")
        )
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
        checks["workers"] = "unknown: the database is unavailable"
    checks["broker"] = broker_ok
    floor = settings.min_free_disk_mb
    free = free_disk_mb(settings.spool_dir)
    checks["disk"] = (
        "ok"
        if not floor or free >= floor
        else f"free disk {free:.0f} MB below {floor} MB: DICOM associations are refused"
    )
    return all(v == "ok" for v in checks.values()), checks
