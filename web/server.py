"""The dashboard's HTTP server: waitress, with every part of a request bounded before it is read.

waitress limits the header (``max_request_header_size``) and the body
(``max_request_body_size``), but not the line that gives a chunk's size: a client that sends
``Transfer-Encoding: chunked`` and a size line without its CRLF makes the server copy the
growing line at every read (an 8 MiB line cost 3.97 s of the I/O thread, a 230 MB one about
15 minutes at 100%; issue #22).  :class:`BoundedChunkedReceiver` refuses a size line longer
than :data:`MAX_CHUNK_LINE` and a trailer longer than :data:`MAX_TRAILER` with 400, and the
server refuses a body larger than the app would accept (413) before reading it.
"""

from __future__ import annotations

import errno
from typing import Any

from waitress import parser, receiver
from waitress.utilities import BadRequest

from core.settings import Settings

MAX_CHUNK_LINE = 4096  # hex size and extensions; a real client sends a few bytes
MAX_TRAILER = 16 * 1024
MAX_HEADER = 64 * 1024  # waitress's default is 256 KiB; a browser's headers are a few KiB
THREADS = 8


def request_body_limit(settings: Settings) -> int:
    """The largest request body the app takes: ten uploads of the largest size, plus form
    (the STOW-RS route raises it to ``stow_max_bytes`` for itself)."""
    return settings.max_upload_bytes * 10 + 1024 * 1024


def server_body_limit(settings: Settings) -> int:
    """What waitress reads (buffered to a temporary file when large): the largest body of
    any route."""
    return max(request_body_limit(settings), settings.stow_max_bytes)


class BoundedChunkedReceiver(receiver.ChunkedReceiver):
    """waitress's chunked body reader, with the size line and the trailer bounded."""

    def received(self, s: bytes) -> int:
        consumed = super().received(s)
        if len(self.control_line) > MAX_CHUNK_LINE:
            self._refuse(f"chunk size line longer than {MAX_CHUNK_LINE} bytes")
        elif len(self.trailer) > MAX_TRAILER:
            self._refuse(f"chunked trailer longer than {MAX_TRAILER} bytes")
        return consumed

    def _refuse(self, why: str) -> None:
        self.error = BadRequest(why)
        self.all_chunks_received = True
        self.control_line = self.trailer = b""


def serve(app: Any, settings: Settings) -> int:
    """Serve ``app`` until stopped; a taken port is one clear line."""
    from waitress import serve as waitress_serve

    parser.ChunkedReceiver = BoundedChunkedReceiver  # type: ignore[misc]
    try:
        waitress_serve(
            app,
            host=settings.web_host,
            port=settings.web_port,
            threads=THREADS,
            ident="covidct",
            max_request_header_size=MAX_HEADER,
            max_request_body_size=server_body_limit(settings),
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                f"web port {settings.web_port} on {settings.web_host} is in use: stop what uses "
                "it, or set COVIDCT_WEB_PORT"
            ) from None
        raise
    return 0
