"""The operations page (admins only): health, the DICOM node, destinations with their last
success and failure, the outbox with re-send and cancel, the audit log with filters."""

from __future__ import annotations

from dataclasses import replace

from flask import Flask
from sqlalchemy import select

from core import audit
from core.db import session_scope
from core.models import AuditEvent, Delivery, DeliveryState, Report, Study, StudyState, utcnow
from core.settings import Settings
from core.values import destinations
from tests.test_web import csrf_token, login
from web.app import create_app

pytest_plugins = ["tests.test_web"]  # its settings fixture

PACS = "PACS@10.0.0.5:104"
ARCHIVE = "https://archive.example.org/dicom-web"


def with_outbox(settings: Settings) -> dict[str, int]:
    """A study whose report went to the PACS and failed at the archive."""
    ids = {}
    with session_scope(settings.database_url) as s:
        st = Study(study_instance_uid="1.2.3.4", patient_name="<b>Doe</b>", state=StudyState.DONE)
        s.add(st)
        s.flush()
        report = Report(
            study_id=st.id,
            sop_instance_uid="1.2.3.4.9",
            series_instance_uid="1.2.3.4.8",
            model_version="m",
            path="/nonexistent/sr.dcm",
        )
        s.add(report)
        s.flush()
        ok = Delivery(
            report_id=report.id,
            destination=PACS,
            state=DeliveryState.DELIVERED,
            attempts=1,
            delivered_at=utcnow(),
        )
        bad = Delivery(
            report_id=report.id,
            destination=ARCHIVE,
            state=DeliveryState.FAILED,
            attempts=6,
            last_error=f"{ARCHIVE} answered HTTP 503",
        )
        s.add_all([ok, bad])
        s.flush()
        ids["ok"], ids["bad"] = ok.id, bad.id
        audit.record(
            s, "worker", "report.export", ARCHIVE, outcome="failed", error="answered HTTP 503"
        )
    return ids


def admin_app(settings: Settings) -> Flask:
    configured = replace(
        settings,
        destinations=destinations(f"{PACS},{ARCHIVE}?objects=sr"),
        webhook_urls=("https://ris.example/hooks",),
        webhook_secret="a shared secret of the hospital",
        hl7_destinations=("10.0.0.9:2575",),
    )
    return create_app(configured, {"TESTING": True})


def test_an_admin_sees_why_no_result_arrived(settings: Settings) -> None:
    ids = with_outbox(settings)
    client = admin_app(settings).test_client()
    login(client, "admin", "admin password")
    html = client.get("/admin/operations").get_data(as_text=True)
    for text in (
        "Health: ",
        "database",
        "COVIDCT",  # the node's AE title
        "DICOMweb (STOW-RS)",
        "DICOM (C-STORE)",
        "webhook (signed JSON)",
        "HL7 v2 ORU^R01 (MLLP)",
        "finished studies",  # what the HL7 destination gets
        "answered HTTP 503",  # the archive's last failure, from the audit log
        "/dicom-web/studies",
    ):
        assert text in html, text
    assert "<b>Doe</b>" not in html  # no patient data on the page, escaped or not
    row = html[html.index('<table class="destinations">') : html.index("<h2>Outbox")]
    assert row.count("<tr>") == 5  # header, the PACS, the archive, the webhook, the RIS
    outbox = html[html.index('<table class="outbox">') : html.index("<h2>Audit log")]
    assert f"<td>{ids['bad']}</td>" in outbox and f"<td>{ids['ok']}</td>" not in outbox

    token = csrf_token(client, "/admin/operations")
    r = client.post(f"/admin/deliveries/{ids['bad']}/cancel", data={"csrf_token": token})
    assert r.status_code == 302
    with session_scope(settings.database_url) as s:
        assert s.get(Delivery, ids["bad"]).state == DeliveryState.CANCELLED  # type: ignore[union-attr]
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "report.cancel"))
        assert event is not None and event.actor == "admin" and event.object == ARCHIVE
    # the study's report counts as delivered: the cancelled delivery is set aside
    api = client.get("/api/studies/1.2.3.4").json
    assert api["report_state"] == "delivered"

    r = client.post(
        f"/deliveries/{ids['bad']}/resend", data={"csrf_token": token, "back": "operations"}
    )
    assert r.status_code == 302 and r.headers["Location"].endswith("/admin/operations")
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, ids["bad"])
        assert row is not None and row.state == DeliveryState.PENDING and row.attempts == 0


def test_the_audit_log_filters(settings: Settings) -> None:
    with_outbox(settings)
    client = admin_app(settings).test_client()
    login(client, "admin", "admin password")
    html = client.get("/admin/operations?actor=worker&action=report.&outcome=failed").get_data(
        as_text=True
    )
    audit_table = html[html.index('<table class="audit">') :]
    assert "report.export" in audit_table and "login" not in audit_table
    html = client.get("/admin/operations?action=nothing.like.this").get_data(as_text=True)
    assert "No event matches." in html


def test_readers_are_refused(settings: Settings) -> None:
    client = admin_app(settings).test_client()
    login(client)
    assert client.get("/admin/operations").status_code == 403
    token = csrf_token(client, "/")
    assert client.post("/admin/deliveries/1/cancel", data={"csrf_token": token}).status_code == 403
