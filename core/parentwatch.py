"""A stage started by ``covidct serve`` ends when serve does, however serve died.

serve starts each stage in a process group of its own (so that a Ctrl-C in the terminal reaches
serve alone, which stops the stages in order).  When serve is killed outright (SIGKILL, the OOM
killer, a container runtime's timeout) nothing would tell the stages, and they would live on
holding the DICOM and web ports.  A thread in each stage watches its parent: once the parent
is gone the stage gets SIGTERM (its own orderly stop: the listener closes its port, the worker
stops taking tasks), and ``GRACE_SECONDS`` later its whole process group (pool children,
listener helpers) gets SIGKILL.  The parent is polled every ``POLL_SECONDS``: a stage ends at
most ``POLL_SECONDS + GRACE_SECONDS`` after serve.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
GRACE_SECONDS = 3.0


def die_with_parent(parent: int | None = None) -> threading.Thread:
    """Start the watch for ``parent`` (default: the current parent); if it is already gone,
    the stop begins at once."""
    parent = os.getppid() if parent is None else parent
    watch = threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True)
    watch.start()
    return watch


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    logger.warning("serve (pid %d) is gone: stopping this stage", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    logger.warning("stage still running %.0f s after serve ended: killing it", GRACE_SECONDS)
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    except OSError:
        os._exit(1)
