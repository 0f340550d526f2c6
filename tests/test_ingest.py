"""The storage SCP over real associations on 127.0.0.1: pynetdicom and DCMTK as clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select

from classifier.preprocess import to_model_input
from core import lifecycle
from core.db import session_scope
from core.models import AuditEvent, Instance, Study, StudyState, utcnow
from core.settings import Settings, load_settings
from covidct.synthetic import SeriesSpec, make_study, write_study
from covidct.testbed import descendants, launched, two_process_listener
from ingest.server import Listener
from tests.conftest import free_port, need_tool
from tests.factories import LOSSY, SYNTAXES, in_syntax, to_bytes

pytestmark = pytest.mark.integration


class Published(list):
    """A publisher that records what the sweeper sends."""

    def __call__(self, task: str, obj_id: int) -> None:
        self.append((task, obj_id))


def settings_for(tmp_path: Path, **extra: str) -> Settings:
    env = {
        "COVIDCT_DATA_DIR": str(tmp_path / "var"),
        "COVIDCT_DICOM_PORT": str(free_port()),
        "COVIDCT_STABLE_SECONDS": "2",
        # the whole quiet time even after a release, unless a test says otherwise
        "COVIDCT_RELEASED_STABLE_SECONDS": "2",
        "COVIDCT_SWEEP_SECONDS": "3600",  # tests call sweep_once themselves: no sleeps
        "COVIDCT_MIN_FREE_DISK_MB": "1",
    } | extra
    return load_settings(env)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, Published]]:
    published = Published()
    lst = Listener(settings_for(tmp_path), publish=published)
    yield lst, published
    lst.stop()


def associate(
    settings: Settings,
    calling: str = "PACS",
    called: str | None = None,
    contexts: list[str] | None = None,
    syntaxes: list[str] | None = None,
    tls: tuple | None = None,
):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    for cx in contexts or [CTImageStorage, Verification]:
        if syntaxes:
            ae.add_requested_context(cx, syntaxes)
        else:
            ae.add_requested_context(cx)
    return ae.associate(
        "127.0.0.1", settings.dicom_port, ae_title=called or settings.ae_title, tls_args=tls
    )


def release(assoc, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Release, then wait for the listener to settle the association (its close handler
    runs just after the peer has its A-RELEASE-RP)."""
    assoc.release()
    deadline = time.monotonic() + 10
    while count(settings, Study, Study.open_associations > 0) and time.monotonic() < deadline:
        time.sleep(0.02)


def count(settings: Settings, model: type, *where: object) -> int:
    with session_scope(settings.database_url) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_echo_and_store_with_pynetdicom(listener: tuple[Listener, Published]) -> None:
    lst, _ = listener
    study = make_study([SeriesSpec(slices=3)], patient_name="<b>Doe</b>^Jane")
    assoc = associate(lst.settings)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    for ds in study:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    for ds in study:
        path = (
            lst.settings.spool_dir
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    with session_scope(lst.settings.database_url) as s:
        st = s.scalar(select(Study))
        assert st is not None and st.instance_count == 3 and st.state == StudyState.RECEIVING
        assert st.patient_name == "<b>Doe</b>^Jane"  # stored as is; escaped where shown


def test_dcmtk_storescu_and_echoscu(listener: tuple[Listener, Published], tmp_path: Path) -> None:
    lst, _ = listener
    storescu, echoscu = need_tool("storescu"), need_tool("echoscu")
    port = str(lst.settings.dicom_port)
    echo = subprocess.run([echoscu, "-aec", "COVIDCT", "127.0.0.1", port], capture_output=True)
    assert echo.returncode == 0
    files = write_study(
        make_study(
            [
                SeriesSpec(slices=12),
                SeriesSpec(kind="localizer"),
                SeriesSpec(slices=5, kind="derived"),
            ]
        ),
        tmp_path / "in",
    )
    res = subprocess.run(
        [storescu, "-aec", "COVIDCT", "-aet", "MODALITY", "127.0.0.1", port, *map(str, files)],
        capture_output=True,
        env=os.environ | {"TCP_NODELAY": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert count(lst.settings, Instance) == 18
    assert len(list(lst.settings.spool_dir.rglob("*.dcm"))) == 18


def test_refused_calling_ae_is_rejected_and_audited(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, COVIDCT_ALLOWED_AES="PACS")
    lst = Listener(settings, publish=Published())
    try:
        assoc = associate(settings, calling="INTRUDER")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        assoc = associate(settings, calling="PACS")
        assert assoc.is_established
        assoc.release()
        with session_scope(settings.database_url) as s:
            ev = s.scalar(select(AuditEvent).where(AuditEvent.action == "association.reject"))
            assert ev is not None and ev.actor == "INTRUDER" and ev.outcome == "refused"
    finally:
        lst.stop()


def test_wrong_called_ae_and_disk_floor(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, COVIDCT_MIN_FREE_DISK_MB="9999999")
    lst = Listener(settings, publish=Published())
    try:
        assoc = associate(settings, called="OTHER")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 0x07
        assoc = associate(settings)  # right AE but the disk is "full"
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x01)
    finally:
        lst.stop()


def test_other_sop_class_refused_at_negotiation(listener: tuple[Listener, Published]) -> None:
    lst, _ = listener
    assoc = associate(lst.settings, contexts=[MRImageStorage])
    assert not assoc.is_established  # no presentation context accepted: association fails
    assoc = associate(lst.settings, contexts=[MRImageStorage, CTImageStorage])
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert MRImageStorage not in accepted and CTImageStorage in accepted
    assoc.release()


@pytest.fixture
def raw_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's bytes as they are (its documented chunked mode)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_corrupt_dataset_answers_c210(
    listener: tuple[Listener, Published], tmp_path: Path, raw_sending: None
) -> None:
    lst, _ = listener
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    good = to_bytes(ds)
    # keep the file meta (so the SCU can send it) but replace the dataset with garbage
    meta_end = 144 + int.from_bytes(good[140:144], "little")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good[:meta_end] + b"garbage" * 20)
    assoc = associate(lst.settings)
    status = assoc.send_c_store(broken)
    assoc.release()
    assert status.Status == 0xC210
    assert count(lst.settings, Instance) == 0
    assert not list(lst.settings.spool_dir.rglob("*.dcm"))
    assert not list(lst.settings.spool_dir.rglob("*.tmp"))  # nothing was written


@pytest.mark.parametrize(
    "uid", ["../../../etc/passwd", "1.2.3/../../x", "1." + "2" * 70, "", "1.2.abc", "1..2"]
)
def test_hostile_uids_refused(listener: tuple[Listener, Published], uid: str) -> None:
    lst, _ = listener
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    ds.StudyInstanceUID = uid
    assoc = associate(lst.settings)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    assert count(lst.settings, Instance) == 0
    assert not any(p.is_file() for p in lst.settings.data_dir.rglob("*.dcm"))
    assert not (lst.settings.data_dir.parent / "etc").exists()


def test_duplicate_instance_is_idempotent(listener: tuple[Listener, Published]) -> None:
    lst, _ = listener
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    assoc = associate(lst.settings)
    assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert count(lst.settings, Instance) == 1
    assert len(list(lst.settings.spool_dir.rglob("*.dcm"))) == 1
    with session_scope(lst.settings.database_url) as s:
        st = s.scalar(select(Study))
        assert st is not None and st.instance_count == 1


# storescu proposes a compressed syntax only when told to; the rest go by pynetdicom
STORESCU_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
}


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_each_transfer_syntax_end_to_end(
    listener: tuple[Listener, Published], tmp_path: Path, syntax: str, raw_sending: None
) -> None:
    """Sent in that syntax (DCMTK's storescu where it can propose it, else pynetdicom),
    stored as received, decoded by the worker's path."""
    lst, _ = listener
    storescu = need_tool("storescu")
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    reference = to_model_input(ds)
    try:
        path = in_syntax(ds, syntax, tmp_path / "src")
    except FileNotFoundError as exc:
        need_tool(str(exc))
        raise
    sent = path.read_bytes()
    if syntax not in STORESCU_FLAG:
        assoc = associate(lst.settings, syntaxes=[syntax])
        assert assoc.send_c_store(path).Status == 0
        assoc.release()
    else:
        res = subprocess.run(
            [
                storescu,
                "-aec",
                "COVIDCT",
                "-R",
                STORESCU_FLAG[syntax],
                "127.0.0.1",
                str(lst.settings.dicom_port),
                str(path),
            ],
            capture_output=True,
        )
        assert res.returncode == 0, res.stderr
    with session_scope(lst.settings.database_url) as s:
        inst = s.scalar(select(Instance))
        assert inst is not None and inst.transfer_syntax_uid == syntax
        stored = Path(inst.spool_path)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
    # the dataset bytes are those sent (the file meta is rewritten by the receiver)
    assert stored.read_bytes()[-4096:] == sent[-4096:]
    got = to_model_input(pydicom.dcmread(stored))
    if syntax in LOSSY:
        assert np.abs(got.astype(int) - reference.astype(int)).mean() < 6
    else:
        assert np.array_equal(got, reference)


def test_four_concurrent_associations(listener: tuple[Listener, Published]) -> None:
    lst, _ = listener
    studies = [make_study([SeriesSpec(slices=100, rows=64)], seed=i) for i in range(4)]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(datasets: list) -> None:  # type: ignore[type-arg]
        assoc = associate(lst.settings)
        assert assoc.is_established
        got = [assoc.send_c_store(ds).Status for ds in datasets]
        assoc.release()
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=send, args=(st,)) for st in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [0] * 400
    assert count(lst.settings, Instance) == 400
    assert count(lst.settings, Study) == 4
    assert len(list(lst.settings.spool_dir.rglob("*.dcm"))) == 400
    with session_scope(lst.settings.database_url) as s:
        assert sorted(s.scalars(select(Study.instance_count)).all()) == [100] * 4


def test_study_queued_once_when_stable(listener: tuple[Listener, Published]) -> None:
    lst, published = listener
    study = make_study([SeriesSpec(slices=4)])
    assoc = associate(lst.settings)
    for ds in study:
        assoc.send_c_store(ds)
    release(assoc, lst.settings)
    assert lst.sweeper is not None
    assert lst.sweeper.sweep_once().queued == 0  # not yet stable
    later = utcnow() + timedelta(seconds=3)
    assert lst.sweeper.sweep_once(later).queued == 1
    assert lst.sweeper.sweep_once(later).queued == 0  # queued once
    assert published == [("covidct.analyse_study", 1)]
    # a late instance re-opens the study; it is queued again once stable
    (extra,) = make_study([SeriesSpec(slices=1)])[:1]
    extra.StudyInstanceUID = study[0].StudyInstanceUID
    assoc = associate(lst.settings)
    assert assoc.send_c_store(extra).Status == 0
    release(assoc, lst.settings)
    with session_scope(lst.settings.database_url) as s:
        st = s.scalar(select(Study))
        assert st is not None and st.state == StudyState.RECEIVING and st.generation == 1
    assert lst.sweeper.sweep_once(utcnow() + timedelta(seconds=3)).queued == 1
    assert len(published) == 2


def test_a_released_study_waits_only_the_shorter_quiet_time(tmp_path: Path) -> None:
    """A quiet time of 30 s, 0.5 s after a release: a study whose association was released
    is queued 0.5 s after the release; one whose sender aborted, or that another association
    still sends, is not; an instance after the release waits for the next release."""
    published = Published()
    settings = settings_for(
        tmp_path, COVIDCT_STABLE_SECONDS="30", COVIDCT_RELEASED_STABLE_SECONDS="0.5"
    )
    lst = Listener(settings, publish=published)
    assert lst.sweeper is not None
    try:
        released, aborted, late = (make_study([SeriesSpec(slices=2)], seed=i) for i in range(3))
        assoc = associate(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in released)
        release(assoc, settings)
        due = lst.sweeper.next_completion()  # the sweep's holder wakes then, not in 30 s
        assert due is not None and due <= utcnow() + timedelta(seconds=0.5)
        assoc = associate(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in aborted)
        assoc.abort()
        assoc = associate(settings)
        assert assoc.send_c_store(late[0]).Status == 0
        release(assoc, settings)
        more = associate(settings)  # the rest of the late study, the association left open
        assert more.send_c_store(late[1]).Status == 0
        time.sleep(0.3)  # the abort is settled within the close handler's wait
        ids = {st.study_instance_uid: st.id for st in _studies(settings)}
        first = lst.sweeper.sweep_once(utcnow() + timedelta(seconds=1))
        assert first.queued == 1
        assert published == [("covidct.analyse_study", ids[released[0].StudyInstanceUID])]
        release(more, settings)
        assert lst.sweeper.sweep_once(utcnow()).queued == 0  # 0.5 s not passed yet
        assert lst.sweeper.sweep_once(utcnow() + timedelta(seconds=1)).queued == 1
        assert published[-1] == ("covidct.analyse_study", ids[late[0].StudyInstanceUID])
        with session_scope(settings.database_url) as s:
            st = s.get(Study, ids[aborted[0].StudyInstanceUID])
            assert st is not None and st.state == StudyState.RECEIVING and st.released_at is None
        assert lst.sweeper.next_completion() is None  # the aborted one is not settled
    finally:
        lst.stop()


def _studies(settings: Settings) -> list[Study]:
    with session_scope(settings.database_url) as s:
        rows = list(s.scalars(select(Study)))
        for r in rows:
            s.expunge(r)
        return rows


def test_listener_restart_between_two_halves(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    study = make_study([SeriesSpec(slices=10)])
    first = Listener(settings, publish=Published())
    assoc = associate(settings)
    assert all(assoc.send_c_store(ds).Status == 0 for ds in study[:5])
    release(assoc, settings)
    first.stop()
    published = Published()
    second = Listener(settings, publish=published)
    try:
        assoc = associate(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study[5:])
        release(assoc, settings)
        assert count(settings, Instance) == 10
        assert second.sweeper is not None
        second.sweeper.sweep_once(utcnow() + timedelta(seconds=3))
        assert published == [("covidct.analyse_study", 1)]
    finally:
        second.stop()


def test_spool_file_without_record_is_recovered(tmp_path: Path) -> None:
    """A crash between the durable write and the database insert loses nothing."""
    settings = settings_for(tmp_path)
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    target = (
        settings.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    target.parent.mkdir(parents=True)
    target.write_bytes(to_bytes(ds))
    (target.parent / f".{target.name}.abc.tmp").write_bytes(b"half a file")
    lst = Listener(settings, publish=Published())
    lst.stop()
    assert count(settings, Instance) == 1
    assert not list(settings.spool_dir.rglob("*.tmp"))


def test_tls_association(tmp_path: Path) -> None:
    import ssl

    openssl = need_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    settings = settings_for(tmp_path, COVIDCT_TLS_CERT=str(cert), COVIDCT_TLS_KEY=str(key))
    lst = Listener(settings, publish=Published())
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assoc = associate(settings, tls=(ctx, "localhost"))
        assert assoc.is_established
        (ds,) = make_study([SeriesSpec(slices=1)])[:1]
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        plain = associate(settings)  # no TLS: the handshake fails, nothing is stored
        assert not plain.is_established
        assert count(settings, Instance) == 1
    finally:
        lst.stop()


def test_sop_class_mismatch_answers_a900(
    listener: tuple[Listener, Published], raw_sending: None
) -> None:
    lst, _ = listener
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # says Enhanced CT, sent as CT context
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.preamble = b"\x00" * 128
    path = lst.settings.data_dir / "mismatch.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)  # keeps the CT file meta
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID == CTImageStorage
    assoc = associate(lst.settings)
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900
    assert count(lst.settings, Instance) == 0
    assert not list(lst.settings.spool_dir.rglob("*.tmp"))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server of our own on a free port, so we can stop it without harming others."""
    need_tool("redis-server")
    port = free_port()
    with redis_server(port, tmp_path):
        yield port, tmp_path


@contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[subprocess.Popen]:
    """redis-server on ``port``, ready; stopped on leaving, even if it never answered."""
    import redis

    with launched(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stop_signal=signal.SIGKILL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:  # wait for readiness, not a fixed sleep
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield proc


def test_redis_down_during_transfer_loses_nothing(
    tmp_path: Path, private_redis: tuple[int, Path]
) -> None:
    import redis

    port, workdir = private_redis
    settings = settings_for(tmp_path, COVIDCT_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    lst = Listener(settings)  # the real Celery publisher
    assert lst.sweeper is not None
    client = redis.Redis(port=port)
    try:
        study_a = make_study([SeriesSpec(slices=10)], seed=1)
        study_b = make_study([SeriesSpec(slices=6)], seed=2)
        assoc = associate(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study_a[:5])
        client.shutdown(nosave=True)  # the broker goes down mid-transfer
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study_a[5:] + study_b)
        release(assoc, settings)
        later = utcnow() + timedelta(seconds=3)
        result = lst.sweeper.sweep_once(later)
        assert result.queued == 2 and result.publish_failures == 2
        # queued in the store, and due: the next sweep rings again
        assert count(settings, Study, Study.queued_at == lifecycle.NOT_RUNG) == 2
        with redis_server(port, workdir):
            assert lst.sweeper.sweep_once(later).requeued == 2
            assert lst.sweeper.sweep_once(later).requeued == 0
            assert client.llen("studies") == 2  # each study queued exactly once
            assert count(settings, Instance) == 16
            assert count(settings, Study, Study.state == StudyState.QUEUED) == 2
    finally:
        lst.stop()


def test_sweeper_republishes_a_stale_upload_once(listener: tuple[Listener, Published]) -> None:
    from core.models import Upload

    lst, published = listener
    with session_scope(lst.settings.database_url) as s:
        s.add(
            Upload(
                filename="a.png",
                content_type="image/png",
                sha256="0" * 64,
                size_bytes=1,
                width=1,
                height=1,
                path="x",
            )
        )
    assert lst.sweeper is not None
    later = utcnow() + timedelta(seconds=lst.settings.redeliver_seconds + 1)
    assert lst.sweeper.sweep_once(later).uploads == 1
    assert lst.sweeper.sweep_once(later).uploads == 0
    assert published == [("covidct.analyse_upload", 1)]


def test_guarded_recv_reads_whole_pdus_and_stops_at_close() -> None:
    """The listener's read (ingest.pdu_guard) returns exactly what was asked, across partial
    sends, and what came before a close; a header over its limit is refused before its body
    is read; tuning's install() is idempotent and keeps other time functions."""
    import struct

    import pynetdicom.association
    import pynetdicom.dimse
    import pynetdicom.dul

    from ingest import pdu_guard, tuning

    assert tuning.compatible()  # the pinned pynetdicom has the internals the patches need
    assert tuning.install()
    assert tuning.install()
    assert pdu_guard.compatible() and pdu_guard.install()
    assert pynetdicom.dul.time.sleep is tuning._sleep
    assert pynetdicom.association.time.monotonic is time.monotonic
    send_msg = pynetdicom.dimse.DIMSEServiceProvider.send_msg
    assert send_msg.covidct_tuning and not getattr(send_msg.__wrapped__, "covidct_tuning", 0)
    assert pynetdicom._config.LOG_HANDLER_LEVEL == "none"
    a, b = socket.socketpair()
    holder = type("S", (), {"socket": b})()
    payload = bytes(range(256)) * 500
    cut = (struct.pack(">BBL", 4, 0, len(payload)) + payload)[:-10]  # 10 bytes never come

    def send() -> None:
        for i in range(0, len(cut), 7000):
            a.sendall(cut[i : i + 7000])
        a.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert bytes(pdu_guard.guarded_recv(holder, 6)) == cut[:6]
    got = pdu_guard.guarded_recv(holder, len(payload))
    sender.join()
    assert bytes(got) == payload[:-10]  # what came before the close
    b.close()
    # a header claiming 2 GB: refused, nothing read after it, the connection shut
    a, b = socket.socketpair()
    holder = type("S", (), {"socket": b})()
    a.sendall(struct.pack(">BBL", 4, 0, 2**31) + b"x" * 100)
    assert pdu_guard.guarded_recv(holder, 6) == bytearray()
    assert pdu_guard.guarded_recv(holder, 6) == bytearray()  # the rest stays unread
    assert a.recv(10) == b""  # the listener's side shut the connection
    a.close()
    b.close()


def test_pdu_limits_and_association_request_items() -> None:
    import struct

    from ingest.pdu_guard import ASSOCIATE_LIMIT, check_associate, check_header

    def head(t: int, n: int) -> bytes:
        return struct.pack(">BBL", t, 0, n)

    assert check_header(head(1, ASSOCIATE_LIMIT)) == ""
    assert "over its limit" in check_header(head(1, ASSOCIATE_LIMIT + 1))
    assert check_header(head(5, 4)) == "" and "it has 4" in check_header(head(5, 0))
    assert check_header(head(0x08, 4)) == "unknown PDU type 0x08"

    def item(t: int, payload: bytes, length: int | None = None) -> bytes:
        return struct.pack(">BBH", t, 0, len(payload) if length is None else length) + payload

    fixed = bytes(68)
    pc = item(0x20, bytes(4) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)))
    context = item(0x10, b"1.2.840.10008.3.1.1.1")
    assert check_associate(fixed + context + pc + user) == ""
    assert "overruns" in check_associate(fixed + item(0x10, b"1.2", 500) + pc + user)
    bad_sub = item(0x20, bytes(4) + item(0x30, b"1.2", 300))
    assert "item 0x20" in check_associate(fixed + context + bad_sub + user)
    assert "without its presentation context" in check_associate(fixed + context + user)
    assert "shorter than its fixed fields" in check_associate(bytes(10))


class _FakeLoop(threading.Thread):
    """Stands in for pynetdicom's DUL or acceptor thread: naps once, records that it woke."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.woke = threading.Event()

    def run(self) -> None:
        from ingest import tuning

        tuning._sleep(tuning.PYNETDICOM_NAP)
        self.woke.set()


def test_loops_wake_on_work_not_on_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A nap ends when a primitive is queued for sending (DUL) or a complete message arrives
    (acceptor), long before its timeout; detach() closes the wake-up sockets."""
    import queue
    from types import SimpleNamespace

    from ingest import tuning

    monkeypatch.setattr(tuning, "PYNETDICOM_NAP", 30.0)  # a nap that would outlast the test
    dul = _FakeLoop()
    dul.to_provider_queue = queue.Queue()
    dul.socket = None
    assoc = SimpleNamespace(dul=dul)
    tuning.attach(assoc)
    dul.start()
    dul.to_provider_queue.put("A-RELEASE-RP")
    dul.join(10)
    assert dul.woke.is_set() and dul.to_provider_queue.get_nowait() == "A-RELEASE-RP"
    reader, writer = dul._covidct_wake
    tuning.detach(assoc)
    assert reader.fileno() == -1 and writer.fileno() == -1

    acceptor = _FakeLoop()
    acceptor.dimse = SimpleNamespace(msg_queue=queue.Queue())
    acceptor.start()
    acceptor.dimse.msg_queue.put((1, "C-STORE-RQ"))
    acceptor.join(10)
    assert acceptor.woke.is_set()


def _children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if b"resource_tracker" not in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextmanager
def listener_processes(tmp_path: Path, port: int) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`covidct listener` with two processes on ``port``, once both are up."""
    log = tmp_path / "listener.log"
    with two_process_listener(tmp_path / "var", port, log) as proc:
        yield proc, log


def test_listener_processes_share_the_port(tmp_path: Path) -> None:
    """`covidct listener` with two processes on one port (SO_REUSEPORT): parallel
    associations from DCMTK's storescu are each stored once, and SIGTERM stops them all."""
    storescu = need_tool("storescu")
    port = free_port()
    with listener_processes(tmp_path, port) as (proc, log), ExitStack() as stack:
        assert "(2 processes)" in log.read_text(), log.read_text()[-2000:]
        assert _children(proc.pid), "the second listener process did not start"
        files = write_study(make_study([SeriesSpec(slices=40, rows=64)], seed=9), tmp_path / "in")
        senders = [
            stack.enter_context(
                launched(
                    [storescu, "-aec", "COVIDCT", "-aet", "PACS", "127.0.0.1", str(port)]
                    + [str(f) for f in part],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
            for part in (files[i::8] for i in range(8))
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err
        settings = settings_for(tmp_path, COVIDCT_DICOM_PORT=str(port))
        assert count(settings, Instance) == 40
        assert len(list(settings.spool_dir.rglob("*.dcm"))) == 40
        helpers = _children(proc.pid)
        proc.terminate()  # the first process alone: it stops its helper
        proc.wait(60)
        assert proc.returncode == 0
        assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists()]


def test_helper_listener_stops_when_the_first_one_dies(tmp_path: Path) -> None:
    """A helper process must not keep the DICOM port after the first process is killed."""
    import signal

    with listener_processes(tmp_path, free_port()) as (proc, _):
        helpers = _children(proc.pid)
        assert helpers
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in helpers)


def test_a_second_listener_on_the_same_port_refuses_to_start(tmp_path: Path) -> None:
    """SO_REUSEPORT would let it share the port and split the studies: it must not."""
    from ingest.server import PortInUse

    first = Listener(settings_for(tmp_path / "a"), publish=Published())
    try:
        other = replace(settings_for(tmp_path / "b"), dicom_port=first.settings.dicom_port)
        with pytest.raises(PortInUse, match=f"DICOM port {first.port} is already used"):
            Listener(other, publish=Published())
    finally:
        first.stop()
    again = Listener(first.settings, publish=Published())  # the port was released at stop
    again.stop()


def test_a_study_is_queued_at_its_deadline_not_at_the_next_sweep(tmp_path: Path) -> None:
    """Sweeps 3 s apart and a quiet time of 1 s: once the sweeper holds the lease, a study is
    queued about 1 s after its last instance, not at the next pass; a late instance pushes
    the deadline back; a study with an association open is not queued."""
    from core.db import upgrade
    from core.models import Lease
    from covidct.testbed import spool_study
    from ingest.sweeper import Sweeper

    settings = settings_for(tmp_path, COVIDCT_SWEEP_SECONDS="3", COVIDCT_STABLE_SECONDS="1")
    upgrade(settings.database_url)
    published = Published()
    sweeper = Sweeper(settings, published)

    def arriving(datasets: list, open_associations: int = 0) -> int:
        study_id = spool_study(settings, datasets)
        with session_scope(settings.database_url) as s:
            study = s.get(Study, study_id)
            assert study is not None
            study.state = StudyState.RECEIVING  # spool_study queues; these are arriving
            study.open_associations = open_associations
            study.last_instance_at = utcnow()
        return study_id

    def lease_held() -> bool:
        with session_scope(settings.database_url) as s:
            return s.get(Lease, "sweeper") is not None

    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while not lease_held():  # the first pass, 3 s after the start, takes the lease
            assert time.monotonic() < deadline, "the sweeper never took the lease"
            time.sleep(0.05)
        arriving(make_study([SeriesSpec(slices=3, rows=64)], seed=2), open_associations=1)
        study = make_study([SeriesSpec(slices=3, rows=64)], seed=1)
        study_id = arriving(study[:2])
        time.sleep(0.5)
        arriving(study[2:])  # a late instance: the deadline moves
        started = time.monotonic()
        while not published and time.monotonic() - started < 5.0:
            time.sleep(0.02)
        took = time.monotonic() - started
        # the next pass is 2.4 s away: a queue at the deadline is about 1 s
        assert 0.8 <= took <= 2.0, f"queued {took:.2f} s after its last instance"
        time.sleep(1.0)
        assert published == [("covidct.analyse_study", study_id)]  # once; not the open one
    finally:
        sweeper.stop()
