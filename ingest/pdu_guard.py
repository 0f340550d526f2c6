"""The DICOM port under a hostile peer: nothing a peer claims is allocated before it is checked.

pynetdicom's DUL reads a PDU as its 6-byte header (type, reserved, length), then asks the
socket for ``length`` bytes.  Whoever can reach the port can claim 4 GB in six bytes, before any
association exists and before the calling AE title is looked at; a reader that allocates what
it is told (as our large-read ``recv`` did, preallocating its buffer) is exhausted by a port
scanner.  This module replaces ``AssociationSocket.recv`` in the listener process with one that:

* checks every header against a limit for its PDU type before reading a byte of the body
  (:func:`limit`): an unknown type, or a length over the limit, closes the connection with one
  log line naming the peer;
* checks the items and sub-items of an A-ASSOCIATE-RQ before pynetdicom decodes it
  (:func:`check_associate`): a length that overruns its container, or a request without the
  items PS3.8 makes mandatory, closes the connection the same way;
* grows its buffer as bytes arrive (from 64 KiB, doubling), so a body never costs more memory
  than about twice what the peer actually sent;
* gives a new connection ``association_request_seconds`` to deliver a complete A-ASSOCIATE-RQ
  (a peer that trickles bytes cannot hold the reader longer).  pynetdicom waits for the
  request for the ACSE timeout, and its association thread holds an association slot all
  that time even after the peer has gone (the report: C-ECHO refused for 30-60 s after a
  burst of bad connections); :func:`on_connection` shortens that wait (and the ARTIM timer)
  to the request deadline until the request is in (:func:`on_request` restores it), and a
  connection that ends before its request wakes the waiting thread at once.

:func:`verify_request` caps the connections one peer address holds at once
(``max_peer_connections``), so half-open connections from one host cannot take every
association slot.  docs/security.md lists each limit and how it is tested.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
# An A-ASSOCIATE-RQ holds at most 128 presentation contexts (odd ids 1-255), each an abstract
# syntax and its transfer syntaxes (UIDs of up to 64 bytes, 4-byte sub-item headers): 128
# contexts of 32 transfer syntaxes are 288 KB; the user information adds role selections
# (128 x 72 bytes), extended negotiation and a user identity of up to 2 x 65,535 bytes:
# about 450 KB in all.  1 MiB leaves room and bounds ten connections to 10 MB.
ASSOCIATE_LIMIT = 1 << 20
FIXED_LENGTH = 4  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT: PS3.8 9.3.4, 9.3.6-9.3.8
FIRST_CHUNK = 64 * 1024
# socketserver listens with a backlog of 5: a burst of connections (a PACS opening eight
# associations at once, or a flood) overflows it, and the kernel drops SYNs that the peer
# resends only after 1 s, then 3 s.  The kernel caps this at net.core.somaxconn (4096).
LISTEN_BACKLOG = 128
_STATE = "_covidct_guard"
_THREAD = threading.local()  # per DUL thread (one per connection): whether it refused its peer


@dataclass
class Limits:
    max_pdu: int = 131072  # the maximum P-DATA-TF length the listener announces
    association_request_seconds: float = 10.0
    max_peer_connections: int = 8


LIMITS = Limits()


def configure(max_pdu: int, association_request_seconds: float, max_peer_connections: int) -> None:
    """Set the limits from the listener's settings (one listener per process)."""
    LIMITS.max_pdu = max_pdu
    LIMITS.association_request_seconds = association_request_seconds
    LIMITS.max_peer_connections = max_peer_connections


def limit(pdu_type: int) -> int | None:
    """The largest length a PDU of this type may claim; None for an unknown type."""
    if pdu_type in (0x01, 0x02):
        return ASSOCIATE_LIMIT
    if pdu_type == 0x04:
        return LIMITS.max_pdu
    if pdu_type in PDU_NAMES:
        return FIXED_LENGTH
    return None


def check_header(header: bytes) -> str:
    """Why a 6-byte PDU header is refused, or "" when it may be read."""
    pdu_type, _, length = struct.unpack(">BBL", header)
    most = limit(pdu_type)
    if most is None:
        return f"unknown PDU type 0x{pdu_type:02X}"
    name = PDU_NAMES[pdu_type]
    if most == FIXED_LENGTH and length != FIXED_LENGTH:
        return f"{name} of {length} bytes (it has {FIXED_LENGTH})"
    if length > most:
        return f"{name} of {length} bytes, over its limit of {most}"
    return ""


ASSOCIATE_FIXED = 68  # protocol version, reserved, called and calling AE titles, reserved
# items of an A-ASSOCIATE-RQ whose payload is made of sub-items (after a fixed prefix)
_CONTAINERS = {0x20: 4, 0x21: 4, 0x50: 0}
_MANDATORY = {0x10: "application context", 0x20: "presentation context", 0x50: "user information"}


def _walk(data: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """(type, payload start, payload end) of each item in ``data[start:end]``; Refused when
    one claims more than its container holds."""
    items = []
    at = start
    while at < end:
        if end - at < 4:
            raise Refused(f"{what}: {end - at} stray bytes after its last item")
        item_type, _, length = struct.unpack_from(">BBH", data, at)
        if at + 4 + length > end:
            raise Refused(
                f"{what}: item 0x{item_type:02X} of {length} bytes overruns its container"
                f" ({end - at - 4} left)"
            )
        items.append((item_type, at + 4, at + 4 + length))
        at += 4 + length
    return items


def check_associate(body: bytes) -> str:
    """Why the variable field of an A-ASSOCIATE-RQ is refused, or "": every item and sub-item
    lies inside its container, and the mandatory items are there (PS3.8 9.3.2)."""
    if len(body) < ASSOCIATE_FIXED:
        return f"A-ASSOCIATE-RQ of {len(body)} bytes, shorter than its fixed fields"
    try:
        items = _walk(body, ASSOCIATE_FIXED, len(body), "A-ASSOCIATE-RQ")
        for item_type, start, end in items:
            prefix = _CONTAINERS.get(item_type)
            if prefix is not None:
                if end - start < prefix:
                    raise Refused(f"A-ASSOCIATE-RQ: item 0x{item_type:02X} too short")
                _walk(body, start + prefix, end, f"A-ASSOCIATE-RQ item 0x{item_type:02X}")
    except Refused as exc:
        return str(exc)
    present = {item_type for item_type, _, _ in items}
    missing = [name for t, name in _MANDATORY.items() if t not in present]
    if missing:
        return f"A-ASSOCIATE-RQ without its {', '.join(missing)}"
    return ""


class _Guard:
    """Per connection: the request deadline and the header whose body comes next."""

    def __init__(self, raw: Any) -> None:
        self.deadline: float | None = time.monotonic() + LIMITS.association_request_seconds
        self.pending: int | None = None  # PDU type of the header just read
        self.refused = False  # once refused, nothing more is read from the peer
        self.timeout = raw.gettimeout()  # pynetdicom's network timeout, restored after reads
        try:
            name = raw.getpeername()
        except OSError:
            name = None
        self.peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) > 1 else "?"


class Refused(Exception):
    """The peer broke a limit; ``str()`` says which."""


def guarded_recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the checks above: ``nr_bytes`` or, if the peer closed,
    what came before; an empty bytearray once a limit is broken (the connection is closed,
    and pynetdicom sees the transport close)."""
    raw = self.socket
    guard = getattr(self, _STATE, None)
    if guard is None:
        guard = _Guard(raw)
        setattr(self, _STATE, guard)
    if guard.refused:  # what the peer sent after the refusal stays unread
        return bytearray()
    try:
        data = _checked_read(raw, nr_bytes, guard)
    except Refused as exc:
        logger.warning("closed the DICOM connection from %s: %s", guard.peer, exc)
        guard.refused = _THREAD.refused = True
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        data = bytearray()
    if guard.deadline is not None and len(data) < nr_bytes:
        _wake(self)  # no request will come: free the association slot now
    return data


def _checked_read(raw: Any, nr_bytes: int, guard: _Guard) -> bytearray:
    """A header (checked before anything else is read) or the body it announced."""
    if guard.pending is None:
        data = _read(raw, nr_bytes, guard)
        if nr_bytes == 6 and len(data) == 6:
            why = check_header(bytes(data))
            if why:
                raise Refused(why)
            guard.pending = data[0]
        return data
    pdu_type, guard.pending = guard.pending, None
    most = limit(pdu_type) or 0
    if nr_bytes > most:  # pynetdicom asks for the length the header announced
        raise Refused(f"{PDU_NAMES[pdu_type]} read of {nr_bytes} bytes, over {most}")
    data = _read(raw, nr_bytes, guard)
    if pdu_type == 0x01 and len(data) == nr_bytes:
        why = check_associate(bytes(data))
        if why:
            raise Refused(why)
        guard.deadline = None  # the request is in: ACSE and network timeouts from here
    return data


def _wake(sock: Any) -> None:
    """End pynetdicom's wait for the A-ASSOCIATE-RQ primitive: it takes ``None`` for a
    timeout, kills the association and shuts the connection."""
    dul = getattr(getattr(sock, "assoc", None), "dul", None)
    queue = getattr(dul, "to_user_queue", None)
    if queue is not None:
        queue.put(None)


def _read(raw: Any, nr_bytes: int, guard: _Guard) -> bytearray:
    """Up to ``nr_bytes`` into a buffer that grows with what arrives, never past
    ``nr_bytes``; before the association request, within its deadline."""
    buffer = bytearray(min(nr_bytes, FIRST_CHUNK))
    got = 0
    try:
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            if guard.deadline is not None:
                left = guard.deadline - time.monotonic()
                if left <= 0:
                    raise Refused(
                        "no complete A-ASSOCIATE-RQ within"
                        f" {LIMITS.association_request_seconds:g} s of connecting"
                    )
                raw.settimeout(left if guard.timeout is None else min(left, guard.timeout))
            view = memoryview(buffer)
            try:
                n = raw.recv_into(view[got:], len(buffer) - got)
            except TimeoutError:
                if guard.deadline is not None and guard.deadline <= time.monotonic():
                    continue  # the loop names the deadline
                raise
            finally:
                view.release()
            if not n:
                break
            got += n
    finally:
        if guard.deadline is not None:
            try:
                raw.settimeout(guard.timeout)
            except OSError:
                pass
    del buffer[got:]
    return buffer


class _OneLine(logging.Filter):
    """pynetdicom logs a traceback for every PDU it cannot read or decode: a hostile peer
    would fill the log with them.  Its message stays, the traceback goes; after a refusal
    (already logged with the peer's address) its lines about that connection go too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName == "_read_pdu_data":
            if getattr(_THREAD, "refused", False):
                return False
            if record.exc_info is not None and record.msg is record.exc_info[1]:
                return False  # LOGGER.exception(exc): only the traceback, said just before
            record.exc_info, record.exc_text = None, None
        return True


def on_connection(assoc: Any) -> None:
    """At connection open: pynetdicom's wait for the association request and its ARTIM timer
    (both the association's ACSE timeout) last the request deadline."""
    assoc.acse_timeout = LIMITS.association_request_seconds


def on_request(assoc: Any, acse_timeout: float) -> None:
    """The request is in: the ACSE timeout is the configured one again."""
    assoc.acse_timeout = acse_timeout


def verify_request(server: Any, request: Any, client_address: Any) -> bool:
    """``AssociationServer.verify_request``: refuse a connection from a peer address that
    already holds ``max_peer_connections`` (the socket is closed at once).

    Counted on the accepted sockets themselves, not on pynetdicom's association threads,
    which start a little after the accept: a burst of connections would outrun them.  A
    connection stops counting when its socket is closed (pynetdicom closes it at the end of
    the association; socketserver when it refuses)."""
    host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
    peers: dict[str, list[Any]] = server.__dict__.setdefault("_covidct_peers", {})
    held = [s for s in peers.get(host, []) if s.fileno() != -1]
    if len(held) >= LIMITS.max_peer_connections:
        peers[host] = held
        logger.warning(
            "closed the DICOM connection from %s:%s: the address holds %d connections already"
            " (COVIDCT_MAX_PEER_CONNECTIONS)",
            host,
            client_address[1] if isinstance(client_address, tuple) else "?",
            len(held),
        )
        return False
    peers[host] = [*held, request]
    if len(peers) > 1000:  # forget addresses whose connections have all closed
        for other in [h for h, socks in peers.items() if all(s.fileno() == -1 for s in socks)]:
            del peers[other]
    return True


def compatible() -> bool:
    """Whether pynetdicom reads a PDU as the guard expects: a 6-byte header, then one read of
    the length it claims (pynetdicom 3.0's ``DULServiceProvider._read_pdu_data``)."""
    import inspect

    from pynetdicom.dul import DULServiceProvider

    try:
        source = inspect.getsource(DULServiceProvider._read_pdu_data)
    except (OSError, TypeError, AttributeError):
        return False
    return "self.socket.recv(6)" in source and "self.socket.recv(pdu_length)" in source


def install() -> bool:
    """Replace pynetdicom's socket read and connection check in this process (idempotent).
    On a pynetdicom that reads PDUs otherwise, only the per-peer cap is installed (its own
    reads append 4 KiB at a time, so memory still follows the bytes received) and False is
    returned."""
    from pynetdicom.transport import AssociationServer, AssociationSocket

    AssociationServer.verify_request = verify_request  # type: ignore[method-assign,assignment]
    AssociationServer.request_queue_size = LISTEN_BACKLOG
    dul_log = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _OneLine) for f in dul_log.filters):
        dul_log.addFilter(_OneLine())
    if not compatible():
        logger.error("this pynetdicom reads PDUs differently: PDU limits not applied")
        return False
    AssociationSocket.recv = guarded_recv  # type: ignore[method-assign]
    return True
