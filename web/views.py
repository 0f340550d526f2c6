"""Dashboard pages: worklist, study detail, images, SR download, uploads, admin actions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from core import audit, lifecycle
from core.db import session_scope
from core.health import readiness
from core.models import Delivery, Report, Study, StudyState, utcnow
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
from web.reviews import CALLS, ReviewInput, ReviewRejected, performance, save_review
from web.session import admin_required, settings
from web.uploads import UploadRejected, accept_upload, queue_upload

bp = Blueprint("views", __name__)
IN_FLIGHT = {StudyState.RECEIVING, StudyState.QUEUED, StudyState.PROCESSING}


@bp.route("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")


def broker_check(s: Settings) -> str:
    """``ok``, or why the broker cannot be reached (within 2 s)."""
    try:
        from worker.app import celery_for

        with celery_for(s).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"


@bp.route("/readyz")
def readyz() -> Any:
    """503 with each reason the service cannot take work: database, broker, free disk under
    the listener's floor, no live worker, a listener that does not answer C-ECHO (when
    ``COVIDCT_LISTENER_ADDRESS`` names it; serve sets it for its own listener)."""
    ok, checks = readiness(settings(), broker_check(settings()))
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
    mine = next((r for r in detail["reviews"] if r["user"] == current_user.username), None)
    return render_template(
        "study.html",
        st=detail,
        chart=_chart(detail),
        refresh=detail["state"] in IN_FLIGHT,
        calls=CALLS,
        mine=mine,
    )


def _chart(detail: dict[str, Any]) -> dict[str, Any]:
    """Geometry of the per-slice probability chart, drawn as inline SVG: probability against
    slice position (the viewer's script moves a cursor along it)."""
    pts = [s for s in detail["slices"] if s["probability"] is not None]
    width, height, pad, bottom_pad = 640, 200, 24, 34
    top, bottom = pad, height - bottom_pad
    positions = [s["position"] for s in pts if s["position"] is not None]
    p0, p1 = (min(positions), max(positions)) if positions else (0.0, 0.0)
    x0, x1 = pad + 10, width - pad
    out = {"width": width, "height": height, "top": top, "bottom": bottom, "x0": x0, "x1": x1}
    out |= {"p0": p0, "p1": p1, "points": "", "threshold_y": None, "n": len(pts)}
    if not pts:
        return out

    def x(i: int, position: float | None) -> float:
        if position is None or p1 == p0:
            return x0 + (x1 - x0) * (i / max(len(pts) - 1, 1))
        return x0 + (x1 - x0) * (position - p0) / (p1 - p0)

    def y(p: float) -> float:
        return bottom - (bottom - top) * p

    t = detail.get("threshold")
    out["points"] = " ".join(
        f"{x(i, s['position']):.1f},{y(s['probability']):.1f}" for i, s in enumerate(pts)
    )
    out["threshold_y"] = None if t is None else y(t)
    return out


@bp.route("/studies/<uid>/reports/<int(max=2147483647):report_id>.dcm")
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
            flash(
                "The study is still being received, queued or processed: nothing to re-run.",
                "error",
            )
            return redirect(url_for("views.study", uid=uid))
        audit.record(s, current_user.username, "study.rerun", uid, remote=request.remote_addr or "")
    if ring(settings(), STUDY_TASK, study_id):
        flash("Re-run queued.")
    else:
        flash(
            "Re-run recorded; the broker is unavailable, it will be queued when it is back.",
            "error",
        )
    return redirect(url_for("views.study", uid=uid))


@bp.route("/studies/<uid>/review", methods=["POST"])
@login_required
def review(uid: str) -> Any:
    """The study page's form: this user's read (one per user, edited in place)."""
    try:
        given = ReviewInput.parse(request.form)
    except ReviewRejected as exc:
        flash(f"Review not saved: {exc}.", "error")
        return redirect(url_for("views.study", uid=uid))
    with session_scope(settings().database_url) as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        if st is None:
            abort(404, "No such study.")
        _, created = save_review(
            s, st, current_user.id, current_user.username, given, request.remote_addr or ""
        )
    flash("Review saved." if created else "Review updated.")
    return redirect(url_for("views.study", uid=uid) + "#reviews")


@bp.route("/performance")
@login_required
def performance_page() -> Any:
    with session_scope(settings().database_url) as s:
        figures = performance(s)
    return render_template("performance.html", p=figures)


@bp.route("/deliveries/<int(max=2147483647):delivery_id>/resend", methods=["POST"])
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
        flash("An attempt to send this report is running now: nothing to re-send.", "error")
    elif ring(settings(), DELIVER_TASK, delivery_id):
        flash("Re-send queued.")
    else:
        flash("Re-send recorded; it will be sent when the broker is back.", "error")
    if request.form.get("back") == "operations":
        return redirect(url_for("operations.page"))
    return redirect(url_for("views.study", uid=uid))


@bp.route("/uploads", methods=["GET", "POST"])
@login_required
def uploads() -> Any:
    if request.method == "POST":
        files = [f for f in request.files.getlist("file") if f and f.filename]
        if not files:
            flash("Choose one or more PNG or JPEG files.", "error")
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
            flash(e, "error")
        if not accepted:
            return _uploads_page(), 400
        flash(f"{len(accepted)} image(s) queued.")
        return redirect(url_for("views.uploads"), code=303)  # a reload must not re-post
    return _uploads_page()


def _uploads_page() -> Any:
    with session_scope(settings().database_url) as s:
        rows = list_uploads(s, current_user.upload_owner(settings().shared_uploads))
    refresh = any(r["state"] in ("queued", "processing") for r in rows)
    return render_template(
        "uploads.html",
        uploads=rows,
        refresh=refresh,
        max_mb=settings().max_upload_bytes // (1024 * 1024),
    )
