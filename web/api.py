"""The JSON API (docs/api.md): the dashboard's data, behind the same login or a bearer token."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, jsonify, request
from flask_login import current_user, login_required
from sqlalchemy import select

from core.db import session_scope
from core.models import Study, Upload
from web.queries import (
    Filters,
    list_studies,
    list_uploads,
    study_detail,
    upload_dict,
    uploads_with_thresholds,
    visible_uploads,
)
from web.reviews import (
    ReviewInput,
    ReviewRejected,
    performance,
    review_dict,
    reviews_csv,
    save_review,
)
from web.session import NOTICE, settings
from web.uploads import UploadRejected, accept_upload, queue_upload

bp = Blueprint("api", __name__)


@bp.route("/studies")
@login_required
def studies() -> Any:
    f = Filters.from_args(request.args)
    try:
        page_size = min(200, max(1, int(request.args.get("per_page", 50))))
    except ValueError:
        abort(400, "per_page must be a number")
    with session_scope(settings().database_url) as s:
        items, total = list_studies(s, f, page_size=page_size)
    return jsonify(notice=NOTICE, total=total, page=f.page, per_page=page_size, items=items)


@bp.route("/studies/<uid>")
@login_required
def study(uid: str) -> Any:
    with session_scope(settings().database_url) as s:
        detail = study_detail(s, uid)
    if detail is None:
        abort(404, "no such study")
    return jsonify(notice=NOTICE, **detail)


@bp.route("/studies/<uid>/reviews", methods=["POST"])
@login_required
def create_review(uid: str) -> Any:
    """This user's read of the study: 201 when new, 200 when it replaces theirs."""
    try:
        given = ReviewInput.parse(request.get_json(silent=True))
    except ReviewRejected as exc:
        abort(400, str(exc))
    with session_scope(settings().database_url) as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        if st is None:
            abort(404, "no such study")
        review, created = save_review(
            s, st, current_user.id, current_user.username, given, request.remote_addr or ""
        )
        body = review_dict(review, current_user.username)
    return jsonify(notice=NOTICE, **body), 201 if created else 200


@bp.route("/performance")
@login_required
def performance_figures() -> Any:
    with session_scope(settings().database_url) as s:
        return jsonify(notice=NOTICE, **performance(s))


@bp.route("/reviews.csv")
@login_required
def reviews_export() -> Any:
    with session_scope(settings().database_url) as s:
        text = reviews_csv(s)
    response = Response(text, mimetype="text/csv")
    response.headers["Content-Disposition"] = "attachment; filename=covidct-reviews.csv"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/uploads", methods=["GET"])
@login_required
def uploads() -> Any:
    with session_scope(settings().database_url) as s:
        owner = current_user.upload_owner(settings().shared_uploads)
        return jsonify(notice=NOTICE, items=list_uploads(s, owner))


@bp.route("/uploads", methods=["POST"])
@login_required
def create_upload() -> Any:
    f = request.files.get("file")
    if f is None or not f.filename:
        abort(400, "send one image as multipart field 'file'")
    try:
        accepted = accept_upload(
            settings(),
            f.filename,
            f.read(settings().max_upload_bytes + 1),
            current_user.id,
            current_user.username,
            request.remote_addr or "",
        )
    except UploadRejected as exc:
        abort(400, str(exc))
    queued = queue_upload(settings(), accepted.id)
    with session_scope(settings().database_url) as s:
        up = s.get(Upload, accepted.id)
        assert up is not None
        body = upload_dict(up)
    return jsonify(notice=NOTICE, queued=queued, **body), 202


@bp.route("/uploads/<int(max=2147483647):upload_id>")
@login_required
def upload(upload_id: int) -> Any:
    with session_scope(settings().database_url) as s:
        owner = current_user.upload_owner(settings().shared_uploads)
        up = s.scalar(visible_uploads(owner).where(Upload.id == upload_id))
        if up is None:  # another user's upload is not there for this one
            abort(404, "no such upload")
        (item,) = uploads_with_thresholds(s, [up])
        return jsonify(notice=NOTICE, **item)
