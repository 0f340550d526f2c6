"""Changes to pynetdicom's receive path that a store SCP needs (measured in bench/ingest.py).

pynetdicom is pure Python and polls: its DUL loop (socket <-> state machine) and its acceptor
loop (complete DIMSE messages -> handlers) each sleep 1 ms whenever they find nothing to do
(pynetdicom issues #120, #650).  A C-STORE is handed between the two loops several times, each
hand-off waiting up to 1 ms for nothing, and shorter sleeps would make idle associations spin.
Measured with a handler that stores nothing (one association, 300 slices of 512x512 from
DCMTK's storescu): 287 instances/s as shipped, 375/s with 1, 2 and 4.  Per association:

1. The DUL loop waits in ``poll`` on its socket and on a wake-up socket that is written
   whenever a primitive is queued for sending: it wakes the moment there is work, and sleeps
   the full 1 ms when there is none.
2. The acceptor loop waits on the condition of its DIMSE message queue: it wakes the moment a
   complete message arrives, and otherwise after 1 ms as before (releases and aborts are
   noticed as before).
3. Several processes on one port: ``server_bind`` sets SO_REUSEPORT when the AE asks.
4. Large reads: pynetdicom reads a PDU 4 KiB per ``recv`` call, appending to a bytearray;
   :mod:`ingest.pdu_guard` reads as much as the kernel has per call into a buffer that grows
   with what arrives (never with what the header claims), after checking the header.
5. No standard logging handlers (``_config.LOG_HANDLER_LEVEL = "none"``): pynetdicom binds four
   to every association and runs them for every PDU and DIMSE message whatever the log level;
   the one for a received C-STORE-RQ copies the whole dataset to see whether it is empty.
   Measured: 3.13 -> 2.72 ms of listener CPU per 525 KB instance.  The listener logs its own
   events (association accepted or rejected, instances refused, study UIDs).
6. The C-STORE-RSP is encoded by hand (:mod:`ingest.store_response`): pynetdicom's generic
   encoder spent about 300 us on it.

Only the two modules' view of ``time.sleep(0.001)``,
``AssociationServer.server_bind``, ``DIMSEServiceProvider.send_msg`` and
``_config.LOG_HANDLER_LEVEL`` change; :func:`attach` and :func:`detach` run at connection
open and close.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

from ingest.store_response import fast_send_msg

logger = logging.getLogger(__name__)

PYNETDICOM_NAP = 0.001  # the sleep of both loops in pynetdicom 3.0
_WAKE = "_covidct_wake"


def attach(assoc: Any) -> None:
    """Give an association's DUL a wake-up socket, written when a primitive is queued."""
    dul = assoc.dul
    if getattr(dul, _WAKE, None) is not None:
        return
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    outgoing = dul.to_provider_queue
    put = outgoing.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        try:
            writer.send(b"\0")
        except OSError:  # buffer full (the loop is awake anyway) or already closed
            pass

    outgoing.put = put_and_wake
    setattr(dul, _WAKE, (reader, writer))


def detach(assoc: Any) -> None:
    dul = getattr(assoc, "dul", None)
    pair = getattr(dul, _WAKE, None)
    if pair is not None:
        setattr(dul, _WAKE, None)
        for s in pair:
            s.close()


def _sleep(seconds: float) -> None:
    if seconds != PYNETDICOM_NAP:
        time.sleep(seconds)
        return
    thread = threading.current_thread()
    pair = getattr(thread, _WAKE, None)
    if pair is not None:
        _wait_for_socket(thread, pair[0], seconds)
        return
    dimse = getattr(thread, "dimse", None)
    messages = getattr(dimse, "msg_queue", None)
    if messages is not None:
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(seconds)
        return
    time.sleep(seconds)


def _wait_for_socket(dul: Any, wake: socket.socket, seconds: float) -> None:
    """The DUL's nap: until its socket is readable, a primitive is queued, or ``seconds``."""
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    poller = select.poll()  # not select(): no limit on descriptor numbers
    try:
        poller.register(wake, select.POLLIN)
        if raw is not None and raw.fileno() >= 0:
            if getattr(raw, "pending", lambda: 0)():  # TLS: bytes already decrypted
                return
            poller.register(raw, select.POLLIN)
        ready = poller.poll(seconds * 1000)
    except (OSError, ValueError):  # closed under us: let pynetdicom notice
        time.sleep(seconds)
        return
    if any(fd == wake.fileno() for fd, _ in ready):
        try:
            while wake.recv(4096):
                pass
        except OSError:
            pass


def _server_bind(bind: Any) -> Any:
    """pynetdicom's ``server_bind`` plus SO_REUSEPORT when the AE asks for it (several
    listener processes on one port)."""

    def server_bind(self: Any) -> None:
        if getattr(self.ae, "covidct_share_port", False):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bind(self)

    server_bind.covidct_tuning = True  # type: ignore[attr-defined]
    return server_bind


def _clock() -> Any:
    names = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    return SimpleNamespace(**(names | {"sleep": _sleep, "covidct_tuning": True}))


def compatible() -> bool:
    """Whether this pynetdicom has the internals the patches rely on (checked, not assumed:
    a pynetdicom that changed them runs unpatched, only slower)."""
    import inspect

    import pynetdicom.association
    import pynetdicom.dimse
    import pynetdicom.dul
    from pynetdicom.transport import AssociationServer

    try:
        reactor = inspect.getsource(pynetdicom.association.Association._run_reactor)
        dul_init = inspect.getsource(pynetdicom.dul.DULServiceProvider.__init__)
        dimse_init = inspect.getsource(pynetdicom.dimse.DIMSEServiceProvider.__init__)
        send_msg = inspect.getsource(inspect.unwrap(pynetdicom.dimse.DIMSEServiceProvider.send_msg))
    except (OSError, TypeError, AttributeError):
        return False
    return (
        "time.sleep(0.001)" in reactor
        and "self._run_loop_delay = 0.001" in dul_init
        and "self.to_provider_queue" in dul_init
        and "self.msg_queue" in dimse_init
        and "evt.EVT_DIMSE_SENT" in send_msg
        and "encode_msg(context_id, self.maximum_pdu_size)" in send_msg
        and callable(getattr(pynetdicom.association.Association, "get_handlers", None))
        and callable(getattr(AssociationServer, "server_bind", None))
    )


def install() -> bool:
    """Patch pynetdicom's two loops' naps, its bind and its C-STORE-RSP (idempotent);
    return False, and patch nothing, on a pynetdicom without the expected internals."""
    import pynetdicom.association
    import pynetdicom.dimse
    import pynetdicom.dul
    from pynetdicom import _config
    from pynetdicom.transport import AssociationServer

    if not compatible():
        logger.warning("pynetdicom %s: listener tuning not applied", pynetdicom.__version__)
        return False

    _config.LOG_HANDLER_LEVEL = "none"
    if not getattr(AssociationServer.server_bind, "covidct_tuning", False):
        AssociationServer.server_bind = _server_bind(AssociationServer.server_bind)
    provider = pynetdicom.dimse.DIMSEServiceProvider
    if not getattr(provider.send_msg, "covidct_tuning", False):
        provider.send_msg = fast_send_msg(provider.send_msg)  # type: ignore[method-assign]
    for module in (pynetdicom.association, pynetdicom.dul):
        if not getattr(module.time, "covidct_tuning", False):
            module.time = _clock()  # type: ignore[attr-defined]
    return True
