"""The results store's tables (SQLAlchemy 2, SQLite and PostgreSQL).

The store, not the broker, is the source of truth for a study's state: the broker only rings
the doorbell.  Alembic migrations in ``core/migrations`` create these tables; keep both in step
(``tests/test_store.py`` compares them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite would hand back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    NOT_ANALYSABLE = "not_analysable"
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"  # an admin took it out of the outbox (the operations page)


class UploadState(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    # generation counts arrivals of new instances after a study was queued: a worker that
    # finishes generation N while N+1 exists leaves the study queued for another run.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    processed_generation: Mapped[int] = mapped_column(Integer, default=-1)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    verdict: Mapped[str | None] = mapped_column(String(16), default=None)
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    slices_analysed: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    # lung segmentation and opacity measurements (classifier.quantify), and what the verdict
    # rested on; None before analysis or when the series could not be segmented
    quantification: Mapped[dict[str, object] | None] = mapped_column(JSON, default=None)
    # why the study may lack instances its sender meant to send (an aborted association, an
    # instance refused for disk trouble, the listener stopped mid-association); "" = complete
    incomplete_reason: Mapped[str] = mapped_column(Text, default="")
    incomplete_at: Mapped[datetime | None] = mapped_column(default=None)
    # associations that have stored into this study and not yet ended: it is not queued while
    # one is open (unless quiet for incomplete_grace_seconds)
    open_associations: Mapped[int] = mapped_column(Integer, default=0)
    # when its last open association ended with A-RELEASE, nothing refused: the sender said
    # it is done, so COVIDCT_RELEASED_STABLE_SECONDS after it may end the quiet time early
    released_at: Mapped[datetime | None] = mapped_column(default=None)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    reports: Mapped[list[Report]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    spool_path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Prediction(Base):
    """One probability: a slice (instance + frame), a whole study, or an upload."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # slice | study | upload
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    upload_id: Mapped[int | None] = mapped_column(ForeignKey("uploads.id"), index=True)
    frame: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[float | None] = mapped_column(Float, default=None)
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    label: Mapped[str] = mapped_column(String(16), default="")
    threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    skipped_reason: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_id", "model_version", "generation"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    predecessor_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    model_version: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="reports")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="report")
    objects: Mapped[list[ReportObject]] = relationship(back_populates="report")


class ReportObject(Base):
    """A DICOM object sent with a report: a key image (``sc``, Secondary Capture) or the key
    object selection (``ko``)."""

    __tablename__ = "report_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(512))

    report: Mapped[Report] = relationship(back_populates="objects")


class Delivery(Base):
    """The outbox: one row per report and destination, and one per study event and webhook
    (``event`` set: ``done``, ``not_analysable``, ``failed``; ``report_id`` only when the event
    made a report; ``payload`` the JSON sent, fixed when the event happened)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("report_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    event: Mapped[str] = mapped_column(String(16), default="")
    payload: Mapped[str | None] = mapped_column(Text, default=None)
    destination: Mapped[str] = mapped_column(String(512))
    # what goes there, of "sr", "sc", "ko" (comma-separated), fixed when the row is made
    objects: Mapped[str] = mapped_column(String(32), default="sr,sc,ko")
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    # held by a running attempt until then; an attempt that died leaves it set, and the next
    # attempt counts it in ``interrupted`` (the PACS may have the SR already: at-least-once)
    claimed_until: Mapped[datetime | None] = mapped_column(default=None)
    interrupted: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)

    report: Mapped[Report | None] = relationship(back_populates="deliveries")


class Upload(Base):
    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default=UploadState.QUEUED, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    label: Mapped[str | None] = mapped_column(String(16), default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WorkerProcess(Base):
    """A live worker says so every ``heartbeat_seconds``; /readyz reads it."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # host:pid
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Lease(Base):
    """A named duty that one process at a time performs (the sweeper): held by ``holder``
    until ``expires_at``, renewed by the holder, taken over once it has expired."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column()


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # a browser session carries the version it began under; logging out (or a password
    # change, or disabling the user) moves it on, which ends every session at once
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ApiToken(Base):
    """A bearer token; only its SHA-256 is kept, the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Review(Base):
    """A radiologist's read of a study, beside what the AI said when they read it: one per
    user and study, editable (every change audited)."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("study_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    call: Mapped[str] = mapped_column(String(16))  # covid | pneumonia | normal | indeterminate
    agree: Mapped[bool] = mapped_column(Boolean)
    comment: Mapped[str] = mapped_column(Text, default="")
    # the AI's answer the reader saw (a re-run may change the study's own)
    ai_verdict: Mapped[str | None] = mapped_column(String(16), default=None)
    ai_probability: Mapped[float | None] = mapped_column(Float, default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class AuditEvent(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # user name, AE title or "system"
    action: Mapped[str] = mapped_column(String(64), index=True)
    object: Mapped[str] = mapped_column(String(128), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    remote: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
