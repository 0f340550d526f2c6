"""The outbox: C-STORE a report to one destination, with backoff and a visible failed state.

Attempt n (1-based) that fails waits ``sr_retry_base_seconds * 2**(n-1)`` before the next; after
``sr_max_attempts`` the delivery is ``failed`` with its last error, and an admin can re-send it
from the dashboard (which resets it to ``pending``).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pydicom
from pynetdicom import AE

from core import audit
from core.db import session_scope
from core.models import Delivery, DeliveryState, Report, utcnow
from core.settings import Destination, Settings

logger = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


class DeliveryError(Exception):
    """The destination did not take the report (network, association or status)."""


def parse_destination(text: str) -> Destination:
    ae, rest = text.split("@", 1)
    host, port = rest.rsplit(":", 1)
    return Destination(ae, host, int(port))


def c_store(settings: Settings, dest: Destination, path: str) -> None:
    """Send one file; raise :class:`DeliveryError` unless the peer answers 0x0000."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {dest} refused or failed")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no response from {dest} (timeout or abort)")
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
        raise DeliveryError(f"{dest} answered status 0x{code:04X}")


def deliver(settings: Settings, delivery_id: int) -> str:
    """One attempt; returns the new state.  Never raises for a delivery problem."""
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        if row is None:
            return "missing"
        if row.state != DeliveryState.PENDING:
            return str(row.state)
        report = s.get(Report, row.report_id)
        assert report is not None
        path, destination = report.path, row.destination
    try:
        c_store(settings, parse_destination(destination), path)
        error = ""
    except (DeliveryError, OSError, ValueError, RuntimeError) as exc:
        error = str(exc) or exc.__class__.__name__
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        row.attempts += 1
        if not error:
            row.state, row.delivered_at, row.last_error = DeliveryState.DELIVERED, utcnow(), ""
            row.next_attempt_at = None
            audit.record(s, "worker", "report.export", destination, report=report.sop_instance_uid)
        else:
            row.last_error = error[:2000]
            if row.attempts >= settings.sr_max_attempts:
                row.state = DeliveryState.FAILED
                row.next_attempt_at = None
                audit.record(
                    s,
                    "worker",
                    "report.export",
                    destination,
                    outcome="failed",
                    report=report.sop_instance_uid,
                    error=error[:200],
                )
            else:
                wait = settings.sr_retry_base_seconds * 2 ** (row.attempts - 1)
                row.next_attempt_at = utcnow() + timedelta(seconds=wait)
        logger.log(
            logging.INFO if not error else logging.WARNING,
            "report %s to %s: %s",
            report.sop_instance_uid,
            destination,
            "delivered" if not error else f"attempt {row.attempts} failed: {error}",
        )
        return str(row.state)


def resend(settings: Settings, delivery_id: int, actor: str) -> None:
    """Put a delivery back in the outbox (the dashboard's re-send)."""
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        if row is None:
            raise KeyError(delivery_id)
        row.state, row.attempts, row.next_attempt_at = DeliveryState.PENDING, 0, None
        audit.record(s, actor, "report.resend", row.destination, delivery=delivery_id)
