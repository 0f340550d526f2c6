"""Readers' reviews and the AI measured against them: API, page, audit, figures, CSV."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import session_scope
from core.models import AuditEvent, Review, Study, StudyState, User, utcnow
from core.settings import Settings
from core.users import create_token, create_user
from tests.test_web import csrf_token
from web.reviews import performance, reference_call

pytest_plugins = ["tests.test_web"]  # its settings, app, client, reader and study fixtures
UID = "1.2.826.0.1.3680043.10.1404.77"


def bearer(settings: Settings, user: str) -> dict[str, str]:
    with session_scope(settings.database_url) as db:
        return {"Authorization": f"Bearer {create_token(db, user)}"}


def test_a_read_is_created_then_edited_one_per_user_and_audited(
    client: FlaskClient, settings: Settings, study: int
) -> None:
    auth = bearer(settings, "reader")
    url = f"/api/studies/{UID}/reviews"
    r = client.post(url, json={"call": "covid", "agree": True, "comment": "GGO"}, headers=auth)
    assert r.status_code == 201, r.json
    assert r.json["call"] == "covid" and r.json["ai_verdict"] == "Present"
    assert r.json["ai_probability"] == 0.91 and r.json["user"] == "reader"
    r = client.post(url, json={"call": "pneumonia", "agree": False}, headers=auth)
    assert r.status_code == 200 and r.json["call"] == "pneumonia"
    with session_scope(settings.database_url) as db:
        assert len(db.scalars(select(Review)).all()) == 1  # edited, not added
        actions = db.scalars(
            select(AuditEvent.action).where(AuditEvent.action.like("review.%"))
        ).all()
        assert actions == ["review.create", "review.update"]
    detail = client.get(f"/api/studies/{UID}", headers=auth).json
    assert [(v["user"], v["call"], v["agree"]) for v in detail["reviews"]] == [
        ("reader", "pneumonia", False)
    ]


@pytest.mark.parametrize(
    "body,message",
    [
        ({"call": "maybe", "agree": True}, "call must be one of"),
        ({"call": "covid"}, "agree must be true or false"),
        ({"call": "covid", "agree": "perhaps"}, "agree must be true or false"),
        ({"call": "covid", "agree": True, "comment": "x" * 2001}, "limited to 2000"),
        ([1, 2], "send an object"),
    ],
)
def test_a_bad_read_is_refused_with_the_reason(
    client: FlaskClient, settings: Settings, study: int, body: object, message: str
) -> None:
    r = client.post(f"/api/studies/{UID}/reviews", json=body, headers=bearer(settings, "reader"))
    assert r.status_code == 400 and message in r.get_data(as_text=True)


def test_a_read_of_no_study_is_404(client: FlaskClient, settings: Settings) -> None:
    r = client.post(
        "/api/studies/9.9.9/reviews",
        json={"call": "covid", "agree": True},
        headers=bearer(settings, "reader"),
    )
    assert r.status_code == 404


def test_the_study_page_form_records_and_shows_the_read(reader: FlaskClient, study: int) -> None:
    token = csrf_token(reader, f"/studies/{UID}")
    r = reader.post(
        f"/studies/{UID}/review",
        data={
            "csrf_token": token,
            "call": "normal",
            "agree": "false",
            "comment": "<b>no</b>",
        },
        follow_redirects=True,
    )
    html = r.get_data(as_text=True)
    assert "Review saved." in html and "&lt;b&gt;no&lt;/b&gt;" in html
    assert "Update your read" in html
    assert reader.post(f"/studies/{UID}/review", data={"call": "covid"}).status_code == 400


def add_read(
    settings: Settings,
    uid: str,
    user: str,
    call: str,
    verdict: str,
    probability: float,
    model: str = "m-1",
    days_ago: int = 0,
) -> None:
    with session_scope(settings.database_url) as db:
        study = db.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is None:
            study = Study(study_instance_uid=uid, state=StudyState.DONE)
            db.add(study)
            db.flush()
        reader = db.scalar(select(User).where(User.username == user))
        if reader is None:
            reader = create_user(db, user, "a good password")
        when = utcnow() - timedelta(days=days_ago)
        db.add(
            Review(
                study_id=study.id,
                user_id=reader.id,
                call=call,
                agree=(call == "covid") == (verdict == "Present"),
                comment="",
                ai_verdict=verdict,
                ai_probability=probability,
                model_version=model,
                created_at=when,
                updated_at=when,
            )
        )


def test_performance_on_a_known_set(settings: Settings, study: int) -> None:
    """Four reader-positive studies (AI: 3 Present, 1 Absent), three reader-negative (AI: 2
    Absent, 1 Indeterminate), one tie (left out): sensitivity 3/4, specificity 2/2."""
    cases = [
        ("1.1", "covid", "Present", 0.9),
        ("1.2", "covid", "Present", 0.8),
        ("1.3", "covid", "Present", 0.7),
        ("1.4", "covid", "Absent", 0.2),
        ("1.5", "normal", "Absent", 0.1),
        ("1.6", "pneumonia", "Absent", 0.3),
        ("1.7", "normal", "Indeterminate", 0.5),
    ]
    for uid, call, verdict, p in cases:
        add_read(settings, uid, "ann", call, verdict, p)
    add_read(settings, "1.8", "ann", "covid", "Present", 0.9, model="m-2", days_ago=40)
    add_read(settings, "1.8", "bob", "normal", "Present", 0.9, model="m-2", days_ago=40)
    with session_scope(settings.database_url) as db:
        p = performance(db)
    assert p["reviews"] == 9 and p["reviewed_studies"] == 8 and p["without_reference"] == 1
    overall = p["overall"]
    assert overall["studies"] == 7 and overall["indeterminate"] == 1
    assert (overall["sensitivity"]["k"], overall["sensitivity"]["n"]) == (3, 4)
    assert (overall["specificity"]["k"], overall["specificity"]["n"]) == (2, 2)
    low, high = overall["sensitivity"]["ci95"]
    assert low == pytest.approx(0.301, abs=0.001) and high == pytest.approx(0.954, abs=0.001)
    assert overall["confusion"]["positive"] == {"Present": 3, "Absent": 1}
    assert p["agreement"]["k"] == 8 - 1  # bob disagreed; ann agreed with every call but 1.4's
    assert set(p["per_model"]) == {"m-1"}  # the tied study has no reference
    assert sum(b["count"] for b in overall["reliability"]) == 7
    assert reference_call(["covid", "covid", "normal"]) == "positive"
    assert reference_call(["indeterminate"]) is None


def test_performance_page_api_and_csv(reader: FlaskClient, settings: Settings, study: int) -> None:
    add_read(settings, "2.1", "ann", "covid", "Present", 0.9)
    add_read(settings, "2.2", "ann", "normal", "Present", 0.7)
    with session_scope(settings.database_url) as db:
        s = db.scalar(select(Study).where(Study.study_instance_uid == "2.2"))
        assert s is not None
        r = db.scalar(select(Review).where(Review.study_id == s.id))
        assert r is not None
        r.comment = "=HYPERLINK(1)"
    body = reader.get("/api/performance").json
    assert body["overall"]["sensitivity"]["k"] == 1 and body["overall"]["specificity"]["n"] == 1
    html = reader.get("/performance").get_data(as_text=True)
    assert "Sensitivity" in html and "100.0% (1 of 1" in html and "0.0% (0 of 1" in html
    # the reliability plot: a point per probability bin at (mean probability, share positive)
    assert 'class="reliability-plot"' in html
    assert 'cx="180.0" cy="0.0"' in html and 'cx="140.0" cy="200.0"' in html
    export = reader.get("/api/reviews.csv")
    assert export.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.get_data(as_text=True))))
    assert [r["study_instance_uid"] for r in rows] == ["2.1", "2.2"]
    assert rows[1]["comment"] == "'=HYPERLINK(1)"  # not a formula in a spreadsheet
    assert "patient" not in export.get_data(as_text=True).lower()


def test_reads_need_a_login(client: FlaskClient, study: int) -> None:
    assert client.get("/performance").status_code == 302
    assert client.get("/api/performance").status_code == 401
    r = client.post(f"/api/studies/{UID}/reviews", json={"call": "covid", "agree": True})
    assert r.status_code in (400, 401)  # no session: no CSRF token and no user
