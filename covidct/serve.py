"""``covidct serve``: listener, worker and dashboard on one machine, as three processes.

Each stage runs in its own process (the same ``covidct`` command line), so TensorFlow lives
only in the worker and a crash of one stage is visible.  All three share the data directory:
SQLite results store and the embedded filesystem queue by default, Redis and PostgreSQL as
soon as their URLs are set.  Ctrl-C (SIGINT) or SIGTERM stops them in order; studies that
were queued resume at the next start because the results store, not the queue, holds them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from core.db import upgrade
from core.settings import Settings

logger = logging.getLogger(__name__)

STAGES = ("listener", "worker", "web")


def banner(settings: Settings) -> str:
    return "\n".join(
        [
            "covidct is running. Research and triage support only: not a diagnosis.",
            f"  DICOM:     AE title {settings.ae_title} on "
            f"{settings.dicom_host}:{settings.dicom_port} (C-ECHO, C-STORE of CT, Enhanced CT)",
            f"  Dashboard: http://{settings.web_host}:{settings.web_port}/",
            f"  Data:      {settings.data_dir}",
            "  Results go to: "
            + (", ".join(map(str, settings.destinations)) or "the data directory only"),
            "  First user: covidct create-user NAME --admin   (in another terminal)",
            "  Demo data:  covidct demo",
            "  Stop:       Ctrl-C",
        ]
    )


def serve(settings: Settings, *, workers: int = 1) -> int:
    upgrade(settings.database_url)
    settings.log_effective()
    procs: dict[str, subprocess.Popen] = {}
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    env.setdefault("COVIDCT_DATA_DIR", str(settings.data_dir))
    env.setdefault("COVIDCT_SECRET_KEY", settings.secret_key)
    for stage in STAGES:
        args = [sys.executable, "-m", "covidct.cli", stage]
        if stage == "worker":
            args += ["--concurrency", str(workers)]
        procs[stage] = subprocess.Popen(args, env=env, start_new_session=True)
    print(banner(settings), flush=True)
    exit_code = 0
    while not stop.wait(0.5):
        for stage, proc in procs.items():
            if proc.poll() is not None:
                logger.error("%s exited with status %s; stopping", stage, proc.returncode)
                exit_code = 1
                stop.set()
    shutdown(procs)
    return exit_code


def shutdown(procs: dict[str, subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM to each stage's main process in reverse order (web, worker, listener): the
    worker finishes its task (Celery's warm shutdown); then SIGKILL what is left."""
    for stage in reversed(STAGES):
        proc = procs.get(stage)
        if proc is not None and proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for stage, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in time; killing it", stage)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print("covidct stopped.", flush=True)
