"""End to end with software nobody here wrote: DCMTK as modality and PACS, Orthanc as PACS.

`covidct serve` runs as a subprocess with the shipped model; studies arrive by C-STORE, the SR
goes back by C-STORE, dciodvfy checks it, the JSON API shows the verdict.  The latency from the
last instance received to the SR acknowledged by the PACS (stability window excluded) is
printed and appended to var/measurements/e2e_latency.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from core.settings import SHIPPED_MODEL
from covidct.synthetic import SeriesSpec, make_study, write_study
from covidct.testbed import launched
from tests.conftest import REDIS_HOST, REDIS_PORT, free_port, need, need_tool, port_open

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
STABLE = 1.0


def wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")}
    return (
        env
        | {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_DICOM_PORT": str(free_port()),
            "COVIDCT_WEB_PORT": str(free_port()),
            "COVIDCT_STABLE_SECONDS": str(STABLE),
            "COVIDCT_SWEEP_SECONDS": "0.3",
            "COVIDCT_SR_RETRY_BASE_SECONDS": "1",
            "TCP_NODELAY": "1",
        }
        | extra
    )


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    assert SHIPPED_MODEL.is_file(), "the shipped model is committed under models/"
    with (
        log.open("w") as fh,
        launched(
            [sys.executable, "-m", "covidct.cli", "serve"],
            stop_signal=signal.SIGINT,  # Ctrl-C: serve stops its stages in order
            grace=60,
            env=env,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        web = f"http://127.0.0.1:{env['COVIDCT_WEB_PORT']}/healthz"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(web, timeout=1)
            except OSError:
                return False
            return port_open("127.0.0.1", int(env["COVIDCT_DICOM_PORT"]))

        wait(up, 120, "covidct serve to listen")
        yield proc
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "covidct stopped." in log.read_text()


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    out = subprocess.run(
        [sys.executable, "-m", "covidct.cli", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def api(env: dict[str, str], token: str, path: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{env['COVIDCT_WEB_PORT']}{path}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@contextmanager
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp as the hospital PACS that receives our SRs."""
    exe = need_tool("storescp")
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    with launched(
        [exe, "-aet", "PACS", "-od", str(folder), "+xa", str(port)],
        env=os.environ | {"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ):
        wait(lambda: port_open("127.0.0.1", port), 20, "storescp")
        yield port, folder


def storescu(env: dict[str, str], files: list[Path], *options: str) -> None:
    """DCMTK's storescu sends ``files`` to the service in one association, as a modality."""
    res = subprocess.run(
        [
            need_tool("storescu"),
            *options,
            "-aec",
            "COVIDCT",
            "-aet",
            "MODALITY",
            "127.0.0.1",
            env["COVIDCT_DICOM_PORT"],
            *map(str, files),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr


def send_study(env: dict[str, str], tmp_path: Path) -> tuple[str, float]:
    """A multi-series CT study (axial, localizer, derived) sent by DCMTK's storescu."""
    study = make_study(
        [
            SeriesSpec(slices=40, ground_glass=True),
            SeriesSpec(kind="localizer"),
            SeriesSpec(slices=6, kind="derived"),
        ],
        patient_name="E2E^Test",
    )
    storescu(env, write_study(study, tmp_path / "study"))
    return str(study[0].StudyInstanceUID), time.time()


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def record_latency(name: str, seconds: float) -> None:
    folder = ROOT / "var" / "measurements"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "e2e_latency.jsonl").open("a") as fh:
        fh.write(
            json.dumps(
                {
                    "test": name,
                    "seconds": round(seconds, 3),
                    "at": datetime.now().isoformat(timespec="seconds"),
                }
            )
            + "\n"
        )
    print(
        f"\n{name}: last instance received -> SR acknowledged, minus the "
        f"{STABLE:.0f} s stability window: {seconds:.2f} s"
    )


def latency_sqlite(db: Path, study_uid: str) -> float:
    con = sqlite3.connect(db)
    try:
        last, delivered = con.execute(
            "SELECT s.last_instance_at, d.delivered_at FROM studies s "
            "JOIN reports r ON r.study_id = s.id JOIN deliveries d ON d.report_id = r.id "
            "WHERE s.study_instance_uid = ?",
            (study_uid,),
        ).fetchone()
    finally:
        con.close()
    return (
        datetime.fromisoformat(delivered) - datetime.fromisoformat(last)
    ).total_seconds() - STABLE


def run_full_path(env: dict[str, str], tmp_path: Path, pacs_dir: Path) -> tuple[str, dict]:
    cli(env, "create-user", "e2e", "--admin", "--password-stdin", stdin="e2e password\n")
    token = cli(env, "create-token", "e2e")
    study_uid, _ = send_study(env, tmp_path)
    import pydicom

    from tests.sr_reading import read_finding

    def at_pacs() -> dict[str, list[Path]]:
        """The files storescp wrote, by modality (a file still being written is left out)."""
        out: dict[str, list[Path]] = {}
        for path in pacs_dir.iterdir():
            try:
                modality = str(pydicom.dcmread(path, stop_before_pixels=True).Modality)
            except Exception:  # noqa: S112  (a file storescp is still writing)
                continue
            out.setdefault(modality, []).append(path)
        return out

    sr_file = wait(lambda: at_pacs().get("SR", [None])[0], 180, "the SR at the PACS")
    sr = pydicom.dcmread(sr_file)
    assert dciodvfy_errors(sr_file) == []
    assert sr.StudyInstanceUID == study_uid

    def delivered() -> dict | None:
        d = api(env, token, f"/api/studies/{study_uid}")
        return d if d["report_state"] == "delivered" else None

    detail = wait(delivered, 60, "delivered in the API")
    # the key images and the key object selection came in the same association, before the
    # delivery was recorded
    files = at_pacs()
    assert len(files["KO"]) == 1 and 1 <= len(files["OT"]) <= 4
    for path in files["KO"] + files["OT"]:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid and dciodvfy_errors(path) == [], path
    # the drawn chest's apex and base slices hold too little lung to frame
    scored = [x for x in detail["slices"] if x["probability"] is not None]
    assert detail["state"] == "done" and 10 < detail["slices_analysed"] == len(scored) < 40
    m = detail["measurements"]
    assert m["lung_volume_ml"] > 400 and m["opacity_percent"] > 0.5  # its ground glass
    assert detail["quantification"]["zone_scores"]
    probability, verdict, _ = read_finding(sr)
    assert detail["verdict"] == verdict
    assert detail["probability"] == pytest.approx(probability, abs=1e-5)
    listed = api(env, token, "/api/studies")["items"]
    assert [i["study_instance_uid"] for i in listed] == [study_uid]
    return study_uid, detail


def test_serve_embedded_with_dcmtk(tmp_path: Path) -> None:
    with storescp(tmp_path) as (pacs_port, pacs_dir):
        env = base_env(tmp_path, COVIDCT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}")
        with serve(env, tmp_path / "serve.log"):
            study_uid, _ = run_full_path(env, tmp_path, pacs_dir)
    record_latency(
        "embedded (SQLite, filesystem queue)",
        latency_sqlite(tmp_path / "var" / "covidct.sqlite3", study_uid),
    )


def test_serve_with_redis_and_postgresql(tmp_path: Path, pg_url: str) -> None:
    need(port_open(REDIS_HOST, REDIS_PORT), "Redis on 127.0.0.1:6379")
    import redis
    import sqlalchemy as sa

    db = 3
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
    with storescp(tmp_path) as (pacs_port, pacs_dir):
        env = base_env(
            tmp_path,
            COVIDCT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
            COVIDCT_BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
            COVIDCT_DATABASE_URL=pg_url,
        )
        with serve(env, tmp_path / "serve.log"):
            study_uid, _ = run_full_path(env, tmp_path, pacs_dir)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        last, delivered = conn.execute(
            sa.text(
                "SELECT s.last_instance_at, d.delivered_at FROM studies s JOIN reports r ON "
                "r.study_id = s.id JOIN deliveries d ON d.report_id = r.id "
                "WHERE s.study_instance_uid = :u"
            ),
            {"u": study_uid},
        ).one()
    engine.dispose()
    record_latency("Redis + PostgreSQL", (delivered - last).total_seconds() - STABLE)


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@contextmanager
def orthanc(
    tmp_path: Path, covidct_port: int, *, dicomweb: bool = False, users: dict | None = None
) -> Iterator[tuple[int, int]]:
    """Orthanc on free ports; with ``dicomweb`` its DICOMweb plugin (Debian's
    orthanc-dicomweb) at /dicom-web/; with ``users`` HTTP basic authentication."""
    exe = need_tool("Orthanc")
    if dicomweb:
        need(DICOMWEB_PLUGIN.is_file(), "Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb)")
    http, dicom = free_port(), free_port()
    storage = tmp_path / "orthanc"
    storage.mkdir()
    config = {
        "Name": "covidct-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"covidct": ["COVIDCT", "127.0.0.1", covidct_port]},
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        "HttpsVerifyPeers": False,
        "StableAge": 1,
    }
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps(config))
    with launched(
        [exe, str(cfg)],
        env=os.environ | {"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ):
        wait(lambda: port_open("127.0.0.1", http) and port_open("127.0.0.1", dicom), 60, "Orthanc")
        yield http, dicom


def orthanc_call(
    http: int, path: str, body: bytes | None = None, auth: tuple[str, str] | None = None
) -> object:
    req = urllib.request.Request(
        f"http://127.0.0.1:{http}{path}", data=body, method="POST" if body is not None else "GET"
    )
    if auth:
        import base64

        pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {pair}")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


def test_orthanc_as_the_hospital_pacs(tmp_path: Path) -> None:
    env = base_env(tmp_path, COVIDCT_ALLOWED_AES="ORTHANC")
    with orthanc(tmp_path, int(env["COVIDCT_DICOM_PORT"])) as (http, dicom):
        env["COVIDCT_DESTINATIONS"] = f"ORTHANC@127.0.0.1:{dicom}"
        study = make_study(
            [SeriesSpec(slices=30, ground_glass=True), SeriesSpec(kind="localizer")],
            patient_id="ORTH01",
        )
        for path in write_study(study, tmp_path / "study"):
            orthanc_call(http, "/instances", path.read_bytes())
        (orthanc_study,) = orthanc_call(http, "/studies")  # type: ignore[misc]
        with serve(env, tmp_path / "serve.log"):
            orthanc_call(
                http,
                "/modalities/covidct/store",
                json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode(),
            )

            def sr_series() -> list:
                series = orthanc_call(http, f"/studies/{orthanc_study}/series")
                return [
                    s
                    for s in series  # type: ignore[union-attr]
                    if s["MainDicomTags"].get("Modality") == "SR"
                ]

            (sr,) = wait(sr_series, 180, "the SR filed in the same study in Orthanc")
            assert sr["MainDicomTags"]["SeriesDescription"] == "AI OUTPUT - NOT FOR DIAGNOSTIC USE"
            assert sr["ParentStudy"] == orthanc_study

            # the key images and the key object selection, filed in the same study
            def by_modality() -> dict | None:
                series = orthanc_call(http, f"/studies/{orthanc_study}/series")
                out = {s["MainDicomTags"].get("Modality"): s for s in series}  # type: ignore[union-attr]
                return out if {"KO", "OT"} <= set(out) else None

            by_modality = wait(by_modality, 30, "the key objects and images in Orthanc")
            assert len(by_modality["KO"]["Instances"]) == 1
            assert 1 <= len(by_modality["OT"]["Instances"]) <= 4
            assert by_modality["OT"]["MainDicomTags"]["SeriesDescription"].startswith("AI KEY")


def test_backfill_from_orthanc(tmp_path: Path) -> None:
    """Orthanc holds a study from before the service was installed: `covidct backfill` finds
    it by C-FIND, C-MOVEs it to the service, which analyses it and files the SR back in
    Orthanc; run again, it moves nothing."""
    env = base_env(tmp_path, COVIDCT_ALLOWED_AES="ORTHANC")
    with orthanc(tmp_path, int(env["COVIDCT_DICOM_PORT"])) as (http, dicom):
        env["COVIDCT_DESTINATIONS"] = f"ORTHANC@127.0.0.1:{dicom}?objects=sr"
        study = make_study([SeriesSpec(slices=24)], patient_id="OLD01")
        for path in write_study(study, tmp_path / "study"):
            orthanc_call(http, "/instances", path.read_bytes())
        (orthanc_study,) = orthanc_call(http, "/studies")  # type: ignore[misc]
        source = ["--source", f"ORTHANC@127.0.0.1:{dicom}"]
        with serve(env, tmp_path / "serve.log"):
            empty = cli(env, "backfill", *source, "--since", "2999-01-01")
            assert empty.splitlines()[0].startswith("0 studies found")
            first = cli(env, "backfill", *source, "--since", "2000-01-01", "--modality", "CT")
            assert first.splitlines()[0] == (
                "1 studies found, 0 already here, 1 moved (24 instances), 0 failed"
            )

            def sr_back() -> list:
                series = orthanc_call(http, f"/studies/{orthanc_study}/series")
                return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]  # type: ignore[union-attr]

            wait(sr_back, 180, "the backfilled study's SR in Orthanc")
            again = cli(env, "backfill", *source, "--since", "2000-01-01")
            assert again.splitlines()[0] == (
                "1 studies found, 1 already here, 0 moved (0 instances), 0 failed"
            )


def test_backfill_from_the_operations_page(tmp_path: Path) -> None:
    """An admin starts a backfill for a date range from the operations page: it asks Orthanc
    (a real C-FIND) in a thread and writes its start and summary to the audit log."""
    from sqlalchemy import select

    from core.db import session_scope, upgrade
    from core.models import AuditEvent
    from core.settings import load_settings
    from core.users import create_user
    from tests.test_web import csrf_token, login
    from web.app import create_app

    with orthanc(tmp_path, free_port()) as (_, dicom):
        settings = load_settings(
            {
                "COVIDCT_DATA_DIR": str(tmp_path / "var"),
                "COVIDCT_BACKFILL_SOURCE": f"ORTHANC@127.0.0.1:{dicom}",
            }
        )
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as s:
            create_user(s, "admin", "admin password", admin=True)
        client = create_app(settings, {"TESTING": True}).test_client()
        login(client, "admin", "admin password")
        page = client.get("/admin/operations").get_data(as_text=True)
        assert f"Backfill from ORTHANC@127.0.0.1:{dicom}" in page
        r = client.post(
            "/admin/backfill",
            data={"csrf_token": csrf_token(client, "/admin/operations"), "since": "2999-01-01"},
        )
        assert r.status_code == 302

        def done() -> AuditEvent | None:
            with session_scope(settings.database_url) as s:
                event = s.scalar(select(AuditEvent).where(AuditEvent.action == "backfill.done"))
                if event is not None:
                    s.expunge(event)
                return event

        event = wait(done, 60, "the backfill's summary in the audit log")
        assert event.outcome == "ok" and event.actor == "admin"
        assert event.detail["summary"].startswith("0 studies found")
