"""Every transition of core.lifecycle, on SQLite and PostgreSQL: it moves a row only from the
states it may leave, and says whether it moved it."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from core import lifecycle
from core.db import session_scope
from core.models import (
    Delivery,
    DeliveryState,
    Report,
    Study,
    StudyState,
    Upload,
    UploadState,
    utcnow,
)
from core.settings import load_settings
from ingest.sweeper import Sweeper

NOW = utcnow()
LONG_AGO = NOW - timedelta(hours=1)
ALL_STUDY = list(StudyState)


def add_study(url: str, state: StudyState, **values: object) -> int:
    """A study row in a given state (tests set up rows directly; the service never does)."""
    with session_scope(url) as s:
        study = Study(
            study_instance_uid=f"1.2.3.{len(str(values))}.{utcnow().timestamp()}",
            state=state,
            last_instance_at=values.pop("last_instance_at", LONG_AGO),
            **values,
        )
        s.add(study)
        s.flush()
        return study.id


def study(url: str, study_id: int) -> Study:
    with session_scope(url) as s:
        row = s.get(Study, study_id)
        assert row is not None
        s.expunge(row)
        return row


def moves(url: str, transition: object, *args: object, **kwargs: object) -> bool:
    with session_scope(url) as s:
        return bool(transition(s, *args, **kwargs))  # type: ignore[operator]


@pytest.mark.parametrize("state", ALL_STUDY)
def test_queue_study_only_from_receiving(db_url: str, state: StudyState) -> None:
    sid = add_study(db_url, state)
    moved = moves(db_url, lifecycle.queue_study, sid, NOW, NOW)
    assert moved == (state == StudyState.RECEIVING)
    after = study(db_url, sid)
    assert after.state == (StudyState.QUEUED if moved else state)
    if moved:
        assert after.queued_at == NOW


def test_queue_study_waits_for_quiet_and_settled(db_url: str) -> None:
    recent = add_study(db_url, StudyState.RECEIVING, last_instance_at=NOW)
    assert not moves(db_url, lifecycle.queue_study, recent, NOW, NOW - timedelta(seconds=10))
    open_assoc = add_study(db_url, StudyState.RECEIVING, open_associations=1)
    assert not moves(db_url, lifecycle.queue_study, open_assoc, NOW, NOW, settled=True)
    assert moves(db_url, lifecycle.queue_study, open_assoc, NOW, NOW, settled=False)
    settled = add_study(db_url, StudyState.RECEIVING)
    assert not moves(db_url, lifecycle.queue_study, settled, NOW, NOW, settled=False)


@pytest.mark.parametrize("state", ALL_STUDY)
def test_rerun_only_of_a_finished_study(db_url: str, state: StudyState) -> None:
    sid = add_study(db_url, state)
    moved = moves(db_url, lifecycle.rerun_study, sid, NOW)
    assert moved == (state in lifecycle.FINISHED)
    after = study(db_url, sid)
    assert after.state == (StudyState.QUEUED if moved else state)
    assert (after.state_reason == "re-run requested") == moved


@pytest.mark.parametrize("state", ALL_STUDY)
def test_claim_takes_a_queued_study_or_a_dead_workers(db_url: str, state: StudyState) -> None:
    dead = add_study(db_url, state, heartbeat_at=LONG_AGO, attempts=1)
    alive = add_study(db_url, state, heartbeat_at=NOW, attempts=1)
    stale_before = NOW - timedelta(seconds=10)
    dead_moved = moves(db_url, lifecycle.claim_study, dead, NOW, stale_before)
    alive_moved = moves(db_url, lifecycle.claim_study, alive, NOW, stale_before)
    assert dead_moved == (state in (StudyState.QUEUED, StudyState.PROCESSING))
    assert alive_moved == (state == StudyState.QUEUED)
    if dead_moved:
        after = study(db_url, dead)
        assert after.state == StudyState.PROCESSING and after.attempts == 2


def test_one_of_many_racing_claims_wins(db_url: str) -> None:
    sid = add_study(db_url, StudyState.QUEUED)
    results: list[bool] = []
    start = threading.Barrier(6)

    def take() -> None:
        start.wait()
        results.append(moves(db_url, lifecycle.claim_study, sid, utcnow(), LONG_AGO))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert study(db_url, sid).attempts == 1


@pytest.mark.parametrize("state", ALL_STUDY)
def test_requeue_only_a_stale_processing_study(db_url: str, state: StudyState) -> None:
    stale = add_study(db_url, state, heartbeat_at=LONG_AGO)
    renewed = add_study(db_url, state, heartbeat_at=NOW)
    stale_before = NOW - timedelta(seconds=10)
    moved = moves(db_url, lifecycle.requeue_stale_study, stale, NOW, stale_before)
    assert moved == (state == StudyState.PROCESSING)
    # a worker that renewed its lease between the sweeper's query and its update keeps it
    assert not moves(db_url, lifecycle.requeue_stale_study, renewed, NOW, stale_before)
    if moved:
        assert "worker stopped answering" in study(db_url, stale).state_reason


def test_finish_only_for_the_claim_that_holds_it(db_url: str) -> None:
    sid = add_study(db_url, StudyState.QUEUED)
    assert moves(db_url, lifecycle.claim_study, sid, NOW, LONG_AGO)
    taken = study(db_url, sid)
    gen, attempt = taken.generation, taken.attempts
    # another attempt's claim, an older generation: refused
    assert not moves(db_url, lifecycle.finish_study, sid, gen, attempt + 1, StudyState.DONE)
    assert not moves(db_url, lifecycle.finish_study, sid, gen - 1, attempt, StudyState.DONE)
    with pytest.raises(ValueError, match="not failed"):
        moves(db_url, lifecycle.finish_study, sid, gen, attempt, StudyState.FAILED)
    assert moves(
        db_url, lifecycle.finish_study, sid, gen, attempt, StudyState.DONE, verdict="Absent"
    )
    after = study(db_url, sid)
    assert after.state == StudyState.DONE and after.verdict == "Absent"
    assert after.processed_generation == gen
    assert not moves(db_url, lifecycle.finish_study, sid, gen, attempt, StudyState.DONE)


def test_new_instances_during_a_run_win_over_its_result(db_url: str) -> None:
    sid = add_study(db_url, StudyState.QUEUED)
    assert moves(db_url, lifecycle.claim_study, sid, NOW, LONG_AGO)
    taken = study(db_url, sid)
    assert moves(db_url, lifecycle.reopen_study, sid, NOW, "new instances")
    reopened = study(db_url, sid)
    assert reopened.state == StudyState.RECEIVING
    assert reopened.generation == taken.generation + 1
    assert not moves(
        db_url,
        lifecycle.finish_study,
        sid,
        taken.generation,
        taken.attempts,
        StudyState.DONE,
    )
    assert study(db_url, sid).state == StudyState.RECEIVING


@pytest.mark.parametrize("state", ALL_STUDY)
def test_reopen_from_every_state_but_receiving(db_url: str, state: StudyState) -> None:
    sid = add_study(db_url, state)
    moved = moves(db_url, lifecycle.reopen_study, sid, NOW, "the sender completed it")
    assert moved == (state != StudyState.RECEIVING)
    assert study(db_url, sid).generation == (1 if moved else 0)


@pytest.mark.parametrize("state", ALL_STUDY)
def test_fail_only_a_processing_study(db_url: str, state: StudyState) -> None:
    sid = add_study(db_url, state)
    moved = moves(db_url, lifecycle.fail_study, sid, "time limit exceeded")
    assert moved == (state == StudyState.PROCESSING)
    after = study(db_url, sid)
    assert after.state == (StudyState.FAILED if moved else state)


def add_upload(url: str, state: UploadState) -> int:
    with session_scope(url) as s:
        up = Upload(
            filename="a.png",
            content_type="image/png",
            sha256="0" * 64,
            size_bytes=1,
            width=1,
            height=1,
            path="a.png",
            state=state,
        )
        s.add(up)
        s.flush()
        return up.id


def upload_state(url: str, upload_id: int) -> str:
    with session_scope(url) as s:
        return str(s.scalar(select(Upload.state).where(Upload.id == upload_id)))


@pytest.mark.parametrize("state", list(UploadState))
def test_upload_transitions(db_url: str, state: UploadState) -> None:
    uid = add_upload(db_url, state)
    claimed = moves(db_url, lifecycle.claim_upload, uid)
    assert claimed == (state in (UploadState.QUEUED, UploadState.PROCESSING))
    if not claimed:
        assert not moves(db_url, lifecycle.finish_upload, uid, label="x")
        assert not moves(db_url, lifecycle.fail_upload, uid, "not an image")
        assert upload_state(db_url, uid) == state
        return
    assert moves(db_url, lifecycle.finish_upload, uid, probability=0.2, label="Absent")
    assert upload_state(db_url, uid) == UploadState.DONE
    assert not moves(db_url, lifecycle.fail_upload, uid, "too late")


def add_delivery(url: str, state: DeliveryState, **values: object) -> int:
    sid = add_study(url, StudyState.DONE)
    with session_scope(url) as s:
        report = Report(
            study_id=sid,
            sop_instance_uid=f"2.25.{sid}",
            series_instance_uid=f"2.25.{sid}.1",
            model_version="m",
            path="sr.dcm",
        )
        s.add(report)
        s.flush()
        row = Delivery(report_id=report.id, destination="PACS@127.0.0.1:1", state=state, **values)
        s.add(row)
        s.flush()
        return row.id


def delivery(url: str, delivery_id: int) -> Delivery:
    with session_scope(url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        s.expunge(row)
        return row


def test_attempts_back_off_then_fail(db_url: str) -> None:
    did = add_delivery(db_url, DeliveryState.PENDING)
    first = moves(db_url, lifecycle.record_attempt, did, "refused", 3, 10.0)
    row = delivery(db_url, did)
    assert first and row.state == DeliveryState.PENDING and row.attempts == 1
    assert row.next_attempt_at is not None
    assert 9 <= (row.next_attempt_at - utcnow()).total_seconds() <= 10
    with session_scope(db_url) as s:
        assert lifecycle.record_attempt(s, did, "refused", 3, 10.0) == DeliveryState.PENDING
        assert lifecycle.record_attempt(s, did, "refused", 3, 10.0) == DeliveryState.FAILED
        assert lifecycle.record_attempt(s, did, "", 3, 10.0) is None  # not pending: refused
    row = delivery(db_url, did)
    assert row.state == DeliveryState.FAILED and row.attempts == 3 and row.last_error == "refused"


def test_a_delivered_attempt(db_url: str) -> None:
    did = add_delivery(db_url, DeliveryState.PENDING, claimed_until=NOW + timedelta(seconds=9))
    with session_scope(db_url) as s:
        assert lifecycle.record_attempt(s, did, "", 3, 10.0) == DeliveryState.DELIVERED
    row = delivery(db_url, did)
    assert row.delivered_at is not None and row.claimed_until is None


@pytest.mark.parametrize(
    "state,claimed,moved",
    [
        (DeliveryState.FAILED, False, True),
        (DeliveryState.DELIVERED, False, True),
        (DeliveryState.PENDING, False, True),
        (DeliveryState.PENDING, True, False),  # an attempt is running: refused
        (DeliveryState.CANCELLED, False, True),
    ],
)
def test_resend(db_url: str, state: DeliveryState, claimed: bool, moved: bool) -> None:
    until = utcnow() + timedelta(seconds=30) if claimed else None
    did = add_delivery(db_url, state, attempts=3, claimed_until=until)
    assert moves(db_url, lifecycle.resend_delivery, did, utcnow()) == moved
    row = delivery(db_url, did)
    assert row.state == (DeliveryState.PENDING if moved else state)
    assert row.attempts == (0 if moved else 3)


@pytest.mark.parametrize(
    "state,claimed,moved",
    [
        (DeliveryState.FAILED, False, True),
        (DeliveryState.PENDING, False, True),
        (DeliveryState.PENDING, True, False),  # an attempt is running: refused
        (DeliveryState.DELIVERED, False, False),  # it arrived: nothing to take back
        (DeliveryState.CANCELLED, False, False),
    ],
)
def test_cancel(db_url: str, state: DeliveryState, claimed: bool, moved: bool) -> None:
    until = utcnow() + timedelta(seconds=30) if claimed else None
    did = add_delivery(db_url, state, attempts=2, claimed_until=until)
    assert moves(db_url, lifecycle.cancel_delivery, did, utcnow()) == moved
    row = delivery(db_url, did)
    assert row.state == (DeliveryState.CANCELLED if moved else state)
    assert row.attempts == 2


def test_a_missed_doorbell_is_rung_at_the_next_sweep(tmp_path: Path, db_url: str) -> None:
    """The broker is down when a re-run is requested: the study stays queued and due, and the
    sweeper publishes it at its next pass, not after requeue_seconds."""
    from worker.app import STUDY_TASK, ring

    settings = load_settings(
        {"COVIDCT_DATA_DIR": str(tmp_path / "var"), "COVIDCT_DATABASE_URL": db_url}
    )
    sid = add_study(db_url, StudyState.DONE)
    assert moves(db_url, lifecycle.rerun_study, sid, utcnow())

    def down(task: str, obj_id: int) -> None:
        raise ConnectionError("broker unavailable")

    assert not ring(settings, STUDY_TASK, sid, down)
    assert study(db_url, sid).queued_at == lifecycle.NOT_RUNG
    sent: list[tuple[str, int]] = []
    sweeper = Sweeper(settings, lambda task, obj_id: sent.append((task, obj_id)))
    assert sweeper.sweep_once().requeued == 1
    assert sent == [(STUDY_TASK, sid)]
    assert study(db_url, sid).queued_at > NOW
    assert sweeper.sweep_once().requeued == 0  # rung: not again before requeue_seconds
