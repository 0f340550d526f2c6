"""The outbox: a report, and the key images and key object selection made with it, to one
destination (C-STORE in one association, or STOW-RS in one request: worker/dicomweb.py), with
backoff and a visible failed state.

Attempt n (1-based) that fails waits ``sr_retry_base_seconds * 2**(n-1)`` before the next; after
``sr_max_attempts`` the delivery is ``failed`` with its last error, and an admin can re-send it
from the dashboard (which resets it to ``pending``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from core import audit, lifecycle
from core.db import session_scope
from core.models import Delivery, DeliveryState, Report, ReportObject, Study, utcnow
from core.settings import Settings
from core.values import Destination, destinations
from worker import hl7out, notify, validate
from worker.dicomweb import stow_rs
from worker.errors import DeliveryError
from worker.lease import Lease, renew_delivery

logger = logging.getLogger(__name__)


def resolve(settings: Settings, text: str) -> Destination:
    """The destination a delivery row names: the configured one (with its credentials), or,
    when the settings no longer list it, the one its name describes."""
    for dest in settings.destinations:
        if str(dest) == text:
            return dest
    return destinations(text)[0]


def send(settings: Settings, dest: Destination, paths: Sequence[str]) -> None:
    """Send files to a destination of either kind, each checked by dciodvfy first; raise
    :class:`DeliveryError` unless every one is taken."""
    for path in paths:
        found = validate.errors(settings.dciodvfy, path)
        if found:
            raise DeliveryError(
                f"{Path(path).name} fails dciodvfy, nothing sent: {'; '.join(found[:2])}"
            )
    if dest.is_dicomweb:
        stow_rs(settings, dest, paths)
    else:
        c_store(settings, dest, paths)


def requester(settings: Settings) -> AE:
    """An AE that asks peers (the outbox's C-STORE, backfill's C-FIND and C-MOVE) under this
    service's title and timeouts."""
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    return ae


def c_store(settings: Settings, dest: Destination, paths: Sequence[str]) -> None:
    """Send files in one association; raise :class:`DeliveryError` unless the peer takes
    each (0x0000, or a warning status)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = requester(settings)
    for sop_class, syntax in dict.fromkeys(
        (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets
    ):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {dest} refused or failed")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        refused = sorted({str(ds.SOPClassUID) for ds in datasets} - accepted)
        if refused:
            names = ", ".join(UID(u).name for u in refused)
            raise DeliveryError(
                f"{dest} does not accept {names}: leave it out with ?objects= in"
                " COVIDCT_DESTINATIONS (docs/configuration.md)"
            )
        for ds in datasets:
            _store_one(assoc, ds, dest)
    finally:
        assoc.release()


def _store_one(assoc: Association, ds: pydicom.Dataset, dest: Destination) -> None:
    status = assoc.send_c_store(ds)
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no response from {dest} (timeout or abort)")
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
        raise DeliveryError(f"{dest} answered status 0x{code:04X} to {UID(ds.SOPClassUID).name}")


def enqueue(s: Session, report_id: int, destinations: Iterable[Destination]) -> None:
    """One outbox row per destination for a report (kept when it exists: a re-run), with
    the kinds of object it gets."""
    have = set(s.scalars(select(Delivery.destination).where(Delivery.report_id == report_id)))
    study_id = s.scalar(select(Report.study_id).where(Report.id == report_id))
    for dest in destinations:
        if str(dest) not in have:
            s.add(
                Delivery(
                    report_id=report_id,
                    study_id=study_id,
                    destination=str(dest),
                    objects=",".join(dest.objects),
                )
            )


BUSY = "busy"  # another attempt holds the delivery: try again after its lease


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt: a report's files, or a webhook's event and body."""

    destination: str
    label: str  # what the logs and the audit log name: the SR's UID, or the study's
    paths: list[str] = field(default_factory=list)
    event: str = ""
    payload: str = ""


def claim_delivery(settings: Settings, delivery_id: int) -> Claimed | str:
    """Take a pending delivery for one attempt, or say why not (``delivered``, ``failed``,
    ``cancelled``, ``missing``, ``busy``).

    An earlier attempt that died (its claim expired, its outcome never written) is counted
    in ``interrupted``: the PACS may hold the SR already, so this attempt may be a re-send of
    the same SOP Instance UID (delivery is at-least-once; see docs/operations.md)."""
    now = utcnow()
    with session_scope(settings.database_url) as s:
        taken = s.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state == DeliveryState.PENDING,
                or_(Delivery.claimed_until.is_(None), Delivery.claimed_until <= now),
            )
            .values(
                claimed_until=now + timedelta(seconds=settings.task_stale_seconds),
                interrupted=Delivery.interrupted
                + case((Delivery.claimed_until.is_not(None), 1), else_=0),
            )
        ).rowcount
        row = s.get(Delivery, delivery_id)
        if row is None:
            return "missing"
        if taken != 1:
            return str(row.state) if row.state != DeliveryState.PENDING else BUSY
        if row.event:
            study = s.get(Study, row.study_id) if row.study_id else None
            label = study.study_instance_uid if study else f"study id {row.study_id}"
            return Claimed(row.destination, label, event=row.event, payload=row.payload or "")
        report = s.get(Report, row.report_id)
        assert report is not None
        if row.interrupted:
            logger.warning(
                "report %s to %s: %d earlier attempt(s) interrupted; sending again",
                report.sop_instance_uid,
                row.destination,
                row.interrupted,
            )
        return Claimed(row.destination, report.sop_instance_uid, _files(s, report, row.objects))


def _files(s: Session, report: Report, objects: str) -> list[str]:
    """What a delivery sends: the SR first, then the key object selection and the key
    images, of the kinds it was made for."""
    kinds = objects.split(",")
    extra = s.scalars(
        select(ReportObject)
        .where(ReportObject.report_id == report.id, ReportObject.kind.in_(kinds))
        .order_by(ReportObject.kind.desc(), ReportObject.id)
    )
    return ([report.path] if "sr" in kinds else []) + [o.path for o in extra]


def deliver(settings: Settings, delivery_id: int) -> str:
    """One attempt; returns the new state (or ``busy``).  Never raises for a delivery
    problem.  The outcome is logged only after it is committed."""
    claimed = claim_delivery(settings, delivery_id)
    if isinstance(claimed, str):
        return claimed
    destination, label = claimed.destination, claimed.label
    what = "notification" if claimed.event else "report"
    renew = lambda: renew_delivery(settings, delivery_id)  # noqa: E731
    with Lease(settings, f"delivery {delivery_id}", renew):
        try:
            if claimed.event and (mllp := hl7out.address(destination)):
                hl7out.send(settings, mllp, claimed.payload)
            elif claimed.event:
                notify.post(settings, destination, claimed.event, delivery_id, claimed.payload)
            elif claimed.paths:  # a report made before key images, sent to a destination of
                send(settings, resolve(settings, destination), claimed.paths)  # them only
            error = ""
        except (DeliveryError, OSError, ValueError, RuntimeError) as exc:
            error = str(exc) or exc.__class__.__name__
    with session_scope(settings.database_url) as s:
        state = lifecycle.record_attempt(
            s, delivery_id, error, settings.sr_max_attempts, settings.sr_retry_base_seconds
        )
        row = s.get(Delivery, delivery_id)
        assert row is not None
        if state is None:  # an admin's re-send moved it meanwhile: that one counts
            logger.info("%s %s to %s: re-sent during an attempt", what, label, destination)
            return str(row.state)
        if state != DeliveryState.PENDING:
            outcome = {} if not error else {"outcome": "failed", "error": error[:200]}
            if claimed.event:
                audit.record(
                    s,
                    "worker",
                    "notify.send",
                    destination,
                    study=label,
                    event=claimed.event,
                    **outcome,
                )
            else:
                audit.record(s, "worker", "report.export", destination, report=label, **outcome)
        attempts = row.attempts
    logger.log(
        logging.INFO if not error else logging.WARNING,
        "%s %s to %s: %s",
        what,
        label,
        destination,
        "delivered" if not error else f"attempt {attempts} failed: {error}",
    )
    return state


def resend(settings: Settings, delivery_id: int, actor: str) -> bool:
    """Put a delivery back in the outbox (the dashboard's re-send); False when an attempt
    is running now."""
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        if row is None:
            raise KeyError(delivery_id)
        if not lifecycle.resend_delivery(s, delivery_id, utcnow()):
            return False
        audit.record(s, actor, "report.resend", row.destination, delivery=delivery_id)
        return True
