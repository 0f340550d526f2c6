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
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Delivery, DeliveryState, utcnow
from core.settings import Settings
from covidct.synthetic import SeriesSpec, make_study
from ingest.sweeper import Sweeper
from tests.helpers import TestPACS, spool_study
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
        "COVIDCT_MIN_SERIES_SLICES": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidct.cli", "worker", "--concurrency", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_children(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
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
            wait_for(lambda: len(pacs.received) == 1, timeout=120, what="the C-STORE to hang")
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
        assert took < 20, f"delivered {took:.1f} s after the kill"
        assert row.interrupted == 1 and row.attempts == 1 and row.claimed_until is None
        assert len(pacs.received) == 2
        assert pacs.received[0].SOPInstanceUID == pacs.received[1].SOPInstanceUID
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


def stage_pids(serve_pid: int) -> dict[str, int]:
    """The main process of each stage ``covidct serve`` started."""
    out = subprocess.run(["pgrep", "-P", str(serve_pid)], capture_output=True, text=True)
    pids: dict[str, int] = {}
    for pid in map(int, out.stdout.split()):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for stage in ("listener", "worker", "web"):
            if stage.encode() in args:
                pids[stage] = pid
    return pids


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
        first = wait(lambda: (p := stage_pids(proc.pid)) and len(p) == 3 and p, 30, "3 stages")
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
        wait(lambda: not port_open("127.0.0.1", port) or time.monotonic() - killed > 1, 5, "")
        wait(lambda: port_open("127.0.0.1", port), 15, "the DICOM port open again")
        study_uid, _ = send_study(env, tmp_path)
        db = tmp_path / "var" / "covidct.sqlite3"

        def finished() -> str | None:
            with sqlite3.connect(db) as con:
                row = con.execute(
                    "SELECT state FROM studies WHERE study_instance_uid = ?", (study_uid,)
                ).fetchone()
            return row[0] if row and row[0] in ("done", "not_analysable", "failed") else None

        assert wait(finished, 120, "the study analysed") == "done"
    text = log.read_text()
    assert "worker exited with status -9; restarting it" in text
    assert "listener exited with status -9; restarting it" in text
