"""The operations page (admins): where a PACS administrator starts when no result arrived.

The DICOM node and the DICOMweb port as configured, each destination with its kind, what it
gets, its last success and last failure and its queue, the outbox (re-send, cancel), the audit
log with filters, and the service's health (what /readyz checks).  Read from the results store
and the settings; the two actions go through core.lifecycle and are audited.
"""

from __future__ import annotations

import threading
from datetime import date, datetime
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from core import audit, lifecycle
from core.db import session_scope
from core.health import readiness
from core.models import AuditEvent, Delivery, DeliveryState, Study, utcnow
from core.settings import Settings
from core.values import destinations as parse_destinations
from web.session import admin_required, settings
from worker import hl7out

bp = Blueprint("operations", __name__, url_prefix="/admin")

OUTBOX_ROWS = 100
AUDIT_ROWS = 200


def _when(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t else None


def node(s: Settings) -> dict[str, Any]:
    return {
        "ae_title": s.ae_title,
        "address": f"{s.dicom_host}:{s.dicom_port}",
        "tls": s.tls_cert is not None,
        "allowed_aes": ", ".join(s.allowed_aes),
        "allowed_hosts": ", ".join(s.allowed_hosts) or "any",
        "sop_classes": ", ".join(s.sop_classes),
        "stow": f"http://{s.web_host}:{s.web_port}/dicom-web/studies",
        "backfill_source": s.backfill_source,
    }


def destinations(db: Session, s: Settings) -> list[dict[str, Any]]:
    """Each configured destination, and any the outbox still names that is not configured."""
    counts: dict[str, dict[str, int]] = {}
    for name, state, n in db.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(
            Delivery.destination, Delivery.state
        )
    ):
        counts.setdefault(name, {})[state] = n
    named: dict[str, Any] = {str(d): d for d in s.destinations}
    named.update({url: "webhook" for url in s.webhook_urls})
    named.update({hl7out.destination(a): "hl7" for a in s.hl7_destinations})
    out = []
    for name in list(named) + sorted(set(counts) - set(named)):
        dest = named.get(name)
        last_ok = db.scalar(
            select(func.max(Delivery.delivered_at)).where(Delivery.destination == name)
        )
        failure = db.scalar(
            select(AuditEvent)
            .where(
                AuditEvent.action.in_(("report.export", "notify.send")),
                AuditEvent.object == name,
                AuditEvent.outcome == "failed",
            )
            .order_by(AuditEvent.at.desc())
            .limit(1)
        )
        c = counts.get(name, {})
        out.append(
            {
                "name": name,
                "kind": _kind(dest),
                "objects": _gets(dest),
                "last_success": _when(last_ok),
                "last_failure": _when(failure.at) if failure else None,
                "last_error": (failure.detail or {}).get("error", "") if failure else "",
                "pending": c.get(DeliveryState.PENDING, 0),
                "failed": c.get(DeliveryState.FAILED, 0),
                "delivered": c.get(DeliveryState.DELIVERED, 0),
            }
        )
    return out


def _gets(dest: Any) -> str:
    if dest == "webhook":
        return "study events"
    if dest == "hl7":
        return "finished studies"
    return ", ".join(dest.objects) if dest else ""


def _kind(dest: Any) -> str:
    if dest is None:
        return "not configured"
    if dest == "webhook":
        return "webhook (signed JSON)"
    if dest == "hl7":
        return "HL7 v2 ORU^R01 (MLLP)"
    return "DICOMweb (STOW-RS)" if dest.is_dicomweb else "DICOM (C-STORE)"


def outbox(db: Session) -> list[dict[str, Any]]:
    """Deliveries not delivered (pending, failed, cancelled), newest first."""
    rows = db.execute(
        select(Delivery, Study.study_instance_uid)
        .join(Study, Study.id == Delivery.study_id, isouter=True)
        .where(Delivery.state != DeliveryState.DELIVERED)
        .order_by(Delivery.id.desc())
        .limit(OUTBOX_ROWS)
    )
    return [
        {
            "id": d.id,
            "study": uid,
            "destination": d.destination,
            "objects": f"notification of {d.event}" if d.event else d.objects,
            "state": d.state,
            "attempts": d.attempts,
            "next_attempt_at": _when(d.next_attempt_at),
            "last_error": d.last_error,
        }
        for d, uid in rows
    ]


def audit_log(db: Session, actor: str, action: str, outcome: str) -> list[dict[str, Any]]:
    query = select(AuditEvent)
    conditions = []
    if actor:
        conditions.append(AuditEvent.actor == actor)
    if action:
        conditions.append(AuditEvent.action.startswith(action, autoescape=True))
    if outcome:
        conditions.append(AuditEvent.outcome == outcome)
    if conditions:
        query = query.where(and_(*conditions))
    return [
        {
            "at": _when(e.at),
            "actor": e.actor,
            "action": e.action,
            "object": e.object,
            "outcome": e.outcome,
            "remote": e.remote,
            "detail": ", ".join(f"{k}={v}" for k, v in (e.detail or {}).items()),
        }
        for e in db.scalars(query.order_by(AuditEvent.id.desc()).limit(AUDIT_ROWS))
    ]


@bp.route("/operations")
@login_required
def page() -> Any:
    admin_required()
    from web.views import broker_check

    s = settings()
    filters = {k: request.args.get(k, "")[:64] for k in ("actor", "action", "outcome")}
    ok, checks = readiness(s, broker_check(s))
    with session_scope(s.database_url) as db:
        return render_template(
            "operations.html",
            node=node(s),
            destinations=destinations(db, s),
            outbox=outbox(db),
            events=audit_log(db, **filters),
            filters=filters,
            healthy=ok,
            checks=checks,
        )


_backfill = threading.Lock()  # one backfill at a time in this process


@bp.route("/backfill", methods=["POST"])
@login_required
def start_backfill() -> Any:
    """Backfill a date range from ``COVIDCT_BACKFILL_SOURCE`` in a thread of this process: the
    audit log records its start (``backfill.start``) and its summary (``backfill.done``).  A
    restart of the web process ends it; run it again (studies here already are skipped)."""
    admin_required()
    s = settings()
    if not s.backfill_source:
        flash("Set COVIDCT_BACKFILL_SOURCE (AE@host:port) to backfill from the dashboard.", "error")
        return redirect(url_for("operations.page"))
    try:
        since = date.fromisoformat(request.form.get("since", ""))
        raw_until = request.form.get("until", "")
        until = date.fromisoformat(raw_until) if raw_until else None
    except ValueError:
        flash("Dates are YYYY-MM-DD.", "error")
        return redirect(url_for("operations.page"))
    modality = (request.form.get("modality") or "CT").strip().upper()[:16]
    if not _backfill.acquire(blocking=False):
        flash("A backfill is running already; see the audit log.", "error")
        return redirect(url_for("operations.page"))
    who, remote = current_user.username, request.remote_addr or ""
    span = f"{since}..{until or ''} {modality}"
    with session_scope(s.database_url) as db:
        audit.record(db, who, "backfill.start", s.backfill_source, remote=remote, span=span)

    def run() -> None:
        from ingest.backfill import BackfillError, backfill

        source = parse_destinations(s.backfill_source)[0]
        try:
            summary = backfill(s, source, since, until, modality)
            outcome, detail = ("ok" if not summary.failed else "failed"), summary.line()
        except (BackfillError, OSError) as exc:
            outcome, detail = "failed", str(exc)
        finally:
            _backfill.release()
        with session_scope(s.database_url) as db:
            audit.record(
                db,
                who,
                "backfill.done",
                s.backfill_source,
                outcome=outcome,
                span=span,
                summary=detail[:500],
            )

    threading.Thread(target=run, name="backfill", daemon=True).start()
    flash(f"Backfill of {span} from {s.backfill_source} started; the audit log shows its end.")
    return redirect(url_for("operations.page"))


@bp.route("/deliveries/<int(max=2147483647):delivery_id>/cancel", methods=["POST"])
@login_required
def cancel(delivery_id: int) -> Any:
    admin_required()
    with session_scope(settings().database_url) as db:
        row = db.get(Delivery, delivery_id)
        if row is None:
            abort(404, "No such delivery.")
        if lifecycle.cancel_delivery(db, delivery_id, utcnow()):
            audit.record(
                db,
                current_user.username,
                "report.cancel",
                row.destination,
                remote=request.remote_addr or "",
                delivery=delivery_id,
            )
            flash(f"Delivery {delivery_id} taken out of the outbox.")
        else:
            flash("An attempt is running now, or it was delivered: nothing cancelled.", "error")
    return redirect(url_for("operations.page"))
