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
    Channel = Channel
