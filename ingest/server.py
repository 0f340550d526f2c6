"""The storage SCP: options -> an AE -> handlers -> ``start_server``; and ``covidct listener``.

At start-up the spool is reconciled with the results store (an instance written but not
recorded, because the process died between the two, is recorded now), stale temporary files
of interrupted writes are removed, and the sweeper starts.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import threading
from dataclasses import replace
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from core import holders
from core.db import session_scope, upgrade
from core.models import Instance
from core.settings import Settings
from ingest import completeness, pdu_guard, tuning
from ingest.handlers import (
    IngestContext,
    handle_aborted,
    handle_accepted,
    handle_conn_close,
    handle_conn_open,
    handle_echo,
    handle_released,
    handle_requested,
    handle_store,
)
from ingest.part10 import TRANSFER_SYNTAXES
from ingest.records import UnreadableDatasetError, read_header, record_instance
from ingest.spool import InvalidUIDError, iter_spool, remove_stale_temporaries
from ingest.sweeper import Sweeper, celery_publisher

logger = logging.getLogger(__name__)


class PortInUse(OSError):
    """The DICOM port is taken, by another covidct listener or another program."""


def port_in_use(name: str, host: str, port: int, variable: str) -> PortInUse:
    who = holders.describe(holders.tcp_port_holders(port))
    return PortInUse(
        f"{name} port {port} on {host} is in use{who}: stop what uses it"
        f"{STOP_HINT if 'covidct serve' in who else ''}, or set {variable}"
    )


STOP_HINT = " (`covidct stop`, with the same COVIDCT_DATA_DIR)"


def claim_port(port: int) -> socket.socket:
    """An abstract Unix socket named after the DICOM port, held while the listener runs.

    SO_REUSEPORT lets our own listener processes share the port, and would as well let a
    second covidct service share it, splitting the incoming studies between the two: the
    second one's first process fails here instead."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"covidct-dicom-port-{port}"
    try:
        lock.bind(f"\0{name}")
    except OSError:
        lock.close()
        who = holders.describe(holders.abstract_socket_holders(name))
        raise PortInUse(
            f"DICOM port {port} is already used by another covidct listener on this machine"
            f"{who}: stop it{STOP_HINT if 'covidct serve' in who else ''},"
            " or set COVIDCT_DICOM_PORT"
        ) from None
    return lock


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True  # also checked, and audited, in handle_requested
    ae.add_supported_context(Verification)
    for sop_class in settings.sop_classes:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        ctx.load_verify_locations(str(settings.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def handlers(ctx: IngestContext) -> list[tuple[Any, ...]]:
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [ctx]),
        (evt.EVT_RELEASED, handle_released, [ctx]),
        (evt.EVT_ABORTED, handle_aborted, [ctx]),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]


def reconcile_spool(settings: Settings) -> int:
    """Record instances that are in the spool but not in the store; return how many."""
    removed = remove_stale_temporaries(settings.spool_dir)
    if removed:
        logger.warning("removed %d unfinished temporary files from the spool", removed)
    with session_scope(settings.database_url) as s:
        known = set(s.scalars(select(Instance.spool_path)).all())
    added = 0
    for path in iter_spool(settings.spool_dir):
        if str(path) in known:
            continue
        try:
            data = path.read_bytes()
            header = read_header(data)
        except (OSError, UnreadableDatasetError, InvalidUIDError) as exc:
            logger.error("unreadable file in spool %s: %s", path, exc)
            continue
        if record_instance(settings.database_url, header, path, len(data), "spool-scan"):
            added += 1
    if added:
        logger.warning("recorded %d spooled instances that were missing from the store", added)
    return added


class Listener:
    """A running SCP with its sweeper; ``stop()`` shuts both down."""

    def __init__(
        self,
        settings: Settings,
        *,
        sweeper: bool = True,
        publish: Any = None,
        primary: bool = True,
        share_port: bool = False,
    ) -> None:
        """``primary``: migrate the store and reconcile the spool first (one process does);
        ``share_port``: bind with SO_REUSEPORT beside other listener processes."""
        self.settings = settings
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self._port_lock = (
            claim_port(settings.dicom_port) if primary and settings.dicom_port else None
        )
        if primary:
            upgrade(settings.database_url)
            reconcile_spool(settings)
            completeness.listener_restarted(settings)
            completeness.apply_notes(settings)
        self.ctx = IngestContext(settings)
        tuning.install()
        pdu_guard.configure(
            settings.max_pdu, settings.association_request_seconds, settings.max_peer_connections
        )
        pdu_guard.install()
        self.ae = build_ae(settings)
        self.ae.covidct_share_port = share_port  # read by tuning's server_bind
        try:
            self.server = self.ae.start_server(
                (settings.dicom_host, settings.dicom_port),
                block=False,
                evt_handlers=handlers(self.ctx),
                ssl_context=ssl_context(settings),
            )
        except OSError as exc:
            self._release_port()
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(
                    "DICOM", settings.dicom_host, settings.dicom_port, "COVIDCT_DICOM_PORT"
                ) from None
            raise
        self.sweeper: Sweeper | None = None
        if sweeper:
            self.sweeper = Sweeper(
                settings, publish if publish is not None else celery_publisher(settings)
            )
            self.sweeper.start()
        logger.info(
            "listening as %s on %s:%d (TLS %s)",
            settings.ae_title,
            settings.dicom_host,
            self.port,
            "on" if settings.tls_enabled else "off",
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.server.shutdown()
        self.ae.shutdown()
        self._release_port()

    def _release_port(self) -> None:
        if self._port_lock is not None:
            self._port_lock.close()
            self._port_lock = None


def run_listener(settings: Settings) -> int:
    """``covidct listener``: serve until SIGINT or SIGTERM.

    With ``listener_processes`` > 1 the first process migrates, reconciles and sweeps, and
    the others (spawned, restarted if they die) share the port through SO_REUSEPORT: the
    kernel spreads associations over them, so parallel associations use every core instead
    of one GIL.
    """
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    processes = settings.listener_processes
    if processes > 1 and not tuning.compatible():
        logger.warning("this pynetdicom cannot share the port: one listener process")
        processes = 1
    # its own sweeper thread unless the sweep runs as a stage of its own (serve,
    # docker-compose); the lease keeps two from sweeping at once either way
    listener = Listener(settings, sweeper=settings.listener_sweeper, share_port=processes > 1)
    print(
        f"covidct listener: AE {settings.ae_title} on {settings.dicom_host}:{listener.port}"
        f" ({processes} process{'es' if processes > 1 else ''})",
        flush=True,
    )
    ctx = multiprocessing.get_context("spawn")
    helpers: list[Any] = []
    while not done.is_set():
        helpers = [h for h in helpers if h.is_alive() or _report_exit(h)]
        while len(helpers) < processes - 1:
            helper = ctx.Process(
                target=_helper,
                # port 0 -> the one bound; our pid, so that it notices when we are gone
                args=(replace(settings, dicom_port=listener.port), os.getpid()),
                name="covidct-listener",
            )
            helper.start()
            helpers.append(helper)
        done.wait(1.0)
    logger.info("stopping listener")
    for helper in helpers:
        helper.terminate()
    for helper in helpers:
        helper.join(30)
    listener.stop()
    return 0


def _report_exit(process: Any) -> bool:
    logger.error(
        "listener process %s exited with %s: starting another", process.pid, process.exitcode
    )
    return False


def _helper(settings: Settings, parent: int) -> None:
    """A further listener process: same port, no sweeper, no start-up reconciliation.  It
    stops on SIGTERM, and on its own if the first process dies (it must not keep the port)."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(processName)s %(message)s"
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listener = Listener(settings, sweeper=False, primary=False, share_port=True)
    while not done.wait(1.0):
        if os.getppid() != parent:
            logger.error("the first listener process is gone: stopping")
            break
    listener.stop()
