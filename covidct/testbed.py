"""Studies, a PACS and processes for tests and benchmarks: what both import.

:class:`TestPACS` is a pynetdicom storage SCP that keeps what it receives (optionally hanging
on each C-STORE, to try what a worker does when the PACS stops answering);
:func:`spool_study` puts a study in the spool and the results store as the listener would, and
marks it queued, so that the worker's pipeline can run without a network.  :func:`launched`
is the one way tests and benchmarks start a program: in a process group of its own, and
stopped with everything it started, whatever the test did.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
KO = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


class TestPACS:
    """A pynetdicom storage SCP on a free port that keeps what it receives in memory."""

    __test__ = False  # not a pytest test class, though its name starts with Test

    def __init__(
        self,
        ae_title: str = "PACS",
        port: int = 0,
        status: int = 0x0000,
        gate: threading.Event | None = None,
        accepts: Sequence[str] = (SR, SC, KO),
    ) -> None:
        """``gate``: a PACS that hangs: each C-STORE is kept (and counted) at once but
        answered only when the event is set; ``accepts``: the storage SOP classes it takes
        (the SR, key images and key object selection by default)."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        self.received: list[Any] = []
        self.status = status
        self.gate = gate
        self.lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Verification)
        for sop_class in accepts:
            self.ae.add_supported_context(sop_class)
        self.ae_title = ae_title
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        if self.gate is not None:
            self.gate.wait(120)
        return self.status

    @property
    def reports(self) -> list[Any]:
        """The SRs received (the key images and key object selections left out)."""
        with self.lock:
            return [ds for ds in self.received if ds.SOPClassUID == SR]

    def of_class(self, sop_class: str) -> list[Any]:
        with self.lock:
            return [ds for ds in self.received if ds.SOPClassUID == sop_class]

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()


def spool_study(settings: Any, items: list[Any], calling_ae: str = "TEST") -> int:
    """Put a study (datasets or Part 10 files) in the spool as the listener would and mark
    it queued; return its id."""
    import io

    from sqlalchemy import select

    from core import lifecycle
    from core.db import session_scope
    from core.models import Study, utcnow
    from ingest.records import read_header, record_instance
    from ingest.spool import instance_path, write_durable

    uid = None
    for item in items:
        if isinstance(item, Path):
            data = item.read_bytes()
        else:
            buf = io.BytesIO()
            item.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        h = read_header(data)
        uid = h.study_uid
        path = instance_path(settings.spool_dir, h.study_uid, h.series_uid, h.sop_uid)
        write_durable(path, data)
        record_instance(settings.database_url, h, path, len(data), calling_ae)
    with session_scope(settings.database_url) as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        assert study_id is not None
        lifecycle.queue_study(s, study_id, utcnow())
        return study_id


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stage_pids(serve_pid: int) -> dict[str, int]:
    """The main process of each stage that ``covidct serve`` (process ``serve_pid``) runs."""
    found: dict[str, int] = {}
    for pid in child_pids(serve_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for stage in ("listener", "sweeper", "worker", "web"):
            if stage.encode() in args:
                found[stage] = pid
    return found


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, theirs, ...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@contextmanager
def launched(
    args: Sequence[str],
    *,
    stop_signal: int = signal.SIGTERM,
    grace: float = 15.0,
    **popen: Any,
) -> Iterator[subprocess.Popen]:
    """Start ``args`` in a process group of its own; on leaving, :func:`stop` it."""
    proc = subprocess.Popen(list(args), start_new_session=True, **popen)
    try:
        yield proc
    finally:
        stop(proc, stop_signal, grace)


def stop(proc: subprocess.Popen, stop_signal: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """``stop_signal`` to the process group of ``proc``; once it has exited or ``grace`` has
    passed, SIGKILL to every process it started that is still there, in its group or in
    groups of their own (the stages of ``covidct serve``)."""
    started = descendants(proc.pid)
    if proc.poll() is None:
        _signal_group(proc.pid, stop_signal)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for pid in {proc.pid, *started, *descendants(proc.pid)}:
        _signal_group(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    try:
        group = os.getpgid(pid)
        if group != os.getpgrp():  # never the group of the test run itself
            os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, and never one this process handed
    out before: a port handed out may not be bound yet (a test that chooses the service's ports,
    then Orthanc's, once got the same port twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def rss_mb(pid: int, *, below: bool = False) -> float:
    """Resident memory of ``pid`` (and, with ``below``, of every process below it), MB."""
    total = 0
    for p in [pid, *(descendants(pid) if below else [])]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        if "VmRSS:" in text:
            total += int(text.split("VmRSS:")[1].split()[0])
    return total / 1024


@contextmanager
def two_process_listener(
    data_dir: Path, port: int, log: Path, **settings: str
) -> Iterator[subprocess.Popen]:
    """``covidct listener`` (two processes) on ``port`` with ``data_dir``, once both
    processes are up; ``settings`` are further COVIDCT_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(data_dir),
        "COVIDCT_DICOM_PORT": str(port),
        "COVIDCT_LISTENER_PROCESSES": "2",
        "COVIDCT_STABLE_SECONDS": "3600",
        "COVIDCT_MIN_FREE_DISK_MB": "1",
        **settings,
    }
    with (
        log.open("w") as out,
        launched(
            [sys.executable, "-m", "covidct.cli", "listener"], env=env, stdout=out, stderr=out
        ) as proc,
    ):
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
            descendants(proc.pid) and "(2 processes)" in log.read_text()
        ):
            time.sleep(0.1)  # waiting for the processes to start, not timing anything
        yield proc
