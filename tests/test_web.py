"""The dashboard and API with Flask's test client: access, CSRF, escaping, uploads, API data."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select

from core.db import session_scope, upgrade
from core.models import AuditEvent, Instance, Prediction, ReportObject, Study, StudyState, Upload
from core.settings import Settings, load_settings
from core.users import create_token, create_user
from web.app import create_app

pytestmark = pytest.mark.unit

HOSTILE = '<script>alert("x")</script>^<img src=x onerror=alert(1)>'


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_MAX_UPLOAD_BYTES": "200000",
            "COVIDCT_MAX_UPLOAD_PIXELS": "1000000",
        }
    )
    upgrade(s.database_url)
    with session_scope(s.database_url) as db:
        create_user(db, "admin", "admin password", admin=True)
        create_user(db, "reader", "reader password")
    return s


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings, {"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf_token(client: FlaskClient, path: str = "/login") -> str:
    html = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page carries a CSRF token"
    return match.group(1)


def login(client: FlaskClient, user: str = "reader", password: str = "reader password") -> None:
    token = csrf_token(client)
    r = client.post("/login", data={"username": user, "password": password, "csrf_token": token})
    assert r.status_code == 302, r.get_data(as_text=True)


@pytest.fixture
def reader(client: FlaskClient) -> FlaskClient:
    login(client)
    return client


def _region(volume: float, ggo: float, cons: float) -> dict[str, float]:
    return {
        "volume_ml": volume,
        "ggo_percent": ggo,
        "consolidation_percent": cons,
        "opacity_percent": ggo + cons,
    }


QUANTIFICATION = {
    "lungs": {
        "right": _region(2500.0, 8.0, 1.0),
        "left": _region(2100.0, 6.0, 0.5),
        "total": _region(4600.0, 7.1, 0.8),
    },
    "zones": {"right lower": _region(900.0, 20.0, 2.0), "left lower": _region(800.0, 15.0, 1.0)},
    "zone_scores": {"right lower": 2, "left lower": 2},
    "severity_score": 4,
    "severity_max": 30,
    "bilateral": True,
    "peripheral_predominant": True,
    "lower_predominant": True,
    "pattern": "typical",
    "notes": [],
    "basis": "CNN probability 0.910 against 0.500; pattern typical",
    "overlay": "/nonexistent/lungs-g0.npz",
}


@pytest.fixture
def study(settings: Settings) -> Iterator[int]:
    with session_scope(settings.database_url) as db:
        st = Study(
            study_instance_uid="1.2.826.0.1.3680043.10.1404.77",
            patient_id="PID-77",
            patient_name=HOSTILE,
            accession_number="ACC77",
            study_date="20260301",
            modality="CT",
            instance_count=40,
            state=StudyState.DONE,
            verdict="Present",
            probability=0.91,
            slices_analysed=38,
            model_version="m-1",
            quantification=QUANTIFICATION,
        )
        db.add(st)
        db.flush()
        db.add(
            Prediction(
                kind="study",
                study_id=st.id,
                probability=0.91,
                label="Present",
                threshold=0.5,
                model_version="m-1",
            )
        )
        study_id = st.id
    yield study_id


PAGES = [
    "/",
    "/slices/1/overlay.png",
    "/uploads",
    "/studies/1.2.3",
    "/slices/1/model.png",
    "/slices/1/original.png",
    "/uploads/1/model.png",
    "/studies/1.2.3/reports/1.dcm",
]
API = ["/api/studies", "/api/studies/1.2.3", "/api/uploads", "/api/uploads/1"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_refuse_anonymous(client: FlaskClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 302 and "/login" in r.headers["Location"]


@pytest.mark.parametrize("path", API)
def test_api_refuses_anonymous(client: FlaskClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401 and r.json == {"error": "authentication required"}


def test_health_endpoints_are_open(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    r = client.get("/readyz")
    assert r.json["database"] == "ok" and r.json["broker"] == "ok"


def test_readyz_names_each_reason_it_cannot_take_work(tmp_path: Path) -> None:
    """No live worker, then free disk below the listener's floor: 503 with the reasons;
    a worker seen recently and a floor the disk clears: 200."""
    from core import health

    settings = load_settings(
        {"COVIDCT_DATA_DIR": str(tmp_path / "var"), "COVIDCT_MIN_FREE_DISK_MB": str(10**7)}
    )
    upgrade(settings.database_url)
    client = create_app(settings, {"TESTING": True}).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json["status"] == "unavailable"
    assert r.json["workers"].startswith("no live worker")
    assert "DICOM associations are refused" in r.json["disk"]
    assert len(r.json["reasons"]) == 2
    health.beat(settings, "host:1")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json["workers"] == "ok"
    assert [x.split(":")[0] for x in r.json["reasons"]] == ["disk"]

    roomy = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    health.beat(roomy, "host:1")
    r = create_app(roomy, {"TESTING": True}).test_client().get("/readyz")
    assert r.status_code == 200 and r.json["reasons"] == [], r.json
    health.gone(roomy, "host:1")
    assert health.live_workers(roomy) == 0


def test_post_without_csrf_is_refused(client: FlaskClient, settings: Settings) -> None:
    r = client.post("/login", data={"username": "reader", "password": "reader password"})
    assert r.status_code == 400
    login(client)
    r = client.post(
        "/uploads", data={"file": (io.BytesIO(b"x"), "a.png")}, content_type="multipart/form-data"
    )
    assert r.status_code == 400
    r = client.post(
        "/api/uploads",
        data={"file": (io.BytesIO(b"x"), "a.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 400
    with session_scope(settings.database_url) as db:
        assert db.scalar(select(func.count()).select_from(Upload)) == 0


def test_wrong_password_and_audit(client: FlaskClient, settings: Settings) -> None:
    token = csrf_token(client)
    r = client.post("/login", data={"username": "reader", "password": "nope", "csrf_token": token})
    assert r.status_code == 401
    assert "Wrong user name or password" in r.get_data(as_text=True)
    login(client)
    with session_scope(settings.database_url) as db:
        outcomes = db.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "login")).all()
    assert sorted(outcomes) == ["ok", "refused"]


def test_login_redirect_stays_on_site(client: FlaskClient) -> None:
    token = csrf_token(client)
    r = client.post(
        "/login?next=//evil.example.com/x",
        data={"username": "reader", "password": "reader password", "csrf_token": token},
    )
    assert r.headers["Location"] == "/"


def test_patient_name_html_is_escaped(reader: FlaskClient, study: int) -> None:
    for path in ("/", "/studies/1.2.826.0.1.3680043.10.1404.77"):
        html = reader.get(path).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert" in html


def test_security_headers_and_notice(reader: FlaskClient, study: int) -> None:
    r = reader.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "not a diagnosis" in r.get_data(as_text=True)
    # scripts only from files (the CSP would block inline ones anyway)
    assert not re.search(r"<script(?![^>]*\bsrc=)", r.get_data(as_text=True))
    assert re.search(r'<script src="/static/localtime.js">', r.get_data(as_text=True))


def test_worklist_filters_and_search(reader: FlaskClient, study: int, settings: Settings) -> None:
    with session_scope(settings.database_url) as db:
        db.add(
            Study(
                study_instance_uid="1.2.3.4",
                patient_id="OTHER",
                accession_number="X1",
                state=StudyState.QUEUED,
            )
        )
    html = reader.get("/?q=PID-77").get_data(as_text=True)
    assert "ACC77" in html and "OTHER" not in html
    html = reader.get("/?state=queued").get_data(as_text=True)
    assert "OTHER" in html and "ACC77" not in html
    assert 'http-equiv="refresh"' in html  # a study in flight: the page refreshes itself
    html = reader.get("/?verdict=Present&sort=positive").get_data(as_text=True)
    assert "ACC77" in html and "OTHER" not in html
    html = reader.get("/?from=2999-01-01").get_data(as_text=True)
    assert "No studies match" in html


def test_api_returns_what_the_database_holds(reader: FlaskClient, study: int) -> None:
    body = reader.get("/api/studies").json
    assert body["total"] == 1 and "not a diagnosis" in body["notice"]
    (item,) = body["items"]
    assert item["study_instance_uid"] == "1.2.826.0.1.3680043.10.1404.77"
    assert item["patient_id"] == "PID-77" and item["state"] == "done"
    assert item["verdict"] == "Present" and item["probability"] == 0.91
    assert item["report_state"] == "none"
    detail = reader.get("/api/studies/1.2.826.0.1.3680043.10.1404.77").json
    assert detail["threshold"] == 0.5 and detail["slices_analysed"] == 38
    assert reader.get("/api/studies/9.9.9").status_code == 404


def test_bearer_token(client: FlaskClient, settings: Settings, study: int) -> None:
    with session_scope(settings.database_url) as db:
        token = create_token(db, "reader")
    r = client.get("/api/studies", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json["total"] == 1
    assert client.get("/api/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    png = io.BytesIO()
    Image.new("L", (64, 64), 128).save(png, format="PNG")
    r = client.post(
        "/api/uploads",
        headers={"Authorization": f"Bearer {token}"},
        data={"file": (io.BytesIO(png.getvalue()), "slice.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202 and r.json["state"] == "queued" and r.json["id"] == 1


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("L").save(buf, format="PNG")
    return buf.getvalue()


BAD_UPLOADS = {
    "not an image": (b"%PDF-1.4 not an image", "not a PNG or JPEG"),
    "empty": (b"", "empty"),
    "too large": (b"\x89PNG" + b"0" * 300_000, "exceeds the limit"),
    "too many pixels": (None, "exceeds the limit of 1000000 pixels"),
    "truncated": (_png((300, 300))[:400], "damaged"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_nothing_is_stored(
    reader: FlaskClient, settings: Settings, case: str
) -> None:
    data, message = BAD_UPLOADS[case]
    if data is None:
        buf = io.BytesIO()
        Image.new("1", (1200, 1200)).save(buf, format="PNG")  # small file, 1.44 Mpx
        data = buf.getvalue()
    token = csrf_token(reader, "/uploads")
    r = reader.post(
        "/uploads",
        data={"csrf_token": token, "file": (io.BytesIO(data), "x.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 400
    assert message in r.get_data(as_text=True)
    r = reader.post(
        "/api/uploads",
        data={"csrf_token": token, "file": (io.BytesIO(data), "x.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 400 and message in r.json["error"]
    with session_scope(settings.database_url) as db:
        assert db.scalar(select(func.count()).select_from(Upload)) == 0
    assert not settings.uploads_dir.exists() or not any(settings.uploads_dir.iterdir())


def test_good_upload_is_stored_and_queued(reader: FlaskClient, settings: Settings) -> None:
    token = csrf_token(reader, "/uploads")
    r = reader.post(
        "/uploads",
        data={
            "csrf_token": token,
            "file": [(io.BytesIO(_png()), "a.png"), (io.BytesIO(_png()), "b.png")],
        },
        content_type="multipart/form-data",
        follow_redirects=True,
    )
    assert r.status_code == 200
    assert "2 image(s) queued" in r.get_data(as_text=True)
    body = reader.get("/api/uploads").json
    assert [u["filename"] for u in body["items"]] == ["b.png", "a.png"]
    assert all(u["state"] == "queued" for u in body["items"])


def test_only_admins_rerun(client: FlaskClient, study: int, settings: Settings) -> None:
    uid = "1.2.826.0.1.3680043.10.1404.77"
    login(client)
    token = csrf_token(client, f"/studies/{uid}")
    assert client.post(f"/studies/{uid}/rerun", data={"csrf_token": token}).status_code == 403
    client.post("/logout", data={"csrf_token": token})
    login(client, "admin", "admin password")
    token = csrf_token(client, f"/studies/{uid}")
    r = client.post(f"/studies/{uid}/rerun", data={"csrf_token": token})
    assert r.status_code == 302
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study)
        assert st is not None and st.state == StudyState.QUEUED
        assert db.scalar(select(AuditEvent).where(AuditEvent.action == "study.rerun")) is not None


def test_rerun_of_a_study_still_receiving_is_refused(
    client: FlaskClient, study: int, settings: Settings
) -> None:
    """A re-run that queued a study still receiving would analyse half a study."""
    uid = "1.2.826.0.1.3680043.10.1404.77"
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study)
        assert st is not None
        st.state = StudyState.RECEIVING  # instances are arriving (test set-up)
    login(client, "admin", "admin password")
    token = csrf_token(client, f"/studies/{uid}")
    r = client.post(f"/studies/{uid}/rerun", data={"csrf_token": token}, follow_redirects=True)
    assert "still being received, queued or processed" in r.get_data(as_text=True)
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study)
        assert st is not None and st.state == StudyState.RECEIVING
        assert db.scalar(select(AuditEvent).where(AuditEvent.action == "study.rerun")) is None


def test_errors_show_no_stack_trace(reader: FlaskClient) -> None:
    r = reader.get("/studies/does-not-exist")
    assert r.status_code == 404 and "Traceback" not in r.get_data(as_text=True)


def test_study_page_and_api_show_the_lung_measurements(reader: FlaskClient, study: int) -> None:
    uid = "1.2.826.0.1.3680043.10.1404.77"
    html = reader.get(f"/studies/{uid}").get_data(as_text=True)
    assert "Lungs (segmented in Hounsfield units)" in html
    assert "typical" in html and "severity 4 of 30" in html
    assert "right lower zone" in html and "4600" in html
    detail = reader.get(f"/api/studies/{uid}").json
    assert detail["measurements"]["opacity_percent"] == pytest.approx(7.9)
    assert detail["measurements"]["severity_score"] == 4
    assert detail["quantification"]["zones"]["left lower"]["volume_ml"] == 800.0
    assert "overlay" not in detail["quantification"]  # no server paths in the API
    (item,) = reader.get("/api/studies").json["items"]
    assert item["measurements"]["pattern"] == "typical"


def test_overlay_draws_contours_and_opacity() -> None:
    from classifier.render import OVERLAY_COLOURS, draw_overlay

    gray = np.full((256, 256), 40, np.uint8)
    code = np.zeros((128, 128), np.uint8)
    code[20:100, 10:60] = 1  # right lung
    code[20:100, 70:120] = 2  # left lung
    code[50:60, 20:40] |= 8  # consolidation in the right lung
    rgb = draw_overlay(gray, code, size=256)
    assert tuple(rgb[40, 20]) == OVERLAY_COLOURS["right"]  # the top edge of the right lung
    assert tuple(rgb[40, 140]) == OVERLAY_COLOURS["left"]
    assert rgb[110, 60, 0] > 100 and rgb[110, 60, 1] < 60  # consolidation tinted red
    assert tuple(rgb[120, 80]) == (40, 40, 40)  # inside the right lung, clear: untouched


def test_overlay_of_an_analysed_study(
    reader: FlaskClient, settings: Settings, tmp_path: Path
) -> None:
    """The worker's pipeline (in-process) analyses a drawn chest; the study page's top slices
    get the overlay with the lungs' contours, and a slice of another series gets none."""
    from dataclasses import replace

    from classifier.inference import Classifier
    from classifier.render import OVERLAY_COLOURS
    from covidct.synthetic import SeriesSpec, make_study
    from covidct.testbed import spool_study
    from tests.helpers import make_tiny_model
    from worker.pipeline import analyse_study

    model = make_tiny_model(tmp_path / "tiny.keras", weight=12.0, bias=-3.0)
    study = make_study([SeriesSpec(slices=30, ground_glass=True, rows=256)])
    study_id = spool_study(settings, study)
    outcome = analyse_study(replace(settings, model_path=model), study_id, Classifier(model))
    assert outcome.state == StudyState.DONE
    uid = str(study[0].StudyInstanceUID)
    html = reader.get(f"/studies/{uid}").get_data(as_text=True)
    paths = re.findall(r'src="(/slices/\d+/overlay\.png)"', html)
    assert paths, "the top slices carry overlays"
    r = reader.get(paths[0])
    assert r.status_code == 200 and r.mimetype == "image/png"
    rgb = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"))
    colours = {tuple(int(v) for v in px) for px in rgb.reshape(-1, 3)}
    assert OVERLAY_COLOURS["right"] in colours and OVERLAY_COLOURS["left"] in colours
    # the key images sent to the PACS are pictures of the slices the page calls key
    assert f"with {len(paths)} key image(s) and a key object selection" in html
    shown = [int(p.split("/")[2]) for p in paths]
    with session_scope(settings.database_url) as db:
        on_page = {
            db.get(Instance, db.get(Prediction, pid).instance_id).sop_instance_uid  # type: ignore[union-attr]
            for pid in shown
        }
        pictured = {
            pydicom.dcmread(o.path).SourceImageSequence[0].ReferencedSOPInstanceUID
            for o in db.scalars(select(ReportObject).where(ReportObject.kind == "sc"))
        }
    assert pictured == on_page
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study_id)
        assert st is not None and st.quantification is not None
        st.quantification = {**st.quantification, "series_instance_uid": "1.2.3"}
    assert reader.get(paths[0]).status_code == 404


def test_an_incomplete_study_says_so_in_the_worklist_detail_and_api(
    reader: FlaskClient, study: int, settings: Settings
) -> None:
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study)
        assert st is not None
        st.incomplete_reason = "the association from <CT1> ended without release after 40"
    html = reader.get("/").get_data(as_text=True)
    assert 'class="incomplete"' in html and ">partial</span>" in html
    detail = reader.get("/studies/1.2.826.0.1.3680043.10.1404.77").get_data(as_text=True)
    assert "The study may be incomplete" in detail and "&lt;CT1&gt;" in detail
    api = reader.get("/api/studies/1.2.826.0.1.3680043.10.1404.77").json
    assert api["incomplete_reason"].startswith("the association from <CT1>")


def test_lungs_that_failed_the_gate_show_no_opacity_figures(
    reader: FlaskClient, study: int, settings: Settings
) -> None:
    """A segmentation that failed its checks: the page says so with the figures, and neither
    the page nor the API gives an opacity figure or a pattern."""
    failed = {
        **QUANTIFICATION,
        "lungs_ok": False,
        "lung_volume_ml": 627.0,
        "lung_slices": 3,
        "lung_span_slices": 3,
        "lung_check_reasons": ["627 mL of lung is less than an adult holds (1200) <b>"],
        "lung_check": "lungs not segmented reliably: 627 mL of lung is less than an adult holds",
        "basis": "lungs not segmented reliably: 627 mL; CNN probability 0.100 against 0.500",
    }
    with session_scope(settings.database_url) as db:
        st = db.get(Study, study)
        assert st is not None
        st.quantification, st.verdict = failed, "Indeterminate"
    uid = "1.2.826.0.1.3680043.10.1404.77"
    html = reader.get(f"/studies/{uid}").get_data(as_text=True)
    assert "Lungs not segmented reliably" in html and "627 mL of lung" in html
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert "right lower zone" not in html and "severity 4 of 30" not in html
    m = reader.get(f"/api/studies/{uid}").json["measurements"]
    assert m["lungs_ok"] is False and m["lung_check"].startswith("lungs not segmented")
    assert m["opacity_percent"] is None and m["pattern"] is None and m["severity_score"] is None
    assert m["lung_volume_ml"] == 4600.0


def test_key_slices_are_spread_over_the_lungs() -> None:
    """Four neighbours 2.5 mm apart show the same thing: the page shows the best slice of
    each part of the lungs, no two within 10 mm."""
    from web.queries import key_slices

    probs = {-132.5: 0.97, -130.0: 0.96, -127.5: 0.95, -125.0: 0.94, -60.0: 0.7, 10.0: 0.8}
    probs |= {20.0: 0.2, 17.5: 0.79, 40.0: None}
    slices = [{"id": i, "position": z, "probability": p} for i, (z, p) in enumerate(probs.items())]
    chosen = key_slices(slices)
    assert [s["position"] for s in chosen] == [-132.5, 10.0, -60.0, 20.0]
    positions = [s["position"] for s in chosen]
    assert all(abs(a - b) >= 10 for i, a in enumerate(positions) for b in positions[i + 1 :])
    # one image, no position: still shown
    single = [{"id": 1, "position": None, "probability": 0.4}]
    assert key_slices(single) == single


@pytest.fixture
def series(settings: Settings, study: int) -> list[int]:
    """Five spooled slices of the study, 0.5 x 1.0 mm pixels (not square), with predictions:
    what the viewer scrolls."""
    import pydicom

    from core.models import Instance
    from covidct.synthetic import SeriesSpec, make_study

    datasets = make_study([SeriesSpec(slices=5, rows=128)], seed=3)
    ids = []
    with session_scope(settings.database_url) as db:
        for i, ds in enumerate(datasets):
            ds.PixelSpacing = [0.5, 1.0]
            ds.InstanceNumber = 101 + i
            path = settings.spool_dir / f"{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            inst = Instance(
                study_id=study,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                spool_path=str(path),
            )
            db.add(inst)
            db.flush()
            pred = Prediction(
                kind="slice",
                study_id=study,
                instance_id=inst.id,
                position=float(pydicom.dcmread(path).ImagePositionPatient[2]),
                probability=0.1 * (i + 1),
                label="x",
                threshold=0.5,
                model_version="m-1",
            )
            db.add(pred)
            db.flush()
            ids.append(pred.id)
    return ids


def test_the_viewer_gets_the_series_with_image_numbers_and_sides(
    reader: FlaskClient, series: list[int]
) -> None:
    uid = "1.2.826.0.1.3680043.10.1404.77"
    data = reader.get(f"/studies/{uid}/viewer.json").json
    slices = data["slices"]
    positions = [s["position"] for s in slices]
    assert positions == sorted(positions) and sorted(s["id"] for s in slices) == series
    # the synthetic series runs head to foot: image 101 is the top slice
    assert [s["image_number"] for s in slices] == [105, 104, 103, 102, 101]
    assert all(s["right_on_left"] and s["head_at_high"] for s in slices)  # axial, LPS
    assert data["key"] and set(data["key"]) <= set(series)
    html = reader.get(f"/studies/{uid}").get_data(as_text=True)
    assert 'id="viewer"' in html and "viewer.js" in html


def test_viewer_images_have_square_pixels_and_are_cached(
    reader: FlaskClient, series: list[int], settings: Settings
) -> None:
    r = reader.get(f"/slices/{series[0]}/view.png?size=256")
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    img = Image.open(io.BytesIO(r.data))
    # 128 x 128 pixels of 0.5 mm (rows) by 1.0 mm (columns): 64 mm tall, 128 mm wide
    assert img.size == (256, 128)
    cached = list((settings.data_dir / "cache" / "views").glob("*.png"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.data
    assert reader.get(f"/slices/{series[0]}/view.png?size=256").data == r.data
    assert reader.get(f"/slices/{series[0]}/view.png?size=300").status_code == 400
    # no segmentation stored for this series: no overlay, said plainly
    assert reader.get(f"/slices/{series[0]}/view.png?overlay=1").status_code == 404


def test_viewer_needs_a_login(client: FlaskClient, series: list[int]) -> None:
    uid = "1.2.826.0.1.3680043.10.1404.77"
    assert client.get(f"/slices/{series[0]}/view.png").status_code == 302
    assert client.get(f"/studies/{uid}/viewer.json").status_code == 302


def test_the_worklist_says_what_happened(
    reader: FlaskClient, study: int, settings: Settings
) -> None:
    with session_scope(settings.database_url) as db:
        db.add(
            Study(
                study_instance_uid="1.2.3.5",
                patient_id="NA1",
                patient_name="Not^Analysable",
                instance_count=1,
                state=StudyState.NOT_ANALYSABLE,
                state_reason="no axial CT series with at least 20 slices",
            )
        )
    html = reader.get("/").get_data(as_text=True)
    assert "2026-03-01" in html and "20260301" not in html  # the study date, readable
    assert re.search(r"<time datetime=\"[^\"]+\">\d{4}-\d\d-\d\d \d\d:\d\d UTC</time>", html)
    assert "38 of 40" in html  # slices analysed of the images received
    assert "7.9%" in html and "4 of 30" in html  # opacity and severity
    assert "not analysable" in html and "not_analysable<" not in html
    assert "no axial CT series with at least 20 slices" in html  # why, in the row
    assert ">Not Analysable</a>" in html  # the link is the patient
    page = reader.get("/studies/1.2.3.5").get_data(as_text=True)
    assert "No report: the study was not analysed" in page and "No report yet" not in page


def test_an_error_looks_like_one(reader: FlaskClient) -> None:
    token = csrf_token(reader, "/uploads")
    r = reader.post("/uploads", data={"csrf_token": token}, follow_redirects=True)
    assert '<li class="flash-error" role="alert">Choose one or more' in r.get_data(as_text=True)
