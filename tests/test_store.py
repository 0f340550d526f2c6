"""The results store on SQLite and PostgreSQL: migrations, round-trips, model/migration sync."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from core import audit
from core.db import current_revision, get_engine, session_scope, upgrade
from core.models import (
    AuditEvent,
    Base,
    Delivery,
    DeliveryState,
    Instance,
    Prediction,
    Report,
    Study,
    StudyState,
    Upload,
    User,
)
from core.users import UserError, authenticate, create_token, create_user, user_for_token

pytestmark = pytest.mark.integration

TABLES = {
    "studies",
    "instances",
    "predictions",
    "reports",
    "deliveries",
    "leases",
    "uploads",
    "users",
    "api_tokens",
    "audit_log",
    "workers",
    "reviews",
    "report_objects",
    "alembic_version",
}


def test_migrations_create_every_table(db_url: str) -> None:
    assert current_revision(db_url) == "0010"
    assert set(inspect(get_engine(db_url)).get_table_names()) == TABLES
    upgrade(db_url)  # idempotent
    assert current_revision(db_url) == "0010"


def test_models_and_migrations_agree(db_url: str) -> None:
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_study_round_trip(db_url: str) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    with session_scope(db_url) as s:
        study = Study(
            study_instance_uid=uid,
            patient_id="P1",
            patient_name="Doe^Jane",
            accession_number="A1",
            study_date="20260101",
            modality="CT",
        )
        s.add(study)
        s.flush()
        inst = Instance(
            study_id=study.id,
            sop_instance_uid=uid + ".1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=uid + ".2",
            spool_path="spool/x.dcm",
            size_bytes=525_000,
        )
        s.add(inst)
        s.flush()
        s.add(
            Prediction(
                kind="slice",
                study_id=study.id,
                instance_id=inst.id,
                probability=0.8,
                label="COVID-19",
                threshold=0.5,
                model_version="m1",
            )
        )
        s.add(
            Prediction(
                kind="study",
                study_id=study.id,
                probability=0.7,
                label="COVID-19",
                threshold=0.5,
                model_version="m1",
            )
        )
        report = Report(
            study_id=study.id,
            sop_instance_uid=uid + ".9",
            series_instance_uid=uid + ".8",
            model_version="m1",
            path="reports/x.dcm",
        )
        s.add(report)
        s.flush()
        s.add(Delivery(report_id=report.id, destination="PACS@127.0.0.1:104"))
        audit.record(s, "PACS", "association", "127.0.0.1", detail_key="v")
    with session_scope(db_url) as s:
        got = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert got is not None
        assert got.state == StudyState.RECEIVING
        assert got.patient_name == "Doe^Jane"
        assert got.received_at.tzinfo is not None
        assert (datetime.now(UTC) - got.received_at).total_seconds() < 60
        assert [i.size_bytes for i in got.instances] == [525_000]
        preds = s.scalars(select(Prediction).where(Prediction.study_id == got.id)).all()
        assert sorted(p.kind for p in preds) == ["slice", "study"]
        (rep,) = got.reports
        assert rep.deliveries[0].state == DeliveryState.PENDING
        ev = s.scalar(select(AuditEvent))
        assert ev is not None and ev.detail == {"detail_key": "v"}


def test_duplicate_sop_instance_rejected(db_url: str) -> None:
    from sqlalchemy.exc import IntegrityError

    with session_scope(db_url) as s:
        st = Study(study_instance_uid="1.2.3")
        s.add(st)
        s.flush()
        s.add(
            Instance(
                study_id=st.id,
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2",
                series_instance_uid="1.2.3.5",
                spool_path="a",
            )
        )
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(
            Instance(
                study_id=1,
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2",
                series_instance_uid="1.2.3.5",
                spool_path="b",
            )
        )
    with session_scope(db_url) as s:
        assert len(s.scalars(select(Instance)).all()) == 1  # the failed transaction left nothing


def test_users_and_tokens(db_url: str) -> None:
    with session_scope(db_url) as s:
        create_user(s, "alice", "correct horse", admin=True)
        with pytest.raises(UserError, match="already exists"):
            create_user(s, "alice", "another password")
        with pytest.raises(UserError, match="at least"):
            create_user(s, "bob", "short")
        with pytest.raises(UserError, match="user name"):
            create_user(s, "<script>", "long enough pw")
        # the password policy: length, not only spaces, not a common password in any case
        for common in ("password1234", "Password1234", "qwerty 123456", "Leave Me Alone"):
            with pytest.raises(UserError, match="most common"):
                create_user(s, "carol", common)
        with pytest.raises(UserError, match="only spaces"):
            create_user(s, "carol", " " * 14)
        assert not s.scalar(select(User).where(User.username == "carol"))
    with session_scope(db_url) as s:
        user = s.scalar(select(User).where(User.username == "alice"))
        assert user is not None and user.password_hash.startswith("$argon2id$")
        assert authenticate(s, "alice", "correct horse") is not None
        assert authenticate(s, "alice", "wrong") is None
        assert authenticate(s, "nobody", "correct horse") is None
        token = create_token(s, "alice")
    with session_scope(db_url) as s:
        found = user_for_token(s, token)
        assert found is not None and found.username == "alice"
        assert user_for_token(s, token + "x") is None


def test_upload_round_trip(db_url: str) -> None:
    with session_scope(db_url) as s:
        s.add(
            Upload(
                filename="a.png",
                content_type="image/png",
                sha256="0" * 64,
                size_bytes=10,
                width=2,
                height=3,
                path="uploads/1.png",
            )
        )
    with session_scope(db_url) as s:
        up = s.scalar(select(Upload))
        assert up is not None and up.state == "queued" and up.probability is None


def test_both_recording_paths_store_the_same_rows(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The listener's plain-SQL path for SQLite (study exists, receiving) and the SQLAlchemy
    path store identical rows, timestamps included, and agree on duplicates."""
    from pathlib import Path

    from core.models import Instance
    from ingest import records
    from ingest.records import InstanceHeader, _record, _record_common_sqlite

    upgrade(db_url)
    now = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)
    head = InstanceHeader(
        "1.2.3", "1.2.3.4", "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )
    assert records.record_instance(db_url, head, Path("/spool/a.dcm"), 10, "PACS", now)
    later = now.replace(second=5)
    b = InstanceHeader(
        "1.2.3", "1.2.3.4", "1.2.3.4.2", head.sop_class_uid, head.transfer_syntax_uid
    )
    c = InstanceHeader(
        "1.2.3", "1.2.3.4", "1.2.3.4.3", head.sop_class_uid, head.transfer_syntax_uid
    )
    if db_url.startswith("sqlite"):
        assert _record_common_sqlite(db_url, b, Path("/spool/b.dcm"), 20, "PACS", later) is True
        assert _record_common_sqlite(db_url, b, Path("/spool/b.dcm"), 20, "PACS", later) is False
        assert (
            _record_common_sqlite(
                db_url,
                InstanceHeader("9.9", "9.9.1", "9.9.1.1", head.sop_class_uid, ""),
                Path("/x"),
                1,
                "",
                later,
            )
            is None
        )
    else:
        assert _record(db_url, b, Path("/spool/b.dcm"), 20, "PACS", later)
    assert _record(db_url, c, Path("/spool/c.dcm"), 20, "PACS", later)
    with session_scope(db_url) as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
        study = s.scalar(select(Study))
        assert study is not None
        assert study.instance_count == 3 and study.last_instance_at == later
        for uid in ("1.2.3.4.2", "1.2.3.4.3"):
            r = rows[uid]
            assert (r.study_id, r.size_bytes, r.calling_ae, r.received_at) == (
                study.id,
                20,
                "PACS",
                later,
            )
            assert (r.series_instance_uid, r.transfer_syntax_uid) == (
                "1.2.3.4",
                head.transfer_syntax_uid,
            )
    # and the same stored text: SQL compares these timestamps as stored (the sweeper does)
    with get_engine(db_url).connect() as conn:
        texts = dict(
            conn.exec_driver_sql(
                "SELECT sop_instance_uid, CAST(received_at AS TEXT) FROM instances"
            ).all()
        )
    assert texts["1.2.3.4.2"] == texts["1.2.3.4.3"]
