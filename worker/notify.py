"""Webhooks: a signed JSON POST to every ``COVIDCT_WEBHOOK_URLS`` when a study is done, not
analysable or failed, through the outbox (the same rows, retries and failed state as reports).

The body is fixed when the event happens (:func:`enqueue`, in the transaction that records the
event), so a retry sends the same bytes.  Headers: ``X-Covidct-Event`` (``study.done``,
``study.not_analysable``, ``study.failed``), ``X-Covidct-Delivery`` (the outbox row: a
receiver that saw it already can ignore a re-send), and ``X-Covidct-Signature:
sha256=<hex>``, the HMAC-SHA256 of the body under ``COVIDCT_WEBHOOK_SECRET``.  A 2xx answer
delivers it; anything else is retried.  Timeouts as for DICOMweb.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Delivery, Report, Study, utcnow
from core.settings import Settings
from worker import hl7out
from worker.errors import DeliveryError


def payload(settings: Settings, study: Study, event: str) -> dict[str, object]:
    base = settings.public_url or f"http://{settings.web_host}:{settings.web_port}"
    return {
        "event": f"study.{event}",
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "state": study.state,
        "verdict": study.verdict,
        "probability": study.probability,
        "reason": study.state_reason,
        "model_version": study.model_version,
        "study_url": f"{base}/studies/{study.study_instance_uid}",
        "at": utcnow().isoformat(timespec="seconds"),
        "notice": hl7out.NOTICE,
    }


def enqueue(s: Session, settings: Settings, study_id: int, event: str) -> None:
    """One outbox row per webhook URL for this event of the study, and for a finished study
    one per HL7 destination (:mod:`worker.hl7out`); none configured: none."""
    if not settings.webhook_urls and not (event == "done" and settings.hl7_destinations):
        return
    s.flush()
    # the event's UPDATE ran in this session: read the row as it is now, not as loaded before
    study = s.get(Study, study_id, populate_existing=True)
    if study is None:
        return
    report_id = None
    if event == "done":
        report_id = s.scalar(
            select(Report.id)
            .where(Report.study_id == study_id)
            .order_by(Report.generation.desc(), Report.id.desc())
            .limit(1)
        )
    body = json.dumps(payload(settings, study, event), sort_keys=True)
    targets = [(url, body) for url in settings.webhook_urls]
    if event == "done":
        message = hl7out.oru_r01(settings, study)
        targets += [(hl7out.destination(a), message) for a in settings.hl7_destinations]
    for url, content in targets:
        s.add(
            Delivery(
                report_id=report_id,
                study_id=study_id,
                event=event,
                payload=content,
                destination=url,
                objects="",
            )
        )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(settings: Settings, url: str, event: str, delivery_id: int, body: str) -> None:
    """One POST; raise :class:`DeliveryError` unless the answer is 2xx."""
    data = body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "covidct",
        "X-Covidct-Event": f"study.{event}",
        "X-Covidct-Delivery": str(delivery_id),
        "X-Covidct-Signature": signature(settings.webhook_secret, data),
    }
    try:
        answer = requests.post(
            url,
            data=data,
            headers=headers,
            timeout=(settings.acse_timeout, settings.network_timeout),
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise DeliveryError(f"{url}: {exc.__class__.__name__}"[:300]) from None
    if not 200 <= answer.status_code < 300:
        raise DeliveryError(f"{url} answered HTTP {answer.status_code}")
