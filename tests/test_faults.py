"""Faults, with real processes: workers killed with -9, a PACS that hangs, messages lost.

Each test asserts the figure the operations guide (docs/operations.md) promises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Delivery, DeliveryState, utcnow
from core.settings import Settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import TestPACS, child_pids, launched, spool_study, stage_pids
from ingest.sweeper import Sweeper
from tests.test_worker import make_settings, wait_for
from worker.app import DELIVER_TASK, publish

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def worker_process(settings: Settings) -> Iterator[subprocess.Popen]:
    """A real ``covidct worker`` (prefork, one child) on the settings' broker and store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(settings.data_dir),
        "COVIDCT_BROKER_URL": settings.broker_url,
        "COVIDCT_MODEL_PATH": str(settings.model_path),
        "COVIDCT_DESTINATIONS": ",".join(map(str, settings.destinations)),
        "COVIDCT_DATABASE_URL": settings.database_url,
        "COVIDCT_MIN_SERIES_SLICES": "5",
        "COVIDCT_BATCH_SIZE": str(settings.batch_size),
    }
    log = settings.data_dir / "worker.log"  # printed when a test fails: the worker's story
    with (
        log.open("w") as fh,
        launched(
            [sys.executable, "-m", "covidct.cli", "worker", "--concurrency", "1"],
            grace=30,
            env=env,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        try:
            yield proc
        except BaseException:
            print(f"--- {log} (last 4000 characters)\n{log.read_text()[-4000:]}")
            raise


def kill_children(proc: subprocess.Popen) -> list[int]:
    pids = child_pids(proc.pid)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def delivery_row(settings: Settings) -> Delivery:
    with session_scope(settings.database_url) as s:
        row = s.scalar(select(Delivery))
        assert row is not None
        return row


def analysed_study(settings: Settings) -> int:
    """A study analysed in this process: its report and outbox row exist, nothing sent."""
    from classifier.inference import Classifier
    from worker.pipeline import analyse_study

    study_id = spool_study(settings, make_study([SeriesSpec(slices=6)]))
    analyse_study(settings, study_id, Classifier(settings.model_path))
    return study_id


def test_worker_killed_during_delivery_resends_within_seconds_and_counts_it(
    tmp_path: Path, redis_db: int
) -> None:
    """The PACS hangs on the C-STORE; the worker child is killed; the PACS comes back.  The
    delivery is taken over within 15 s of the kill (not the 900 s it once waited), ends
    delivered, and the interrupted attempt is counted: the PACS saw the same SR twice."""
    gate = threading.Event()
    pacs = TestPACS(gate=gate)
    try:
        settings = make_settings(tmp_path, redis_db, pacs.destination)
        analysed_study(settings)
        from worker.tasks import create_app

        with worker_process(settings) as worker:
            publish(create_app(settings), DELIVER_TASK, delivery_row(settings).id)
            wait_for(lambda: len(pacs.reports) == 1, timeout=120, what="the C-STORE to hang")
            assert kill_children(worker)
            killed = time.monotonic()
            gate.set()
            wait_for(
                lambda: delivery_row(settings).state == DeliveryState.DELIVERED,
                timeout=60,
                what="delivered after the kill",
            )
            took = time.monotonic() - killed
        row = delivery_row(settings)
        print(f"\ndelivered {took:.1f} s after its worker was killed")
        assert took < 20, f"delivered {took:.1f} s after the kill"
        assert row.interrupted == 1 and row.attempts == 1 and row.claimed_until is None
        assert len(pacs.reports) == 2
        assert pacs.reports[0].SOPInstanceUID == pacs.reports[1].SOPInstanceUID
    finally:
        gate.set()
        pacs.stop()


def test_a_lost_delivery_message_is_published_again_after_redeliver_seconds(
    tmp_path: Path, redis_db: int
) -> None:
    settings = make_settings(tmp_path, redis_db, "PACS@127.0.0.1:9")
    analysed_study(settings)
    now = utcnow()
    with session_scope(settings.database_url) as s:  # published, then the message was lost
        row = s.scalar(select(Delivery))
        assert row is not None
        row.next_attempt_at = now + timedelta(seconds=settings.redeliver_seconds)
    sent: list[tuple[str, int]] = []
    sweeper = Sweeper(settings, lambda task, obj: sent.append((task, obj)))
    assert sweeper.sweep_once(now + timedelta(seconds=5)).deliveries == 0
    later = now + timedelta(seconds=settings.redeliver_seconds + 1)
    assert sweeper.sweep_once(later).deliveries == 1
    assert sent == [(DELIVER_TASK, delivery_row(settings).id)]
    assert settings.redeliver_seconds <= 30


def readyz(env: dict[str, str]) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{env['COVIDCT_WEB_PORT']}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_restarts_a_dead_stage_and_keeps_the_port_open(tmp_path: Path) -> None:
    """The worker stage killed -9: the DICOM port stays open and a new worker starts; the
    listener stage killed -9: the port is open again within 15 s; a study sent afterwards
    is analysed by the restarted worker."""
    import sqlite3

    from tests.conftest import port_open
    from tests.test_e2e import base_env, send_study, serve, wait

    env = base_env(tmp_path)
    port = int(env["COVIDCT_DICOM_PORT"])
    log = tmp_path / "serve.log"
    with serve(env, log) as proc:
        wait(lambda: readyz(env)[0] == 200, 60, "/readyz 200 (the worker says it is alive)")
        first = wait(lambda: (p := stage_pids(proc.pid)) and len(p) == 4 and p, 30, "4 stages")
        os.kill(first["worker"], signal.SIGKILL)
        for _ in range(10):  # the listener is not touched by the worker's death
            assert port_open("127.0.0.1", port)
            time.sleep(0.3)
        wait(
            lambda: stage_pids(proc.pid).get("worker", first["worker"]) != first["worker"],
            15,
            "a new worker",
        )
        os.kill(first["listener"], signal.SIGKILL)
        killed = time.monotonic()
        wait(
            lambda: stage_pids(proc.pid).get("listener", first["listener"]) != first["listener"],
            15,
            "a new listener",
        )
        wait(lambda: port_open("127.0.0.1", port), 15, "the DICOM port open again")
        print(f"\nDICOM port open again {time.monotonic() - killed:.1f} s after the kill")
        study_uid, _ = send_study(env, tmp_path)
        db = tmp_path / "var" / "covidct.sqlite3"

        def finished() -> str | None:
            with sqlite3.connect(db) as con:
                row = con.execute(
                    "SELECT state FROM studies WHERE study_instance_uid = ?", (study_uid,)
                ).fetchone()
            return row[0] if row and row[0] in ("done", "not_analysable", "failed") else None

        assert wait(finished, 120, "the study analysed") == "done"
        second = subprocess.run(  # a second service on the same ports refuses to start
            [sys.executable, "-m", "covidct.cli", "serve"],
            env=env | {"COVIDCT_DATA_DIR": str(tmp_path / "other")},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert f"DICOM port {port} is already used by another covidct listener" in lines[0]
        assert f"under covidct serve pid {proc.pid}" in lines[0] and "covidct stop" in lines[0]
    text = log.read_text()
    # start-up says things once, and nothing a user cannot act on
    assert text.count("effective settings") == 1
    for noise in ("SecurityWarning", "No hostname was supplied", "oneDNN", "-------------- ["):
        assert noise not in text, noise
    assert "worker exited with status -9; restarting it" in text
    assert "listener exited with status -9; restarting it" in text


class Outage:
    """A real outage of one PostgreSQL database: new connections refused, open ones ended."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from tests.conftest import PG_ADMIN_URL

        self.sa, self.name = sa, url.rsplit("/", 1)[1]
        self.admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def begin(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                self.sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": self.name},
            )

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))


def test_database_down_35_s_during_analysis_is_ridden_out(
    tmp_path: Path, redis_db: int, pg_url: str
) -> None:
    """PostgreSQL refuses connections for 35 s while a real worker analyses a study (once
    beyond the 5 retries' 31 s): the task's backoff (1, 2, 4, 8, 16, then 30 s) outlasts it
    and the study ends done with one report and one SR at the PACS."""
    from core.db import dispose_engines, upgrade
    from core.models import Report, Study, StudyState
    from worker.app import STUDY_TASK

    pacs = TestPACS()
    outage = Outage(pg_url)
    try:
        settings = make_settings(
            tmp_path,
            redis_db,
            pacs.destination,
            COVIDCT_DATABASE_URL=pg_url,
            COVIDCT_BATCH_SIZE="4",
        )
        upgrade(pg_url)
        study_id = spool_study(settings, make_study([SeriesSpec(slices=120)]))
        from worker.tasks import create_app

        def state() -> str:
            with session_scope(settings.database_url) as s:
                row = s.get(Study, study_id)
                return str(row.state) if row else ""

        with worker_process(settings):
            publish(create_app(settings), STUDY_TASK, study_id)
            wait_for(lambda: state() == StudyState.PROCESSING, 120, "processing")
            outage.begin()
            time.sleep(35)
            outage.end()
            dispose_engines()
            wait_for(lambda: state() == StudyState.DONE, 180, "done after the outage")
            wait_for(lambda: len(pacs.reports) == 1, 60, "the SR")
        with session_scope(settings.database_url) as s:
            assert len(s.scalars(select(Report.id)).all()) == 1
            row = s.get(Study, study_id)
            assert row is not None and row.attempts >= 2  # the retried task claimed it again
        assert len(pacs.reports) == 1
    finally:
        outage.end()
        pacs.stop()


# --- partial studies ----------------------------------------------------------------------


def listener_settings(tmp_path: Path, **extra: str) -> Settings:
    from core.settings import load_settings
    from tests.conftest import free_port

    return load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_DICOM_PORT": str(free_port()),
            "COVIDCT_STABLE_SECONDS": "1",
            "COVIDCT_SWEEP_SECONDS": "3600",  # the tests sweep themselves
            "COVIDCT_MIN_FREE_DISK_MB": "0",
        }
        | extra
    )


def study_state(settings: Settings) -> dict:
    from core.models import Study

    with session_scope(settings.database_url) as s:
        st = s.scalar(select(Study))
        assert st is not None
        return {
            "state": st.state,
            "generation": st.generation,
            "incomplete": st.incomplete_reason,
            "open": st.open_associations,
            "instances": st.instance_count,
        }


def sender(settings: Settings):  # type: ignore[no-untyped-def]
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    return assoc


def test_aborted_association_waits_the_grace_and_a_retry_completes_the_study(
    tmp_path: Path,
) -> None:
    """Half a study, then A-ABORT: marked incomplete, not queued after the stable time but
    after the grace; the sender's retry (a released association) clears the mark and opens
    the study again so that a complete analysis supersedes the partial one."""
    from ingest.server import Listener

    settings = listener_settings(tmp_path)
    sent: list[tuple[str, int]] = []
    listener = Listener(settings, publish=lambda task, obj: sent.append((task, obj)))
    assert listener.sweeper is not None
    try:
        study = make_study([SeriesSpec(slices=10)])
        assoc = sender(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study[:4])
        assoc.abort()
        wait_for(lambda: study_state(settings)["incomplete"] != "", 10, "the abort settled")
        st = study_state(settings)
        assert "ended without release after 4 instance(s)" in st["incomplete"] and st["open"] == 0
        now = utcnow()
        assert listener.sweeper.sweep_once(now + timedelta(seconds=5)).queued == 0
        grace = timedelta(seconds=settings.incomplete_grace_seconds + 1)
        assert listener.sweeper.sweep_once(now + grace).queued == 1
        assert study_state(settings)["state"] == "queued"

        retry = sender(settings)  # the sender retries the whole study
        assert all(retry.send_c_store(ds).Status == 0 for ds in study)
        retry.release()
        wait_for(lambda: study_state(settings)["incomplete"] == "", 10, "the retry settled")
        st = study_state(settings)
        assert st["state"] == "receiving" and st["generation"] == 1 and st["instances"] == 10
        assert listener.sweeper.sweep_once(utcnow() + timedelta(seconds=2)).queued == 1
    finally:
        listener.stop()


def test_sender_killed_part_way_marks_the_study_incomplete(tmp_path: Path) -> None:
    """DCMTK's storescu killed -9 while it sends: the association ends without release."""
    from ingest.server import Listener
    from tests.conftest import need_tool

    settings = listener_settings(tmp_path)
    listener = Listener(settings, publish=lambda task, obj: None)
    try:
        from covidct.synthetic import write_study

        files = write_study(make_study([SeriesSpec(slices=120)]), tmp_path / "study")
        from core.models import Instance

        def stored() -> int:
            with session_scope(settings.database_url) as s:
                return len(s.scalars(select(Instance.id)).all())

        with launched(
            [need_tool("storescu"), "-aec", settings.ae_title, "-aet", "MODALITY"]
            + ["127.0.0.1", str(settings.dicom_port), *map(str, files)],
            stop_signal=signal.SIGKILL,  # the sender dies part way
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ):
            wait_for(lambda: stored() >= 10, 60, "some instances stored")
        wait_for(lambda: study_state(settings)["incomplete"] != "", 10, "the close settled")
        st = study_state(settings)
        assert "ended without release" in st["incomplete"] and st["instances"] < 120
    finally:
        listener.stop()


def test_listener_killed_mid_association_marks_the_study_at_restart(tmp_path: Path) -> None:
    """``covidct listener`` killed -9 while an association is open: at its restart the
    study it was receiving is marked incomplete."""
    settings = listener_settings(tmp_path, COVIDCT_LISTENER_PROCESSES="1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(settings.data_dir),
        "COVIDCT_DICOM_PORT": str(settings.dicom_port),
        "COVIDCT_LISTENER_PROCESSES": "1",
        "COVIDCT_MIN_FREE_DISK_MB": "0",
    }
    from tests.conftest import port_open

    def listener() -> Any:
        return launched(
            [sys.executable, "-m", "covidct.cli", "listener"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    with listener() as proc:
        wait_for(lambda: port_open("127.0.0.1", settings.dicom_port), 60, "the listener")
        study = make_study([SeriesSpec(slices=6)])
        assoc = sender(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study[:3])
        assert study_state(settings)["open"] == 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assoc.abort()
    with listener():
        wait_for(lambda: port_open("127.0.0.1", settings.dicom_port), 60, "the listener again")
        st = study_state(settings)
        assert st["open"] == 0 and "listener stopped" in st["incomplete"]


def test_store_outage_during_receive_is_noted_and_recorded_by_the_sweeper(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL refuses connections while an instance arrives: the instance is written,
    answered 0xA700 and noted; once the database is back the sweeper records it (no
    restart, no resend); the association that saw the refusal is settled too."""
    from core.db import dispose_engines, upgrade
    from ingest.server import Listener

    settings = listener_settings(tmp_path, COVIDCT_DATABASE_URL=pg_url)
    upgrade(pg_url)
    listener = Listener(settings, publish=lambda task, obj: None)
    assert listener.sweeper is not None
    outage = Outage(pg_url)
    try:
        study = make_study([SeriesSpec(slices=6)])
        assoc = sender(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study[:3])
        outage.begin()
        assert assoc.send_c_store(study[3]).Status == 0xA700
        assoc.release()
        # the close is settled (or noted) by the association's thread after the release:
        # wait for it, else the sweep below may run before its note exists
        wait_for(lambda: not listener.server.active_associations, what="the close handled")
        outage.end()
        dispose_engines()
        notes = list(settings.pending_dir.glob("*.json"))
        assert len(notes) >= 1  # the instance, and the close if the store was still down
        result = listener.sweeper.sweep_once()
        assert result.noted == len(notes)
        st = study_state(settings)
        assert st["instances"] == 4 and st["open"] == 0
        assert list(settings.pending_dir.glob("*.json")) == []
    finally:
        outage.end()
        listener.stop()


def test_a_retry_of_duplicates_supersedes_a_partial_analysis(tmp_path: Path) -> None:
    """Every instance arrived but the association aborted; the study was analysed as
    partial.  The sender's retry (duplicates only, released) clears the mark and opens the
    study again (next generation)."""
    from core.models import Study, StudyState
    from ingest.server import Listener

    settings = listener_settings(tmp_path)
    listener = Listener(settings, publish=lambda task, obj: None)
    try:
        study = make_study([SeriesSpec(slices=5)])
        assoc = sender(settings)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study)
        assoc.abort()
        wait_for(lambda: study_state(settings)["incomplete"] != "", 10, "the abort settled")
        with session_scope(settings.database_url) as s:  # as the worker's finish leaves it
            row = s.scalar(select(Study))
            assert row is not None
            row.state = StudyState.DONE
        retry = sender(settings)
        assert all(retry.send_c_store(ds).Status == 0 for ds in study)
        retry.release()
        wait_for(lambda: study_state(settings)["incomplete"] == "", 10, "the retry settled")
        st = study_state(settings)
        assert st["state"] == "receiving" and st["generation"] == 1 and st["instances"] == 5
    finally:
        listener.stop()


def test_partial_study_sr_says_partial_and_validates(tmp_path: Path) -> None:
    from classifier.inference import Classifier
    from core.db import upgrade
    from core.models import Report, Study
    from core.settings import load_settings
    from tests.helpers import make_tiny_model
    from tests.sr_reading import read_finding
    from worker.pipeline import analyse_study

    settings = load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_MODEL_PATH": str(make_tiny_model(tmp_path / "m" / "tiny.keras")),
            "COVIDCT_MIN_SERIES_SLICES": "5",
        }
    )
    upgrade(settings.database_url)
    study_id = spool_study(settings, make_study([SeriesSpec(slices=24)]))
    with session_scope(settings.database_url) as s:
        row = s.get(Study, study_id)
        assert row is not None
        row.incomplete_reason = "the association from CT1 ended without release after 24"
    outcome = analyse_study(settings, study_id, Classifier(settings.model_path))
    assert outcome.state == "done"
    with session_scope(settings.database_url) as s:
        path = s.scalar(select(Report.path))
    import pydicom

    from tests.test_worker import dciodvfy_errors

    sr = pydicom.dcmread(path)
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.CompletionFlagDescription.startswith("may be incomplete: ")
    assert "transfer interrupted" in sr.CompletionFlagDescription
    assert read_finding(sr)[1] == outcome.verdict
    assert dciodvfy_errors(Path(path)) == []


@pytest.mark.slow
def test_nothing_outlives_serve_killed_with_sigkill(tmp_path: Path) -> None:
    """serve killed -9 (the OOM killer, a runtime's timeout): every stage, the worker's pool
    and the listener's second process end within 5 s (core.parentwatch) and the DICOM and
    web ports are free: a new serve starts at once, and `covidct stop` stops it."""
    from tests.conftest import port_open
    from tests.test_e2e import base_env, wait

    env = base_env(tmp_path)
    dicom, web = int(env["COVIDCT_DICOM_PORT"]), int(env["COVIDCT_WEB_PORT"])

    def serve_logging_to(out: Any) -> Any:
        return launched(
            [sys.executable, "-m", "covidct.cli", "serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    with (tmp_path / "serve.log").open("w") as out, serve_logging_to(out) as proc:
        wait(lambda: port_open("127.0.0.1", dicom) and port_open("127.0.0.1", web), 120, "ports")
        stages = wait(lambda: (p := stage_pids(proc.pid)) and len(p) == 4 and p, 30, "4 stages")
        # each stage with its children: the worker's pool, the listener's second process
        family = wait(
            lambda: (
                (f := [*stages.values(), *(c for s in stages.values() for c in child_pids(s))])
                and len(f) >= 6
                and f
            ),
            60,
            "the worker's pool and the listener's second process",
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()

        def alive() -> list[int]:
            out = []
            for pid in family:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != "Z":
                    out.append(pid)
            return out

        wait(lambda: not alive(), 8, f"every stage of serve to end (left: {alive()})")
        took = time.monotonic() - killed
        assert took < 6.0, f"the stages took {took:.1f} s to end"
        assert not port_open("127.0.0.1", dicom) and not port_open("127.0.0.1", web)
        print(f"\nall {len(family)} processes of serve ended {took:.1f} s after its SIGKILL")
    with (tmp_path / "serve2.log").open("w") as out, serve_logging_to(out) as again:
        wait(lambda: "covidct is running" in (tmp_path / "serve2.log").read_text(), 120, "serve")
        assert port_open("127.0.0.1", dicom) and port_open("127.0.0.1", web)  # the banner waits
        stopped = subprocess.run(
            [sys.executable, "-m", "covidct.cli", "stop"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"covidct (pid {again.pid}) stopped" in stopped.stdout
        assert again.wait(5) == 0
        assert "covidct stopped." in (tmp_path / "serve2.log").read_text()


@pytest.mark.slow
def test_a_frozen_listener_is_seen_and_restarted(tmp_path: Path) -> None:
    """The listener's processes frozen (SIGSTOP): a TCP connect still succeeds, but /readyz
    answers 503 naming the listener (its C-ECHO gets no answer), serve kills the frozen
    listener after three unanswered C-ECHOs and restarts it, and `covidct echo` is answered
    again; a closed port makes `covidct echo` exit 1.  Meanwhile an SR whose first delivery
    failed (the PACS was down) reaches the PACS within 30 s of its coming up, with the
    production backoff (10 s): the sweeper stage retries it while the listener is frozen."""
    import sqlite3

    from tests.conftest import free_port, port_open
    from tests.test_e2e import base_env, send_study, serve, wait

    pacs_port = free_port()
    env = base_env(
        tmp_path,
        COVIDCT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
        COVIDCT_SR_RETRY_BASE_SECONDS="10",
    )
    port = int(env["COVIDCT_DICOM_PORT"])
    db = Path(env["COVIDCT_DATA_DIR"]) / "covidct.sqlite3"

    def failed_attempts() -> int:
        con = sqlite3.connect(db)
        try:
            row = con.execute("SELECT max(attempts) FROM deliveries").fetchone()
        finally:
            con.close()
        return int(row[0] or 0)

    def echo(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "covidct.cli", "echo", *extra],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with serve(env, tmp_path / "serve.log") as proc:
        wait(lambda: readyz(env)[0] == 200, 60, "/readyz 200")
        first = echo()
        assert first.returncode == 0 and "ok" in first.stdout, first.stderr
        send_study(env, tmp_path)
        wait(lambda: db.exists() and failed_attempts() >= 1, 120, "a failed first delivery")
        listener = stage_pids(proc.pid)["listener"]
        frozen = [listener, *child_pids(listener)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        pacs = TestPACS(port=pacs_port)
        try:
            assert port_open("127.0.0.1", port)  # what a TCP health check would believe
            status, body = wait(
                lambda: (r := readyz(env))[0] == 503 and r, 30, "/readyz 503 naming the listener"
            )
            assert "listener" in body and body["listener"] != "ok", body
            print(f"\n/readyz 503 {time.monotonic() - stopped_at:.1f} s after the freeze")
            wait(lambda: pacs.reports, 30, "the SR at the PACS within 30 s of its coming up")
            print(f"SR delivered {time.monotonic() - stopped_at:.1f} s after the PACS came up")
            wait(
                lambda: stage_pids(proc.pid).get("listener", listener) != listener,
                90,
                "serve to restart the frozen listener",
            )
            print(f"listener restarted {time.monotonic() - stopped_at:.1f} s after the freeze")
        finally:
            pacs.stop()
            for pid in frozen:  # whatever happened, nothing stays stopped
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        wait(lambda: echo().returncode == 0, 60, "C-ECHO answered by the new listener")
        wait(lambda: readyz(env)[0] == 200, 60, "/readyz 200 again")
    closed = echo("--timeout", "2")
    assert closed.returncode == 1 and "no answer" in closed.stderr


def test_one_sweeper_at_a_time(tmp_path: Path) -> None:
    """Two sweepers on one results store (two machines, a restart overlap): the lease lets
    one sweep; when it stops renewing, the other takes over once the lease expires, and a
    clean stop hands it over at once."""
    from core.db import upgrade
    from core.health import hold_lease, release_lease
    from core.settings import load_settings

    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    upgrade(settings.database_url)
    assert hold_lease(settings, "sweeper", "a:1", 0.5)
    assert hold_lease(settings, "sweeper", "a:1", 0.5)  # renewed by its holder
    assert not hold_lease(settings, "sweeper", "b:2", 0.5)
    time.sleep(0.6)  # a's lease lapses: it stopped renewing
    assert hold_lease(settings, "sweeper", "b:2", 30)
    assert not hold_lease(settings, "sweeper", "a:1", 30)
    release_lease(settings, "sweeper", "b:2")
    assert hold_lease(settings, "sweeper", "a:1", 30)

    published: list[tuple[str, int]] = []
    fast = replace(settings, sweep_seconds=0.1)

    class Counted(Sweeper):
        """Counts its passes: with the lease, one of two sweepers never sweeps."""

        passes = 0

        def sweep_once(self, now: Any = None) -> Any:
            self.passes += 1
            return super().sweep_once(now)

    sweepers = [Counted(fast, lambda t, i: published.append((t, i))) for _ in range(2)]
    release_lease(settings, "sweeper", "a:1")
    study_id = spool_study(settings, make_study([SeriesSpec(slices=3, rows=32)]))
    with session_scope(settings.database_url) as s:  # due for a re-publish: queued long ago
        from core.models import Study

        row = s.get(Study, study_id)
        assert row is not None
        row.queued_at = utcnow() - timedelta(seconds=settings.requeue_seconds + 5)
    for sw in sweepers:
        sw.start()
    try:
        wait_for(lambda: published, 10, "a sweep")
        time.sleep(1.0)  # both threads run about ten passes meanwhile
    finally:
        for sw in sweepers:
            sw.stop()
    assert published.count(("covidct.analyse_study", study_id)) == 1
    assert sorted(sw.passes for sw in sweepers)[0] == 0 and max(sw.passes for sw in sweepers) > 3
