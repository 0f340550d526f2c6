"""Dashboard pages: worklist, study detail, images, SR download, uploads, admin actions."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import current_user, login_required
from PIL import Image
from scipy import ndimage
from sqlalchemy import select

from classifier.errors import UnusableInputError
from classifier.preprocess import to_model_input, windowed_slice
from core import audit, lifecycle
from core.db import session_scope
from core.health import readiness
from core.models import Delivery, Instance, Prediction, Report, Study, StudyState, Upload, utcnow
from core.settings import Settings
from web.queries import (
    SORTS,
    STATES,
    VERDICTS,
    Filters,
    list_studies,
    list_uploads,
    study_detail,
)
from web.uploads import UploadRejected, accept_upload, queue_upload

bp = Blueprint("views", __name__)
IN_FLIGHT = {StudyState.RECEIVING, StudyState.QUEUED, StudyState.PROCESSING}


def settings() -> Settings:
    return current_app.config["COVIDCT"]


def admin_required() -> None:
    if not current_user.is_admin:
        abort(403, "Only administrators may do this.")


@bp.route("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")


@bp.route("/readyz")
def readyz() -> Any:
    """503 with each reason the service cannot take work: database, broker, free disk under
    the listener's floor, no live worker, a listener that does not answer C-ECHO (when
    ``COVIDCT_LISTENER_ADDRESS`` names it; serve sets it for its own listener)."""
    try:
        from worker.app import celery_for

        with celery_for(settings()).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        broker = "ok"
    except Exception as exc:
        broker = f"error: {exc.__class__.__name__}"
    ok, checks = readiness(settings(), broker)
    reasons = [f"{k}: {v}" for k, v in checks.items() if v != "ok"]
    return jsonify(
        status="ok" if ok else "unavailable", reasons=reasons, **checks
    ), 200 if ok else 503


@bp.route("/")
@login_required
def worklist() -> Any:
    f = Filters.from_args(request.args)
    with session_scope(settings().database_url) as s:
        studies, total = list_studies(s, f)
    in_flight = any(st["state"] in IN_FLIGHT for st in studies)
    pages = max(1, (total + 24) // 25)
    return render_template(
        "worklist.html",
        studies=studies,
        total=total,
        f=f,
        pages=pages,
        states=STATES,
        verdicts=VERDICTS,
        sorts=SORTS,
        refresh=in_flight,
    )


@bp.route("/studies/<uid>")
@login_required
def study(uid: str) -> Any:
    with session_scope(settings().database_url) as s:
        detail = study_detail(s, uid)
    if detail is None:
        abort(404, "No such study.")
    return render_template(
        "study.html", st=detail, chart=_chart(detail), refresh=detail["state"] in IN_FLIGHT
    )


def _chart(detail: dict[str, Any]) -> dict[str, Any]:
    """Geometry of the per-slice probability chart, drawn as inline SVG (no script)."""
    pts = [s for s in detail["slices"] if s["probability"] is not None]
    width, height, pad = 640, 180, 24
    if not pts:
        return {"points": "", "width": width, "height": height, "threshold_y": None, "n": 0}
    n = len(pts)
    xs = [pad + (width - 2 * pad) * (i / max(n - 1, 1)) for i in range(n)]
    ys = [height - pad - (height - 2 * pad) * p["probability"] for p in pts]
    t = detail.get("threshold")
    return {
        "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True)),
        "width": width,
        "height": height,
        "pad": pad,
        "n": n,
        "threshold_y": None if t is None else height - pad - (height - 2 * pad) * t,
    }


def _slice_source(prediction_id: int) -> tuple[pydicom.Dataset, int]:
    with session_scope(settings().database_url) as s:
        pred = s.get(Prediction, prediction_id)
        if pred is None or pred.instance_id is None:
            abort(404, "No such slice.")
        inst = s.get(Instance, pred.instance_id)
        if inst is None:
            abort(404, "No such slice.")
        path, frame = Path(inst.spool_path), pred.frame
    try:
        return pydicom.dcmread(path), frame
    except OSError:
        abort(410, "The slice is no longer in the spool.")
    raise AssertionError("unreachable")


OVERLAY_COLOURS = {
    "right": (0, 255, 255),
    "left": (255, 255, 0),
    "ggo": (255, 150, 0),
    "consolidation": (255, 0, 0),
}


def draw_overlay(gray: np.ndarray, code: np.ndarray, size: int = 400) -> np.ndarray:
    """RGB picture: lung contours and the opacity map (``code`` bits from the worker's
    overlay file, on the segmentation grid) over the windowed slice, at most ``size`` wide."""
    img = Image.fromarray(gray).convert("RGB")
    img.thumbnail((size, size))
    rgb = np.asarray(img).copy()
    shape = rgb.shape[:2]
    rows = np.minimum((np.arange(shape[0]) * code.shape[0]) // shape[0], code.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * code.shape[1]) // shape[1], code.shape[1] - 1)
    big = code[np.ix_(rows, cols)]
    for bit, name in ((4, "ggo"), (8, "consolidation")):
        m = (big & bit) > 0
        rgb[m] = (0.5 * rgb[m] + 0.5 * np.array(OVERLAY_COLOURS[name])).astype(np.uint8)
    for side, name in ((1, "right"), (2, "left")):
        lung = (big & 3) == side
        edge = lung & ~ndimage.binary_erosion(lung)
        rgb[edge] = OVERLAY_COLOURS[name]
    return rgb


def _png(arr: np.ndarray) -> Any:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    buf.seek(0)
    response = send_file(buf, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=300"
    return response


@bp.route("/slices/<int:prediction_id>/model.png")
@login_required
def slice_model_png(prediction_id: int) -> Any:
    ds, frame = _slice_source(prediction_id)
    try:
        return _png(to_model_input(ds, frame=frame))
    except UnusableInputError as exc:
        abort(422, str(exc))


@bp.route("/slices/<int:prediction_id>/original.png")
@login_required
def slice_original_png(prediction_id: int) -> Any:
    ds, frame = _slice_source(prediction_id)
    gray = windowed_slice(ds, frame)
    img = Image.fromarray(gray)
    img.thumbnail((400, 400))
    return _png(np.asarray(img))


@bp.route("/slices/<int:prediction_id>/overlay.png")
@login_required
def slice_overlay_png(prediction_id: int) -> Any:
    """The slice in the lung window with the lungs' contour and the opacity map over it."""
    with session_scope(settings().database_url) as s:
        pred = s.get(Prediction, prediction_id)
        study = s.get(Study, pred.study_id) if pred and pred.study_id is not None else None
        q = study.quantification if study is not None else None
        overlay = Path(str(q["overlay"])) if q and q.get("overlay") else None
    if pred is None or q is None or overlay is None or pred.position is None:
        abort(404, "No overlay for this slice.")
    ds, frame = _slice_source(prediction_id)
    if str(ds.get("SeriesInstanceUID", "")) != q.get("series_instance_uid"):
        abort(404, "This slice's series was not segmented.")
    try:
        with np.load(overlay) as saved:
            code, positions = saved["code"], saved["positions"]
    except (OSError, KeyError, ValueError):
        abort(410, "The overlay is no longer in the data directory.")
    z = int(np.argmin(np.abs(positions - pred.position)))
    if abs(float(positions[z]) - pred.position) > 0.01:
        abort(404, "No overlay for this slice.")
    gray = windowed_slice(ds, frame)
    return _png(draw_overlay(gray, code[z]))


@bp.route("/studies/<uid>/reports/<int:report_id>.dcm")
@login_required
def download_report(uid: str, report_id: int) -> Any:
    with session_scope(settings().database_url) as s:
        report = s.get(Report, report_id)
        st = s.get(Study, report.study_id) if report else None
        if report is None or st is None or st.study_instance_uid != uid:
            abort(404, "No such report.")
        path = Path(report.path)
        audit.record(
            s,
            current_user.username,
            "report.download",
            report.sop_instance_uid,
            remote=request.remote_addr or "",
        )
    if not path.is_file():
        abort(410, "The report file is missing.")
    return send_file(
        path,
        mimetype="application/dicom",
        as_attachment=True,
        download_name=f"{report.sop_instance_uid}.dcm",
    )


@bp.route("/studies/<uid>/rerun", methods=["POST"])
@login_required
def rerun(uid: str) -> Any:
    admin_required()
    from worker.app import STUDY_TASK, ring

    with session_scope(settings().database_url) as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        if study_id is None:
            abort(404, "No such study.")
        if not lifecycle.rerun_study(s, study_id, utcnow()):
            flash("The study is still being received, queued or processed: nothing to re-run.")
            return redirect(url_for("views.study", uid=uid))
        audit.record(s, current_user.username, "study.rerun", uid, remote=request.remote_addr or "")
    if ring(settings(), STUDY_TASK, study_id):
        flash("Re-run queued.")
    else:
        flash("Re-run recorded; the broker is unavailable, it will be queued when it is back.")
    return redirect(url_for("views.study", uid=uid))


@bp.route("/deliveries/<int:delivery_id>/resend", methods=["POST"])
@login_required
def resend(delivery_id: int) -> Any:
    admin_required()
    from worker.app import DELIVER_TASK, ring
    from worker.delivery import resend as resend_delivery

    with session_scope(settings().database_url) as s:
        row = s.get(Delivery, delivery_id)
        report = s.get(Report, row.report_id) if row else None
        st = s.get(Study, report.study_id) if report else None
        if st is None:
            abort(404, "No such delivery.")
        uid = st.study_instance_uid
    if not resend_delivery(settings(), delivery_id, current_user.username):
        flash("An attempt to send this report is running now: nothing to re-send.")
    elif ring(settings(), DELIVER_TASK, delivery_id):
        flash("Re-send queued.")
    else:
        flash("Re-send recorded; it will be sent when the broker is back.")
    return redirect(url_for("views.study", uid=uid))


@bp.route("/uploads", methods=["GET", "POST"])
@login_required
def uploads() -> Any:
    if request.method == "POST":
        files = [f for f in request.files.getlist("file") if f and f.filename]
        if not files:
            flash("Choose one or more PNG or JPEG files.")
            return _uploads_page(), 400
        errors = []
        accepted = []
        for f in files:
            try:
                accepted.append(
                    accept_upload(
                        settings(),
                        f.filename or "upload",
                        f.read(settings().max_upload_bytes + 1),
                        current_user.id,
                        current_user.username,
                        request.remote_addr or "",
                    )
                )
            except UploadRejected as exc:
                errors.append(str(exc))
        for a in accepted:
            queue_upload(settings(), a.id)
        for e in errors:
            flash(e)
        if not accepted:
            return _uploads_page(), 400
        flash(f"{len(accepted)} image(s) queued.")
        return redirect(url_for("views.uploads"), code=303)  # a reload must not re-post
    return _uploads_page()


def _uploads_page() -> Any:
    with session_scope(settings().database_url) as s:
        rows = list_uploads(s)
    refresh = any(r["state"] in ("queued", "processing") for r in rows)
    return render_template(
        "uploads.html",
        uploads=rows,
        refresh=refresh,
        max_mb=settings().max_upload_bytes // (1024 * 1024),
    )


@bp.route("/uploads/<int:upload_id>/model.png")
@login_required
def upload_model_png(upload_id: int) -> Any:
    with session_scope(settings().database_url) as s:
        up = s.get(Upload, upload_id)
        if up is None:
            abort(404, "No such upload.")
        path, filename = Path(up.path), up.filename
    try:
        return _png(to_model_input(path, max_pixels=settings().max_upload_pixels))
    except UnusableInputError as exc:
        abort(422, f"{filename}: {exc}")
