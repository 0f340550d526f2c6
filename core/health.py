"""What a readiness probe and the stages agree on: free disk, which workers are alive, and
whether the listener answers.

Workers say they are alive in the ``workers`` table (:func:`beat`, every ``heartbeat_seconds``
from the worker's main process); a worker not seen for ``task_stale_seconds`` is gone.  The
listener refuses associations below ``min_free_disk_mb`` of free disk; ``/readyz`` says so.
The listener is alive when it answers what a PACS sends: a C-ECHO (:func:`dicom_echo`); a
frozen process still accepts TCP connections (the kernel queues them), so a plain connect
says nothing.
"""

from __future__ import annotations

import shutil
import socket
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from core.db import session_scope
from core.models import Lease, WorkerProcess, utcnow
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


HEALTH_CHECK_AE = "COVIDCT-CHECK"  # the calling AE title of these checks


def local_address(host: str, port: int) -> str:
    """``host:port`` where a client on this machine reaches a server bound to ``host`` (a
    wildcard bind is reached on loopback)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{target}]:{port}" if ":" in target else f"{target}:{port}"


def hold_lease(settings: Settings, name: str, holder: str, seconds: float) -> bool:
    """Take or renew the lease ``name`` for ``seconds``: True when ``holder`` has it now.
    One conditional UPDATE (or the first INSERT) decides, so two processes on two machines
    cannot both hold it; a holder that stops renewing loses it when it expires."""
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    with session_scope(settings.database_url) as s:
        taken = s.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at <= now))
            .values(holder=holder, expires_at=until)
        ).rowcount
        if taken:
            return True
        if s.get(Lease, name) is not None:
            return False
    try:
        with session_scope(settings.database_url) as s:
            s.add(Lease(name=name, holder=holder, expires_at=until))
        return True
    except IntegrityError:  # another process inserted it first
        return False


def release_lease(settings: Settings, name: str, holder: str) -> None:
    """Give the lease up at a clean stop, so that another process takes over at once."""
    with session_scope(settings.database_url) as s:
        s.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))


def dicom_echo(address: str, called_ae: str, timeout: float = 5.0) -> str:
    """C-ECHO to ``host:port`` as a PACS would: "ok", or why the listener did not answer.
    An association the listener rejects (too many at once, disk floor) still answered."""
    return echo_check(address, called_ae, timeout)[0]


def echo_check(address: str, called_ae: str, timeout: float = 5.0) -> tuple[str, bool]:
    """:func:`dicom_echo`, and whether the TCP connection was made: a process that is still
    starting refuses it, a frozen or stuck one accepts it (the kernel queues it) and then
    says nothing."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    host, _, port = address.rpartition(":")
    ae = AE(ae_title=HEALTH_CHECK_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        assoc = ae.associate(host.strip("[]"), int(port), ae_title=called_ae)
    except (OSError, ValueError) as exc:
        return f"no answer from {address}: {exc}", False
    if assoc.is_rejected:
        return "ok", True  # it answered: a rejection is a decision, not silence
    if not assoc.is_established:
        return f"no answer to an association request within {timeout:g} s ({address})", True
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0:
        return f"C-ECHO to {address} got no success status", True
    return "ok", True


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
    if settings.listener_address:
        answer = dicom_echo(settings.listener_address, settings.ae_title, timeout=2.0)
        checks["listener"] = answer if answer == "ok" else f"the listener: {answer}"
    floor = settings.min_free_disk_mb
    free = free_disk_mb(settings.spool_dir)
    checks["disk"] = (
        "ok"
        if not floor or free >= floor
        else f"free disk {free:.0f} MB below {floor} MB: DICOM associations are refused"
    )
    return all(v == "ok" for v in checks.values()), checks
