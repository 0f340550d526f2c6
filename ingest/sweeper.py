"""Study assembly and the sweeper: the results store decides what is queued, not the broker.

Every ``sweep_seconds`` the sweeper:

0. applies the listener's notes (``ingest.completeness``): instances written while the store
   was down are recorded, associations that closed meanwhile are settled;
1. queues each ``receiving`` study that has been quiet for ``stable_seconds`` with no
   association open and nothing missing (state -> ``queued``, then the task is published; if
   the broker is down the study stays queued and due, and the next sweep publishes it again,
   so a broker outage loses nothing); a study that may be incomplete (or whose association
   stayed open: its listener process died) is queued after ``incomplete_grace_seconds`` of
   quiet instead, so that the sender's retry can complete it first;
2. re-publishes a ``queued`` study whose message has waited ``requeue_seconds`` (a message lost
   by a transport, or a broker restarted without persistence) or could not be sent;
3. re-queues a ``processing`` study whose worker has not sent a heartbeat for
   ``task_stale_seconds`` (a worker killed mid-task);
4. re-publishes report deliveries that are due: never tried, backed off, or published
   ``redeliver_seconds`` ago and not taken (a lost message), unless an attempt holds their
   claim (a dead attempt's claim lapses ``task_stale_seconds`` after its last renewal);
5. re-publishes uploads still ``queued`` or ``processing`` ``redeliver_seconds`` after they
   were last published (broker down at upload, a lost message, a worker killed mid-upload;
   an upload's analysis takes well under a second and is idempotent).

One sweeper sweeps at a time, wherever it runs (the listener's first process, the
``covidct sweeper`` stage, another machine): it holds the ``sweeper`` lease in the results
store, renewed at every pass and taken over once it has expired (three sweeps, at least 10 s).
Between passes the holder looks every ``COMPLETION_POLL_SECONDS`` (0.25 s) for a study whose
quiet time has just ended and sweeps at once: a study is queued within that of its deadline,
not up to ``sweep_seconds`` later.  The first pass, which takes the lease, comes one period
after the start.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, or_, select

from core import lifecycle
from core.db import session_scope
from core.health import hold_lease, release_lease
from core.models import Delivery, DeliveryState, Study, StudyState, Upload, UploadState, utcnow
from core.settings import Settings
from ingest import completeness

if TYPE_CHECKING:
    from worker.app import Publisher

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    queued: int = 0
    requeued: int = 0
    recovered: int = 0
    deliveries: int = 0
    uploads: int = 0
    publish_failures: int = 0
    noted: int = 0


def celery_publisher(settings: Settings) -> Publisher:
    """Publish tasks on the settings' broker (the sweeper's doorbell)."""
    from worker.app import make_celery, publish

    app = make_celery(settings)

    def send(task: str, obj_id: int) -> None:
        publish(app, task, obj_id)

    return send


LEASE = "sweeper"  # one sweeper at a time, wherever the stages run
# how often the sweep's holder looks for a study whose quiet time has just ended: a study is
# queued within this of its deadline, not at the next SWEEP_SECONDS period
COMPLETION_POLL_SECONDS = 0.25


class Sweeper:
    def __init__(self, settings: Settings, publish: Publisher) -> None:
        self.settings = settings
        self.publish = publish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one pass ------------------------------------------------------------------------

    def sweep_once(self, now: datetime | None = None) -> SweepResult:
        from worker.app import DELIVER_TASK, STUDY_TASK, UPLOAD_TASK

        now = now or utcnow()
        s, url, result = self.settings, self.settings.database_url, SweepResult()
        result.noted = completeness.apply_notes(s)
        stable_before = now - timedelta(seconds=s.stable_seconds)
        released_before = now - timedelta(seconds=s.released_stable_seconds)
        grace_before = now - timedelta(seconds=s.incomplete_grace_seconds)
        stale_before = now - timedelta(seconds=s.task_stale_seconds)
        settled = and_(Study.open_associations == 0, Study.incomplete_reason == "")
        unsettled = or_(Study.open_associations > 0, Study.incomplete_reason != "")
        with session_scope(url) as session:
            ready = session.scalars(
                select(Study.id).where(
                    Study.state == StudyState.RECEIVING,
                    or_(
                        Study.last_instance_at <= stable_before,
                        lifecycle.released_quiet(released_before),
                    ),
                    settled,
                )
            ).all()
            overdue = session.scalars(
                select(Study.id).where(
                    Study.state == StudyState.RECEIVING,
                    Study.last_instance_at <= grace_before,
                    unsettled,
                )
            ).all()
            waiting = session.scalars(
                select(Study.id).where(
                    Study.state == StudyState.QUEUED,
                    or_(
                        Study.queued_at.is_(None),
                        Study.queued_at <= now - timedelta(seconds=s.requeue_seconds),
                    ),
                )
            ).all()
            stale = session.scalars(
                select(Study.id).where(
                    Study.state == StudyState.PROCESSING,
                    or_(Study.heartbeat_at.is_(None), Study.heartbeat_at <= stale_before),
                )
            ).all()
            due = session.scalars(
                select(Delivery.id).where(
                    Delivery.state == DeliveryState.PENDING,
                    or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until <= now),
                )
            ).all()

        with session_scope(url) as session:
            uploads = session.scalars(
                select(Upload.id).where(
                    Upload.state.in_((UploadState.QUEUED, UploadState.PROCESSING)),
                    Upload.queued_at <= now - timedelta(seconds=s.redeliver_seconds),
                )
            ).all()
        ring = lambda task, obj_id: self._ring(task, obj_id, now, result)  # noqa: E731
        result.uploads = sum(ring(UPLOAD_TASK, upload_id) for upload_id in uploads)
        for study_id in ready:
            with session_scope(url) as session:
                moved = lifecycle.queue_study(
                    session, study_id, now, stable_before, True, released_before
                )
            if moved:
                result.queued += 1
                ring(STUDY_TASK, study_id)
        for study_id in overdue:
            self._give_up_waiting(study_id, now)
            with session_scope(url) as session:
                moved = lifecycle.queue_study(session, study_id, now, grace_before)
            if moved:
                logger.warning("study id %d: analysed although it may be incomplete", study_id)
                result.queued += 1
                ring(STUDY_TASK, study_id)
        result.requeued = sum(ring(STUDY_TASK, study_id) for study_id in waiting)
        for study_id in stale:
            with session_scope(url) as session:
                moved = lifecycle.requeue_stale_study(session, study_id, now, stale_before)
            if moved:
                logger.warning("study id %d: worker lost, queued again", study_id)
                result.recovered += 1
                ring(STUDY_TASK, study_id)
        result.deliveries = sum(ring(DELIVER_TASK, delivery_id) for delivery_id in due)
        return result

    def _give_up_waiting(self, study_id: int, now: datetime) -> None:
        """An association still counted open after the grace belonged to a listener process
        that died: nothing will close it."""
        with session_scope(self.settings.database_url) as session:
            study = session.get(Study, study_id)
            if study is not None and study.open_associations > 0:
                study.open_associations = 0
                if not study.incomplete_reason:
                    study.incomplete_reason = "an association stayed open with nothing received"
                    study.incomplete_at = now

    def _ring(self, task: str, obj_id: int, now: datetime, result: SweepResult) -> bool:
        from worker.app import ring

        sent = ring(self.settings, task, obj_id, self.publish, now)
        result.publish_failures += not sent
        return sent

    # --- background thread --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def next_completion(self) -> datetime | None:
        """When the quiet time of the next settled ``receiving`` study ends, the shorter one
        after its sender's release included (None: no such study).  The sweep's holder looks
        every :data:`COMPLETION_POLL_SECONDS` and sweeps at that moment instead of at its next
        period."""
        settled = and_(
            Study.state == StudyState.RECEIVING,
            Study.open_associations == 0,
            Study.incomplete_reason == "",
        )
        with session_scope(self.settings.database_url) as session:
            last = session.scalar(select(func.min(Study.last_instance_at)).where(settled))
            released = session.scalar(
                select(func.min(Study.released_at)).where(
                    settled, Study.released_at >= Study.last_instance_at
                )
            )
        due = [
            t + timedelta(seconds=quiet)
            for t, quiet in (
                (last, self.settings.stable_seconds),
                (released, self.settings.released_stable_seconds),
            )
            if t is not None
        ]
        return min(due) if due else None

    def _run(self) -> None:
        # host:pid, and this sweeper's own mark: two sweepers of one process are two holders
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # held across three missed sweeps, and never shorter than 10 s
        ttl = max(10.0, 3 * self.settings.sweep_seconds)
        period = self.settings.sweep_seconds
        holding = False
        next_sweep = time.monotonic() + period  # the first pass takes the lease
        stuck: datetime | None = None  # a deadline a sweep has just failed to clear
        while not self._stop.wait(min(COMPLETION_POLL_SECONDS, period)):
            try:
                if time.monotonic() < next_sweep:
                    if not holding:
                        continue
                    due = self.next_completion()
                    if due is None or due > utcnow() or due == stuck:
                        continue
                next_sweep = time.monotonic() + period  # the first pass takes the lease
                held = hold_lease(self.settings, LEASE, holder, ttl)
                if held != holding:
                    logger.info("sweeper %s %s the sweep", holder, "takes" if held else "left")
                    holding = held
                if held:
                    self.sweep_once()
                    left = self.next_completion()
                    stuck = left if left is not None and left <= utcnow() else None
            except Exception as exc:
                logger.warning(
                    "sweep failed (%s: %s); trying again in %.1f s",
                    exc.__class__.__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                    period,
                )
        if holding:
            try:
                release_lease(self.settings, LEASE, holder)
            except Exception as exc:  # it expires on its own
                logger.warning("sweeper lease not released (%s): it expires", exc)


def run_sweeper(settings: Settings) -> int:
    """``covidct sweeper``: the sweep as a stage of its own, so that deliveries are retried
    and lost messages published again while the listener is down or stuck.  Holds the
    sweeper lease like the listener's sweeper thread: only one sweeps at a time."""
    import signal

    from core.db import upgrade

    upgrade(settings.database_url)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sweeper = Sweeper(settings, celery_publisher(settings))
    sweeper.start()
    logger.info("sweeping every %.1f s", settings.sweep_seconds)
    done.wait()
    sweeper.stop()
    return 0
