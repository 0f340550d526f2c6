"""``covidct worker``: a Celery worker on the configured broker, prefork pool.

The main process says it is alive (``core.health.beat``) every ``heartbeat_seconds`` from a
thread, so that ``/readyz`` can tell that no worker is running.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from typing import Any

from celery.exceptions import SecurityWarning
from celery.signals import worker_ready, worker_shutdown

from core import health
from core.db import upgrade
from core.settings import Settings

logger = logging.getLogger(__name__)


def run_worker(
    settings: Settings,
    *,
    concurrency: int = 1,
    queues: str = "studies,uploads,exports",
    quiet: bool = False,
) -> int:
    """``quiet``: no Celery banner (under ``covidct serve``, whose banner says it all)."""
    from worker.tasks import create_app

    upgrade(settings.database_url)
    app = create_app(settings)
    name = f"{socket.gethostname()}:{os.getpid()}"
    stop = threading.Event()

    def beat_until_stopped() -> None:
        while True:
            try:
                health.beat(settings, name)
            except Exception as exc:  # the store is down: /readyz says so on its own
                logger.warning("worker heartbeat not recorded: %s", exc)
            if stop.wait(settings.heartbeat_seconds):
                return

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        threading.Thread(target=beat_until_stopped, name="worker-heartbeat", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        stop.set()
        try:
            health.gone(settings, name)
        except Exception:
            logger.warning("could not remove worker %s from the store", name)

    # a container runs as root by design; Celery's advice about it is not the user's to act on
    warnings.filterwarnings("ignore", category=SecurityWarning)
    argv = [
        *(["--quiet"] if quiet else []),
        "worker",
        f"--loglevel={settings.log_level}",
        f"--concurrency={max(1, concurrency)}",
        f"--queues={queues}",
        f"--hostname=covidct-{socket.gethostname()}-%i@%h",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0
