"""The DICOM port under a hostile peer: a bounded fuzz suite against `covidct listener`.

One listener (the default two processes) runs for the module; hostile peers connect from
their own loopback addresses (127.0.0.2 and up: Linux routes all of 127/8 to lo), so the
per-peer cap does not hide the guard.  Each kind asserts that every bad peer is closed, the
listener's memory (both processes, after eight C-ECHO associations have warmed them up) grows
under 50 MB, and DCMTK's echoscu gets an answer;
one study is sent by DCMTK's storescu while the fuzzing runs and must be stored complete.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Instance
from core.settings import load_settings
from covidct.synthetic import SeriesSpec, make_study, write_study
from covidct.testbed import rss_mb, two_process_listener
from ingest.pdu_guard import ASSOCIATE_LIMIT, FIXED_LENGTH, PDU_NAMES
from tests.conftest import free_port, need_tool, port_open

pytestmark = pytest.mark.integration

MAX_PDU = 131072
REQUEST_SECONDS = 3.0  # COVIDCT_ASSOCIATION_REQUEST_SECONDS for the suite (default 10)
GROWTH_MB = 50.0


@dataclass
class Port:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    data_dir: Path

    def rss_mb(self) -> float:
        """Resident memory of the listener and its second process, MB."""
        return rss_mb(self.proc.pid, below=True)

    def echo(self) -> None:
        """C-ECHO from DCMTK's echoscu answers success."""
        out = subprocess.run(
            [dcmtk("echoscu"), "-aec", "COVIDCT", "-to", "20", "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr


def dcmtk(name: str) -> str:
    """DCMTK's program, not pynetdicom's app of the same name in the virtual environment."""
    path = need_tool(name)
    if Path(path).resolve().is_relative_to(Path(sys.prefix).resolve()):
        system = Path("/usr/bin") / name
        assert system.exists(), f"only pynetdicom's {name} is on PATH"
        return str(system)
    return path


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Port]:
    tmp = tmp_path_factory.mktemp("port")
    number = free_port()
    log = tmp / "listener.log"
    settings = {
        "COVIDCT_MAX_PDU": str(MAX_PDU),
        "COVIDCT_ASSOCIATION_REQUEST_SECONDS": str(REQUEST_SECONDS),
    }
    with two_process_listener(tmp / "var", number, log, **settings) as proc:
        assert port_open("127.0.0.1", number), log.read_text()[-3000:]
        ready = Port(proc, number, log, tmp / "var")
        for _ in range(8):  # both processes answer a first association: memory is measured
            ready.echo()  # from here, after their one-time imports
        yield ready


_next_peer = iter(range(2, 250))


def hostile(payload: bytes = b"", host: str | None = None) -> socket.socket:
    """A connection from its own loopback address (unless ``host``) that sends ``payload``."""
    s = socket.socket()
    s.bind((host or f"127.0.0.{next(_next_peer)}", 0))
    s.settimeout(10)
    return _connect_and_send(s, payload)


def _connect_and_send(s: socket.socket, payload: bytes) -> socket.socket:
    s.connect(("127.0.0.1", PORT_IN_USE[0]))
    if payload:
        try:
            s.sendall(payload)
        except OSError:  # already closed by the listener: what some cases expect
            pass
    return s


PORT_IN_USE = [0]


def still_open(sockets: list[socket.socket], seconds: float) -> list[int]:
    """Indices of the sockets the listener has not closed within ``seconds`` (the caller
    closes them all afterwards)."""
    deadline = time.monotonic() + seconds
    open_ = list(range(len(sockets)))
    while open_ and time.monotonic() < deadline:
        for i in list(open_):
            s = sockets[i]
            s.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                while True:  # read what the listener sends (an A-ABORT, say) until the close
                    if not s.recv(65536):
                        open_.remove(i)
                        break
            except TimeoutError:
                continue
            except OSError:  # reset by the listener
                open_.remove(i)
    return open_


def closed_within(sockets: list[socket.socket], seconds: float) -> list[int]:
    """:func:`still_open`, then every socket closed."""
    try:
        return still_open(sockets, seconds)
    finally:
        for s in sockets:
            s.close()


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


@pytest.fixture
def listener(port: Port) -> Iterator[Port]:
    """The module's listener, with its memory before the test and checks after it."""
    PORT_IN_USE[0] = port.port
    port.echo()
    before = port.rss_mb()
    yield port
    port.echo()
    grown = port.rss_mb() - before
    assert grown < GROWTH_MB, f"the listener grew by {grown:.0f} MB"
    assert port.proc.poll() is None, port.log.read_text()[-3000:]


LIMITS = {
    t: ASSOCIATE_LIMIT if t in (1, 2) else MAX_PDU if t == 4 else FIXED_LENGTH for t in PDU_NAMES
}


def test_every_pdu_type_at_every_length_is_bounded(listener: Port) -> None:
    """Each PDU type claiming 0, 1, just over its limit and 2^32-1 bytes, then silent; unknown
    types; truncated headers.  Every connection is closed within the request deadline."""
    cases = (
        [header(t, n) for t in PDU_NAMES for n in (0, 1, LIMITS[t] + 1, 2**32 - 1)]
        + [header(t, 100) for t in (0x00, 0x08, 0x41, 0xFF)]
        + [b"\x01", b"\x04\x00\x00", b"\x01\x00\x00\x00\x00"]
    )
    peers = [hostile(c) for c in cases]
    assert closed_within(peers, REQUEST_SECONDS + 5) == []
    log = listener.log.read_text()
    assert "P-DATA-TF of 4294967295 bytes, over its limit of 131072" in log
    assert f"A-ASSOCIATE-RQ of {ASSOCIATE_LIMIT + 1} bytes, over its limit" in log
    assert "unknown PDU type 0xFF" in log
    assert "no complete A-ASSOCIATE-RQ within 3 s of connecting" in log
    assert "closed the DICOM connection from 127.0.0." in log


def test_ten_claims_of_gigabytes_held_open(listener: Port) -> None:
    """The measurement of the report: ten connections claiming 2 GB (P-DATA-TF) or 4 GB
    (A-ASSOCIATE-RQ) and holding the connection open; the listener answers meanwhile."""
    before = listener.rss_mb()
    peers = [hostile(header(4 if i % 2 else 1, 2**31 if i % 2 else 2**32 - 1)) for i in range(10)]
    time.sleep(0.5)  # let the listener read the headers: the state being measured
    listener.echo()
    assert listener.rss_mb() - before < GROWTH_MB
    assert closed_within(peers, REQUEST_SECONDS + 5) == []


def test_random_bytes(listener: Port) -> None:
    """What a port scanner or a misconfigured device sends: 50 connections of 1-3,000
    random bytes (seeded), many starting with a byte that reads as a PDU type."""
    rng = random.Random(35)
    payloads = []
    for i in range(50):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        if i % 2:
            body = bytes([rng.randint(1, 7)]) + body[1:]
        payloads.append(body)
    peers = [hostile(p) for p in payloads]
    assert closed_within(peers, REQUEST_SECONDS + 10) == []


def _associate_rq(items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU around ``items`` (its variable items), lengths as given."""
    fixed = struct.pack(">HH", 1, 0) + b"COVIDCT".ljust(16) + b"FUZZ".ljust(16) + bytes(32)
    body = fixed + items
    return header(1, len(body)) + body


def _item(item_type: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload) if length is None else length) + payload


def test_association_requests_whose_items_overrun(listener: Port) -> None:
    """A-ASSOCIATE-RQ whose item and sub-item lengths claim more than the PDU holds: the
    request is refused or the connection closed, and nothing beyond the bytes is kept."""
    context = b"1.2.840.10008.3.1.1.1"
    verification = b"1.2.840.10008.1.1"
    implicit = b"1.2.840.10008.1.2"
    good_pc = _item(
        0x20, struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, verification) + _item(0x40, implicit)
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    cases = [
        _associate_rq(_item(0x10, context, 0xFFFF) + good_pc + user),  # app context overruns
        _associate_rq(_item(0x10, context) + _item(0x20, b"\x01\x00\x00\x00", 0xFFFF) + user),
        _associate_rq(
            _item(0x10, context)
            + _item(0x20, struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, verification, 0xFFFF))
            + user
        ),  # abstract syntax sub-item overruns its presentation context
        _associate_rq(_item(0x10, context) + good_pc + _item(0x50, b"\x51\x00\xff\xff", 0xFFFF)),
        _associate_rq(b""),  # no items at all
        _associate_rq(_item(0x10, context) + good_pc + user)[:-5],  # cut short, then silent
        _associate_rq(bytes([0x99, 0, 0xFF, 0xFF]) * 50),  # unknown items, lengths overrunning
    ]
    peers = [hostile(c) for c in cases]
    assert closed_within(peers, REQUEST_SECONDS + 10) == []


def test_idle_connections_cannot_take_every_slot(listener: Port) -> None:
    """20 idle connections from one address: the address holds at most its cap per listener
    process, the rest are closed at once; another peer is answered meanwhile; all are closed
    at the request deadline."""
    t0 = time.monotonic()
    idle = [hostile(host="127.0.0.200") for _ in range(20)]
    held = still_open(idle, 0.5)
    assert time.monotonic() - t0 < REQUEST_SECONDS  # counted before the deadline closes them
    assert 8 <= len(held) <= 16  # two listener processes, each with its cap of 8
    listener.echo()  # from 127.0.0.1, while the idle ones are held
    log = listener.log.read_text()
    assert "127.0.0.200" in log and "holds 8 connections already" in log
    assert closed_within(idle, REQUEST_SECONDS + 5) == []


def test_a_study_sent_while_the_port_is_fuzzed_is_stored_complete(
    listener: Port, tmp_path: Path
) -> None:
    """DCMTK's storescu sends a 40-slice study while idle, oversized, random and overrunning
    peers come and go: every instance is stored."""
    study = make_study([SeriesSpec(slices=40, rows=128)], seed=35)
    files = write_study(study, tmp_path / "in")
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def send() -> None:
        result["storescu"] = subprocess.run(
            [
                dcmtk("storescu"),
                "-aec",
                "COVIDCT",
                "-aet",
                "CT1",
                "127.0.0.1",
                str(listener.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    sender = threading.Thread(target=send)
    sender.start()
    rng = random.Random(7)
    peers: list[socket.socket] = []
    while sender.is_alive() and len(peers) < 60:
        kind = len(peers) % 4
        if kind == 0:
            peers.append(hostile(header(4, 2**31)))
        elif kind == 1:
            peers.append(hostile(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 500)))))
        elif kind == 2:
            peers.append(hostile(_associate_rq(_item(0x10, b"1.2", 0xFFFF))))
        else:
            peers.append(hostile())
        time.sleep(0.02)
    sender.join(150)
    out = result["storescu"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert closed_within(peers, REQUEST_SECONDS + 10) == []
    settings = load_settings({"COVIDCT_DATA_DIR": str(listener.data_dir)})
    with session_scope(settings.database_url) as s:
        uids = {str(ds.SOPInstanceUID) for ds in study}
        stored = s.scalar(
            select(func.count()).select_from(Instance).where(Instance.sop_instance_uid.in_(uids))
        )
    assert stored == len(files)
