"""The Celery application: broker, queues and delivery guarantees, built from the settings.

The broker is only the doorbell: the results store holds every study's state, and the sweeper
re-queues what a lost message or a dead worker left behind, so the embedded filesystem
transport (which loses a task whose worker dies) is as safe as Redis, only slower to notice.

Importing this module loads no model: TensorFlow must be started in the worker child after
the fork (see ``worker.tasks``), never in the parent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from celery import Celery

from core import lifecycle
from core.db import session_scope
from core.models import utcnow
from core.settings import Settings

logger = logging.getLogger(__name__)

STUDY_TASK = "covidct.analyse_study"
UPLOAD_TASK = "covidct.analyse_upload"
DELIVER_TASK = "covidct.deliver_report"
QUEUES = {"studies": STUDY_TASK, "uploads": UPLOAD_TASK, "exports": DELIVER_TASK}
DOORBELLS = {STUDY_TASK: "study", UPLOAD_TASK: "upload", DELIVER_TASK: "delivery"}

SOFT_TIME_LIMIT = 1500  # seconds; measured: a 300-slice study takes 1.1-2.1 s (bench/pipeline.py)
TIME_LIMIT = 1800
VISIBILITY_TIMEOUT = 3600  # Redis: must exceed TIME_LIMIT or a long task runs twice


def broker_options(settings: Settings) -> dict:
    if settings.broker_is_embedded:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # kombu's default is "control" in the working directory: keep it in the data dir
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    return {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "max_retries": 1,
    }


PROC_ALIVE_TIMEOUT = 120.0


def make_celery(settings: Settings) -> Celery:
    # the embedded queue has no host; naming one keeps kombu from warning at every start
    url = "filesystem://localhost//" if settings.broker_is_embedded else settings.broker_url
    app = Celery("covidct", broker=url, set_as_current=False)
    if settings.broker_is_embedded:  # message files renamed into place whole (fs_transport)
        app.conf.broker_transport = "worker.fs_transport:Transport"
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_soft_time_limit=SOFT_TIME_LIMIT,
        task_time_limit=TIME_LIMIT,
        task_default_queue="studies",
        task_routes={task: {"queue": queue} for queue, task in QUEUES.items()},
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # a child loads the model before it reports ready; Celery's default of 4 s killed
        # every replacement child for a Keras model (TensorFlow's import alone takes 3-6 s
        # on 2 cores), so a worker whose child died never ran another task
        worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT,
    )
    app.conf.covidct_settings = settings
    return app


def publish(app: Celery, task: str, *args: int, countdown: float | None = None) -> None:
    """Send a task by name, failing fast when the broker is down (the sweeper retries)."""
    queue = next(q for q, t in QUEUES.items() if t == task)
    app.send_task(task, args=list(args), queue=queue, retry=False, countdown=countdown)


_apps: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """A publishing app per broker URL, cached for the process (web and listener use it)."""
    if settings.broker_url not in _apps:
        _apps[settings.broker_url] = make_celery(settings)
    return _apps[settings.broker_url]


Publisher = Callable[[str, int], None]  # (task name, id): sends one message or raises


def ring(
    settings: Settings,
    task: str,
    obj_id: int,
    send: Publisher | None = None,
    now: datetime | None = None,
) -> bool:
    """Ask a worker to look at a row: stamp the row as rung (at ``now``, the sweep's clock)
    and publish the task; when the broker is down, leave the row due so that the sweeper
    rings again at its next pass.  Returns whether the message went out.  The one way
    anything publishes work."""
    kind = DOORBELLS[task]
    with session_scope(settings.database_url) as s:
        lifecycle.rung(s, kind, obj_id, now or utcnow(), settings.redeliver_seconds)
    try:
        if send is None:
            publish(celery_for(settings), task, obj_id)
        else:
            send(task, obj_id)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        logger.warning("broker unavailable: %s %d left for the sweeper (%s)", kind, obj_id, first)
        with session_scope(settings.database_url) as s:
            lifecycle.missed(s, kind, obj_id, utcnow())
        return False
    return True
