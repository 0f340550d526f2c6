"""The states of studies, uploads and deliveries, and the only code that moves them.

Each transition is one UPDATE whose WHERE names the states the row may leave (compare-and-set):
of two processes racing for a row, one moves it and the other is told it did not.  Every
function returns whether it moved the row.  They take the caller's session or connection, so a
transition and what goes with it (an audit line, the instance that caused it) commit together.

Study::

    receiving --queue_study--> queued --claim_study--> processing --finish_study--> done
                                 ^                       |      \\--finish_study--> not_analysable
                                 |--requeue_stale_study--|       \\--fail_study---> failed
    done | not_analysable | failed --rerun_study--> queued
    any state but receiving --reopen_study--> receiving   (new instances; generation + 1)

Upload:   queued --claim_upload--> processing --finish_upload--> done | failed
Delivery: pending --record_attempt--> delivered | pending (backed off) | failed;
          delivered | failed | pending and unclaimed --resend_delivery--> pending

The doorbell (a Celery message) only says "look at this row": :func:`rung` stamps when it was
rung, :func:`missed` marks a row whose message could not be sent as due, and the sweeper rings
again for every row that is due.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Result
from sqlalchemy.sql import ColumnElement, Executable

from core.models import (
    Delivery,
    DeliveryState,
    Study,
    StudyState,
    Upload,
    UploadState,
    utcnow,
)


class Executor(Protocol):
    """A Session or a Connection: what a transition runs its one statement on."""

    def execute(self, statement: Executable, /) -> Result:  # pragma: no cover - protocol
        ...


# A row whose doorbell could not be rung: rung "long ago", so the next sweep rings it.
NOT_RUNG = datetime(1970, 1, 1, tzinfo=UTC)

FINISHED = (StudyState.DONE, StudyState.NOT_ANALYSABLE, StudyState.FAILED)


def _moved(s: Executor, statement: Executable) -> bool:
    return s.execute(statement).rowcount == 1  # type: ignore[attr-defined]


# --- studies ------------------------------------------------------------------------------


def reopen_study(s: Executor, study_id: int, now: datetime, reason: str) -> bool:
    """Back to receiving with a new generation: instances arrived after the study left
    receiving, or its sender completed it.  A worker on the old generation stores nothing."""
    return _moved(
        s,
        update(Study)
        .where(Study.id == study_id, Study.state != StudyState.RECEIVING)
        .values(
            state=StudyState.RECEIVING,
            generation=Study.generation + 1,
            state_reason=reason,
            last_instance_at=now,
        ),
    )


def released_quiet(released_before: datetime) -> ColumnElement[bool]:
    """The sender released its last association after the last instance, before
    ``released_before``: the shorter quiet time after a release has passed."""
    return and_(
        Study.released_at.is_not(None),
        Study.released_at >= Study.last_instance_at,
        Study.released_at <= released_before,
    )


def queue_study(
    s: Executor,
    study_id: int,
    now: datetime,
    quiet_before: datetime | None = None,
    settled: bool | None = None,
    released_before: datetime | None = None,
) -> bool:
    """receiving -> queued, if no instance arrived after ``quiet_before`` (or, with
    ``released_before``, the sender released after its last instance and before that) and,
    when ``settled`` is given, its associations are (True) or are not (False) settled."""
    cond = and_(Study.id == study_id, Study.state == StudyState.RECEIVING)
    if quiet_before is not None and released_before is not None:
        cond = and_(
            cond, or_(Study.last_instance_at <= quiet_before, released_quiet(released_before))
        )
    elif quiet_before is not None:
        cond = and_(cond, Study.last_instance_at <= quiet_before)
    is_settled = and_(Study.open_associations == 0, Study.incomplete_reason == "")
    if settled is True:
        cond = and_(cond, is_settled)
    elif settled is False:
        cond = and_(cond, ~is_settled)
    return _moved(
        s, update(Study).where(cond).values(state=StudyState.QUEUED, queued_at=now, state_reason="")
    )


def _stale(stale_before: datetime) -> object:
    return or_(Study.heartbeat_at.is_(None), Study.heartbeat_at <= stale_before)


def requeue_stale_study(s: Executor, study_id: int, now: datetime, stale_before: datetime) -> bool:
    """processing -> queued when its worker has not renewed the lease since ``stale_before``
    (checked again here: a worker that renewed meanwhile keeps its study)."""
    return _moved(
        s,
        update(Study)
        .where(Study.id == study_id, Study.state == StudyState.PROCESSING, _stale(stale_before))
        .values(
            state=StudyState.QUEUED,
            queued_at=now,
            state_reason="worker stopped answering; queued again",
        ),
    )


def rerun_study(s: Executor, study_id: int, now: datetime) -> bool:
    """A finished study -> queued (an admin's re-run).  Refused while it is receiving,
    queued or processing: the run it would start is already coming."""
    return _moved(
        s,
        update(Study)
        .where(Study.id == study_id, Study.state.in_(FINISHED))
        .values(state=StudyState.QUEUED, queued_at=now, state_reason="re-run requested"),
    )


def claim_study(s: Executor, study_id: int, now: datetime, stale_before: datetime) -> bool:
    """queued, or processing by a dead worker -> processing, one more attempt: the attempt
    number is the claim's lease (worker/lease.py)."""
    return _moved(
        s,
        update(Study)
        .where(
            Study.id == study_id,
            or_(
                Study.state == StudyState.QUEUED,
                and_(Study.state == StudyState.PROCESSING, _stale(stale_before)),
            ),
        )
        .values(
            state=StudyState.PROCESSING,
            started_at=now,
            heartbeat_at=now,
            attempts=Study.attempts + 1,
            state_reason="",
        ),
    )


def finish_study(
    s: Executor,
    study_id: int,
    generation: int,
    attempt: int,
    state: StudyState,
    reason: str = "",
    **values: object,
) -> bool:
    """processing -> done or not_analysable, only for the claim that still holds it and only
    if no instance arrived meanwhile (then the new generation wins)."""
    if state not in (StudyState.DONE, StudyState.NOT_ANALYSABLE):
        raise ValueError(f"a run finishes done or not_analysable, not {state}")
    return _moved(
        s,
        update(Study)
        .where(
            Study.id == study_id,
            Study.state == StudyState.PROCESSING,
            Study.generation == generation,
            Study.attempts == attempt,
        )
        .values(
            state=state,
            state_reason=reason,
            finished_at=utcnow(),
            processed_generation=generation,
            **values,
        ),
    )


def fail_study(s: Executor, study_id: int, reason: str) -> bool:
    """processing -> failed, with the reason the dashboard shows."""
    return _moved(
        s,
        update(Study)
        .where(Study.id == study_id, Study.state == StudyState.PROCESSING)
        .values(state=StudyState.FAILED, state_reason=reason[:2000], finished_at=utcnow()),
    )


# --- uploads ------------------------------------------------------------------------------


def claim_upload(s: Executor, upload_id: int) -> bool:
    """queued (or processing by a worker that died) -> processing."""
    return _moved(
        s,
        update(Upload)
        .where(
            Upload.id == upload_id,
            Upload.state.in_((UploadState.QUEUED, UploadState.PROCESSING)),
        )
        .values(state=UploadState.PROCESSING),
    )


def finish_upload(s: Executor, upload_id: int, **values: object) -> bool:
    """processing -> done with the prediction."""
    return _moved(
        s,
        update(Upload)
        .where(Upload.id == upload_id, Upload.state == UploadState.PROCESSING)
        .values(state=UploadState.DONE, finished_at=utcnow(), **values),
    )


def fail_upload(s: Executor, upload_id: int, reason: str) -> bool:
    """processing -> failed (not an image the model can read)."""
    return _moved(
        s,
        update(Upload)
        .where(Upload.id == upload_id, Upload.state == UploadState.PROCESSING)
        .values(state=UploadState.FAILED, state_reason=reason[:2000], finished_at=utcnow()),
    )


# --- deliveries ---------------------------------------------------------------------------


def record_attempt(
    s: Executor, delivery_id: int, error: str, max_attempts: int, retry_base_seconds: float
) -> str | None:
    """One attempt's outcome: pending -> delivered, pending again after a backoff of
    ``retry_base_seconds * 2**(attempt - 1)``, or failed after ``max_attempts``.  Returns
    the new state, or None when the delivery was not pending (nothing written)."""
    row = s.execute(
        select(Delivery.attempts).where(
            Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING
        )
    ).first()
    if row is None:
        return None
    attempts = row[0] + 1
    now = utcnow()
    values: dict[str, object] = {"attempts": attempts, "claimed_until": None}
    if not error:
        state = DeliveryState.DELIVERED
        values.update(delivered_at=now, last_error="", next_attempt_at=None)
    elif attempts >= max_attempts:
        state = DeliveryState.FAILED
        values.update(last_error=error[:2000], next_attempt_at=None)
    else:
        state = DeliveryState.PENDING
        wait = retry_base_seconds * 2 ** (attempts - 1)
        values.update(last_error=error[:2000], next_attempt_at=now + timedelta(seconds=wait))
    moved = _moved(
        s,
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state == DeliveryState.PENDING,
            Delivery.attempts == row[0],
        )
        .values(state=state, **values),
    )
    return str(state) if moved else None


def _idle_pending(now: datetime) -> ColumnElement[bool]:
    """Pending, and no attempt holds it (its claim, if any, has lapsed)."""
    return and_(
        Delivery.state == DeliveryState.PENDING,
        or_(Delivery.claimed_until.is_(None), Delivery.claimed_until <= now),
    )


def resend_delivery(s: Executor, delivery_id: int, now: datetime) -> bool:
    """Back to the outbox with its attempts reset (the dashboard's re-send): from delivered,
    failed or cancelled, or pending while no attempt holds it (send now instead of after the
    backoff)."""
    return _moved(
        s,
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            or_(
                Delivery.state.in_(
                    (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.CANCELLED)
                ),
                _idle_pending(now),
            ),
        )
        .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=None, claimed_until=None),
    )


def cancel_delivery(s: Executor, delivery_id: int, now: datetime) -> bool:
    """Out of the outbox for good (the operations page's cancel): from failed, or pending
    while no attempt holds it; a re-send brings it back."""
    return _moved(
        s,
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            or_(
                Delivery.state == DeliveryState.FAILED,
                _idle_pending(now),
            ),
        )
        .values(state=DeliveryState.CANCELLED, next_attempt_at=None, claimed_until=None),
    )


# --- the doorbell -------------------------------------------------------------------------


def rung(s: Executor, kind: str, obj_id: int, now: datetime, hold_seconds: float) -> None:
    """Stamp a row's doorbell as rung now.  A delivery is held off for ``hold_seconds`` (its
    task sets the real next attempt); a study or upload is rung again by the sweeper when
    its message has not been taken after its interval."""
    _stamp(s, kind, obj_id, rung_at=now, next_attempt_at=now + timedelta(seconds=hold_seconds))


def missed(s: Executor, kind: str, obj_id: int, now: datetime) -> None:
    """The message could not be sent (the broker is down): the row is due at the next sweep."""
    _stamp(s, kind, obj_id, rung_at=NOT_RUNG, next_attempt_at=now)


def _stamp(
    s: Executor, kind: str, obj_id: int, rung_at: datetime, next_attempt_at: datetime
) -> None:
    if kind == "study":
        statement = (
            update(Study)
            .where(Study.id == obj_id, Study.state == StudyState.QUEUED)
            .values(queued_at=rung_at)
        )
    elif kind == "upload":
        statement = update(Upload).where(Upload.id == obj_id).values(queued_at=rung_at)
    elif kind == "delivery":
        statement = (
            update(Delivery)
            .where(Delivery.id == obj_id, Delivery.state == DeliveryState.PENDING)
            .values(next_attempt_at=next_attempt_at)
        )
    else:
        raise ValueError(f"no doorbell for {kind!r}")
    s.execute(statement)
