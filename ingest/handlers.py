"""pynetdicom event handlers of the storage SCP.

Each handler gets what it needs as an extra argument (:class:`IngestContext`), never a global.
Every failure becomes a DICOM status after it is logged: unreadable data 0xC210, a bad UID
0xC210, a SOP class that does not match its context 0xA900, a failed write 0xA700.  Anything
unexpected reaches the peer as 0xC211 (pynetdicom's own translation).  UIDs are logged,
patient names never.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import audit
from core.db import session_scope
from core.health import HEALTH_CHECK_AE, free_disk_mb
from core.settings import Settings
from ingest import completeness, pdu_guard, tuning
from ingest.keep import NotKept, keep
from ingest.part10 import file_meta
from ingest.records import UnreadableDatasetError, read_header
from ingest.spool import InvalidUIDError

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
RJ_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason (host not allowed)
RJ_CONGESTION = (0x02, 0x03, 0x01)  # transient, presentation, temporary congestion


@dataclass(frozen=True)
class IngestContext:
    settings: Settings

    @property
    def spool(self) -> Path:
        return self.settings.spool_dir


def _peer(event: Any) -> tuple[str, str]:
    rq = event.assoc.requestor
    return str(rq.ae_title).strip(), str(rq.address)


def _audit(
    ctx: IngestContext, actor: str, action: str, obj: str, outcome: str, remote: str, **detail: Any
) -> None:
    try:
        with session_scope(ctx.settings.database_url) as s:
            audit.record(s, actor or "?", action, obj, outcome=outcome, remote=remote, **detail)
    except Exception:  # the audit log must never take the SCP down
        logger.exception("could not write audit event %s", action)


def handle_conn_open(event: Any) -> None:
    """Turn Nagle's algorithm off (it costs a store SCP about 20x on loopback) and let the
    association's loops wake on work instead of polling (:mod:`ingest.tuning`); the
    connection gets the association-request deadline (:mod:`ingest.pdu_guard`)."""
    pdu_guard.on_connection(event.assoc)
    tuning.attach(event.assoc)
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            logger.warning("could not set TCP_NODELAY")


def handle_conn_close(event: Any, ctx: IngestContext) -> None:
    """The connection closed.  The association's end is settled by EVT_RELEASED or
    EVT_ABORTED, which the association's own thread may trigger just after this (the peer
    can close the socket as soon as it has the A-RELEASE-RP); if neither came within
    ``SETTLE_AFTER_CLOSE`` seconds, the association died without one: settle it as ended
    without release."""
    tuning.detach(event.assoc)
    if completeness.tallies(event.assoc):
        calling, _ = _peer(event)
        timer = threading.Timer(
            SETTLE_AFTER_CLOSE,
            completeness.closed,
            (ctx.settings, event.assoc, False, calling),
        )
        timer.daemon = True
        timer.start()


SETTLE_AFTER_CLOSE = 5.0


def handle_released(event: Any, ctx: IngestContext) -> None:
    """A-RELEASE: the sender says it sent what it meant to (ingest.completeness)."""
    calling, _ = _peer(event)
    completeness.closed(ctx.settings, event.assoc, True, calling)


def handle_aborted(event: Any, ctx: IngestContext) -> None:
    """A-ABORT or A-P-ABORT (the sender or the network died): the studies it stored into
    may be incomplete (ingest.completeness)."""
    calling, _ = _peer(event)
    completeness.closed(ctx.settings, event.assoc, False, calling)


def access_decision(
    ctx: IngestContext, calling: str, called: str, host: str
) -> tuple[tuple[int, int, int] | None, str]:
    """The A-ASSOCIATE-RJ reason for a request, or None to go on negotiating."""
    s = ctx.settings
    if s.allowed_aes != ("*",) and calling not in s.allowed_aes:
        return RJ_CALLING_AE, f"calling AE title {calling!r} is not allowed"
    if called != s.ae_title:
        return RJ_CALLED_AE, f"called AE title {called!r} is not {s.ae_title!r}"
    if s.allowed_hosts and host not in s.allowed_hosts:
        return RJ_NO_REASON, f"host {host} is not allowed"
    if s.min_free_disk_mb and free_disk_mb(ctx.spool) < s.min_free_disk_mb:
        return RJ_CONGESTION, f"free disk below {s.min_free_disk_mb} MB"
    return None, ""


def handle_requested(event: Any, ctx: IngestContext) -> None:
    """Access control at A-ASSOCIATE-RQ: reject with the reason PS3.8 defines, and audit."""
    pdu_guard.on_request(event.assoc, ctx.settings.acse_timeout)
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip()
    called = str(primitive.called_ae_title).strip()
    host = str(event.assoc.requestor.address)
    reject, why = access_decision(ctx, calling, called, host)
    if reject is None:
        return
    logger.warning("rejecting association from %s@%s: %s", calling, host, why)
    # audited before the peer hears of it: a peer that looks at once finds the entry
    _audit(ctx, calling, "association.reject", called, "refused", host, reason=why)
    event.assoc.acse.send_reject(*reject)
    event.assoc.kill()


def handle_accepted(event: Any, ctx: IngestContext) -> None:
    calling, host = _peer(event)
    if calling == HEALTH_CHECK_AE and host in ("127.0.0.1", "::1"):
        return  # serve's and /readyz's C-ECHO every few seconds: not worth an audit row
    _audit(ctx, calling, "association.accept", ctx.settings.ae_title, "ok", host)


def handle_echo(event: Any) -> int:
    return SUCCESS


def handle_store(event: Any, ctx: IngestContext) -> int:
    """C-STORE: read the header, write the bytes durably, record them, then answer.  The
    record never exists without its file; a file without a record (a crash between the two)
    is recorded at start-up."""
    calling, host = _peer(event)
    try:
        syntax = str(event.context.transfer_syntax)
        meta = file_meta(
            str(event.request.AffectedSOPClassUID),
            str(event.request.AffectedSOPInstanceUID),
            syntax,
            calling,
        )
        data = meta + event.encoded_dataset(include_meta=False)
    except Exception:
        logger.exception("cannot encode received dataset from %s", calling)
        return CANNOT_UNDERSTAND
    try:
        header = read_header(data, dataset_offset=len(meta), transfer_syntax=syntax)
    except (UnreadableDatasetError, InvalidUIDError) as exc:
        logger.warning("refusing instance from %s@%s: %s", calling, host, exc)
        _audit(ctx, calling, "instance.refuse", "", "refused", host, reason=str(exc))
        return CANNOT_UNDERSTAND
    if header.sop_class_uid != str(event.request.AffectedSOPClassUID):
        logger.warning("SOP class of %s does not match its context", header.sop_uid)
        return DATASET_MISMATCH
    try:
        new = keep(ctx.settings, header, data, calling)
    except NotKept as exc:
        if not exc.written:  # refused: the study may lack this instance
            completeness.refused(event.assoc, header.study_uid, str(exc))
        return OUT_OF_RESOURCES
    try:
        completeness.stored(ctx.settings, event.assoc, header.study_uid)
    except Exception:
        logger.exception("cannot count instance %s in its association", header.sop_uid)
        return OUT_OF_RESOURCES
    logger.debug(
        "stored %s of study %s%s", header.sop_uid, header.study_uid, "" if new else " (duplicate)"
    )
    return SUCCESS
