"""Celery tasks: they take ids, are idempotent, and store their failures with a reason.

The model is loaded once per worker process, lazily inside the first task (after the prefork
fork: TensorFlow hangs a child forked from a parent that ran a model).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from classifier.errors import ClassifierError, UnusableInputError
from classifier.inference import Classifier
from core import lifecycle
from core.db import dispose_engines, session_scope
from core.models import Delivery, DeliveryState, Prediction, Upload
from core.settings import Settings
from worker import notify
from worker.app import DELIVER_TASK, STUDY_TASK, UPLOAD_TASK, publish, ring
from worker.delivery import BUSY, deliver
from worker.pipeline import StudyBusy, analyse_study

logger = logging.getLogger(__name__)

_classifiers: dict[str, Classifier] = {}

# Every task: idempotent, acknowledged after it ran, re-queued if its worker process dies,
# retried with backoff only for transient database errors: 1, 2, 4, 8, 16 s, then every 30 s,
# 12 times in all (about 4 minutes of outage) before the task gives up.
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "shared": False,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "retry_jitter": False,
    "max_retries": 12,
}


def get_classifier(settings: Settings) -> Classifier:
    key = str(settings.model_path)
    if key not in _classifiers:
        _classifiers[key] = Classifier(settings.model_path, runtime=settings.model_runtime)
        logger.info("loaded model %s (%s)", _classifiers[key].version, _classifiers[key].runtime)
    return _classifiers[key]


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    dispose_engines()  # never share pooled connections across a fork


def _fail_study(settings: Settings, study_id: int, reason: str) -> None:
    with session_scope(settings.database_url) as s:
        if lifecycle.fail_study(s, study_id, reason):
            notify.enqueue(s, settings, study_id, "failed")


def send_pending_deliveries(app: Celery, settings: Settings, study_id: int) -> int:
    """Publish a study's new outbox rows (its report's, its notifications) now rather than
    at the next sweep."""
    with session_scope(settings.database_url) as s:
        ids = s.scalars(
            select(Delivery.id).where(
                Delivery.study_id == study_id,
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at.is_(None),
            )
        ).all()
    send = lambda task, obj_id: publish(app, task, obj_id)  # noqa: E731
    return sum(ring(settings, DELIVER_TASK, delivery_id, send) for delivery_id in ids)


def register_tasks(app: Celery) -> None:
    settings: Settings = app.conf.covidct_settings

    @worker_process_init.connect(weak=False)
    def _load_model(**_: Any) -> None:
        """Load the model in each prefork child right after the fork, not at the first task."""
        try:
            get_classifier(settings)
        except ClassifierError:
            logger.exception("cannot load the model; tasks will fail with the reason")

    @app.task(name=STUDY_TASK, **TASK_OPTIONS)
    def analyse_study_task(self: Task, study_id: int) -> str:
        try:
            outcome = analyse_study(settings, study_id, get_classifier(settings))
        except StudyBusy as exc:
            raise self.retry(countdown=exc.retry_in, exc=exc, max_retries=20) from exc
        except OperationalError:
            raise
        except SoftTimeLimitExceeded:
            _fail_study(settings, study_id, "time limit exceeded")
            raise
        except (ClassifierError, OSError, ValueError) as exc:
            logger.exception("study id %d failed", study_id)
            _fail_study(settings, study_id, f"{exc.__class__.__name__}: {exc}"[:2000])
            send_pending_deliveries(app, settings, study_id)  # its notifications, now
            return "failed"
        except Exception as exc:
            logger.exception("study id %d failed unexpectedly", study_id)
            _fail_study(
                settings, study_id, f"internal error: {exc.__class__.__name__}: {exc}"[:2000]
            )
            raise
        send_pending_deliveries(app, settings, study_id)
        return outcome.state

    @app.task(name=UPLOAD_TASK, **TASK_OPTIONS)
    def analyse_upload_task(self: Task, upload_id: int) -> str:
        return analyse_upload(settings, upload_id, get_classifier(settings))

    @app.task(name=DELIVER_TASK, **TASK_OPTIONS)
    def deliver_task(self: Task, delivery_id: int) -> str:
        state = deliver(settings, delivery_id)
        if state == BUSY:  # another attempt holds it, or held it and died: its lease decides
            raise self.retry(countdown=settings.heartbeat_seconds, max_retries=60)
        return state


def analyse_upload(settings: Settings, upload_id: int, classifier: Classifier) -> str:
    from classifier.preprocess import to_model_input

    with session_scope(settings.database_url) as s:
        up = s.get(Upload, upload_id)
        if up is None:
            return "missing"
        if not lifecycle.claim_upload(s, upload_id):
            return str(up.state)
        path = Path(up.path)
    try:
        arr = to_model_input(path, max_pixels=settings.max_upload_pixels)
        (pred,) = classifier.predict(arr[None])
    except UnusableInputError as exc:
        with session_scope(settings.database_url) as s:
            lifecycle.fail_upload(s, upload_id, str(exc))
        return "failed"
    with session_scope(settings.database_url) as s:
        if lifecycle.finish_upload(
            s,
            upload_id,
            probability=pred.probability,
            label=pred.label,
            model_version=classifier.version,
        ):  # the threshold it was called against, for the page and the API
            s.add(
                Prediction(
                    kind="upload",
                    upload_id=upload_id,
                    probability=pred.probability,
                    label=pred.label,
                    threshold=classifier.threshold,
                    model_version=classifier.version,
                )
            )
    return "done"


def create_app(settings: Settings) -> Celery:
    """The Celery app with covidct's tasks registered (what `covidct worker` runs)."""
    from worker.app import make_celery

    app = make_celery(settings)
    register_tasks(app)
    return app


__all__ = ["create_app", "register_tasks", "UPLOAD_TASK", "STUDY_TASK"]
