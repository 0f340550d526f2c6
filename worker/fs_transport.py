"""kombu's filesystem transport (the embedded broker) with message files that appear whole.

kombu 5.x creates ``<stamp>_<uuid>.<queue>.msg`` in the queue folder, then locks and writes
it; a consumer that lists the folder in between moves it away and reads an empty file, and
the JSONDecodeError stops the Celery worker ("Unrecoverable error").  Seen here: under
``covidct serve`` in ``tests/test_browser.py`` the worker died on its first poll after the
listener queued a study, and ``covidct serve`` then stopped.  This channel writes each
message under a name the consumer skips (it matches ``<queue>.msg`` after the first dot) and
renames it into place, so a message is either absent or complete.  The broker stays a
doorbell: no fsync (the results store and the sweeper make up for a lost message).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"  # kombu's naming
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f"{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """Also: a wait for messages that ends as soon as the worker is asked to stop.  Celery's
    loop for transports without an event loop waits 2 s per turn before it looks at the
    stop request; with nothing queued that was 2-3 s of every Ctrl-C."""

    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        from celery.worker import state

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if state.should_stop is not None or state.should_terminate is not None:
                raise TimeoutError("the worker is stopping")
            step = STOP_CHECK_SECONDS
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    raise TimeoutError()
            try:
                return super().drain_events(connection, timeout=step, **kwargs)
            except TimeoutError:
                continue


STOP_CHECK_SECONDS = 0.2
