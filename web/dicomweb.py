"""DICOMweb on the web port: STOW-RS in (PS3.18 10.5), behind a bearer token only.

``POST /dicom-web/studies`` and ``POST /dicom-web/studies/<StudyInstanceUID>`` take
``multipart/related; type="application/dicom"``; each instance goes through
:mod:`ingest.stow` (the listener's checks, spool and records) and the answer is the DICOM JSON
response with ReferencedSOPSequence and FailedSOPSequence.  A session cookie is not enough: a
page in the user's browser must not be able to post studies.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, json, request
from flask_login import current_user

from core import audit
from core.db import session_scope
from ingest import stow
from ingest.spool import InvalidUIDError, validate_uid
from web.session import settings

bp = Blueprint("dicomweb", __name__)

DICOM_JSON = "application/dicom+json"


def _answer(status: int, body: dict[str, object] | None = None, error: str = "") -> Response:
    if error:
        body = {"00000902": {"vr": "LO", "Value": [error[:64]]}}
    response = Response(json.dumps(body or {}), status=status, mimetype=DICOM_JSON)
    if error:
        response.headers["Warning"] = f'299 covidct "{error}"'
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="covidct"'
    return response


@bp.route("/studies", methods=["POST"])
@bp.route("/studies/<study_uid>", methods=["POST"])
def store(study_uid: str = "") -> Response:
    """STOW-RS: store the instances of the body; see the module docstring."""
    if not current_user.is_authenticated or not g.get("bearer"):
        return _answer(401, error="a bearer token is required (covidct create-token USER)")
    if study_uid:
        try:
            validate_uid(study_uid, "Study Instance UID")
        except InvalidUIDError as exc:
            return _answer(400, error=str(exc))
    try:
        boundary = stow.boundary_of(request.headers.get("Content-Type", ""))
    except stow.BadRequest as exc:
        return _answer(415, error=str(exc))
    s = settings()
    request.max_content_length = s.stow_max_bytes
    sender = f"STOW:{current_user.username}"[:64]
    outcomes: list[stow.Outcome] = []
    try:
        for content_type, data in stow.parts(request.stream, boundary, s.stow_max_bytes):
            outcomes.append(stow.store_part(s, content_type, data, study_uid, sender))
    except stow.BadRequest as exc:
        if not outcomes:
            return _answer(400, error=str(exc))
        outcomes.append(stow.Outcome("", "", stow.CANNOT_UNDERSTAND, str(exc)))
    status, body = stow.response(outcomes)
    stored = sum(o.failure is None for o in outcomes)
    with session_scope(s.database_url) as db:
        audit.record(
            db,
            current_user.username,
            "stow.store",
            study_uid,
            outcome="ok" if status == 200 else "partial" if status == 202 else "refused",
            remote=request.remote_addr or "",
            stored=stored,
            failed=len(outcomes) - stored,
        )
    return _answer(status, body)


def register(app: Any) -> None:
    app.register_blueprint(bp, url_prefix="/dicom-web")
