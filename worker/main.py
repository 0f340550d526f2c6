"""``covidct worker``: a Celery worker on the configured broker, prefork pool."""

from __future__ import annotations

import socket

from core.db import upgrade
from core.settings import Settings


def run_worker(
    settings: Settings, *, concurrency: int = 1, queues: str = "studies,uploads,exports"
) -> int:
    from worker.tasks import create_app

    upgrade(settings.database_url)
    app = create_app(settings)
    argv = [
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
