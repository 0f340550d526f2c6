"""The Flask application factory and ``covidct web``.

``create_app(settings)`` registers the blueprints, login, CSRF protection and security
headers.  Errors leave as an HTTP status with a short page (or JSON under /api), never a
stack trace.  Every page carries the notice that results are not a diagnosis.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify, render_template, request
from flask_login import LoginManager
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from core.db import session_scope, upgrade
from core.models import User
from core.settings import Settings
from web.queries import dicom_date, state_words, utc_text
from web.server import request_body_limit
from web.session import NOTICE, SessionUser

logger = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

csrf = CSRFProtect()
login_manager = LoginManager()


def create_app(settings: Settings, test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.web_secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SECURE=settings.web_secure_cookies,
        PERMANENT_SESSION_LIFETIME=8 * 3600,
        MAX_CONTENT_LENGTH=request_body_limit(settings),
        WTF_CSRF_CHECK_DEFAULT=False,  # checked in _csrf below, except for bearer tokens
        WTF_CSRF_TIME_LIMIT=8 * 3600,
        COVIDCT=settings,
    )
    if test_config:
        app.config.update(test_config)
    upgrade(settings.database_url)
    csrf.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in."

    from web.admin import bp as admin_bp
    from web.api import bp as api_bp
    from web.auth import bp as auth_bp
    from web.auth import user_from_bearer
    from web.dicomweb import register as register_dicomweb
    from web.images import bp as images_bp
    from web.operations import bp as operations_bp
    from web.views import bp as views_bp

    app.register_blueprint(auth_bp)
    app.register_blueprint(views_bp)
    app.register_blueprint(images_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(operations_bp)
    app.register_blueprint(api_bp, url_prefix="/api")
    register_dicomweb(app)

    @login_manager.user_loader
    def load_user(session_id: str) -> SessionUser | None:
        user_id, _, version = session_id.partition(":")
        if not (user_id.isdigit() and version.isdigit()) or len(user_id) > 9:
            return None  # a cookie from before session versions, or not ours: log in again
        with session_scope(settings.database_url) as s:
            user = s.get(User, int(user_id))
            if user is None or not user.active or user.session_version != int(version):
                return None
            return SessionUser(user)

    @login_manager.request_loader
    def load_from_header(req: Any) -> SessionUser | None:
        # the CSRF check below may have looked the token up already in this request
        user = g.pop("bearer_user", None) or user_from_bearer(
            settings, req.headers.get("Authorization", "")
        )
        if user is not None:
            g.bearer = True
        return user

    @login_manager.unauthorized_handler
    def unauthorized() -> Any:
        if request.path.startswith("/api/"):
            return jsonify(error="authentication required"), 401
        from flask import redirect, url_for

        return redirect(url_for("auth.login", next=request.path))

    @app.before_request
    def _csrf() -> None:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        g.bearer_user = user_from_bearer(settings, request.headers.get("Authorization", ""))
        if g.bearer_user is not None:
            return  # a valid token, not a cookie: nothing a foreign page could forge
        if request.path.startswith("/dicom-web/"):
            return  # takes a bearer token only, never a cookie: web/dicomweb.py answers 401
        csrf.protect()  # any other header ("Bearer junk" beside a cookie) gets no exemption

    @app.after_request
    def _headers(response: Any) -> Any:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.path.startswith("/static/"):  # patient data is never kept by a cache
            response.headers["Cache-Control"] = "no-store"
        if settings.web_secure_cookies:  # served over HTTPS: browsers keep to it for a year
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    app.jinja_env.filters.update(dicom_date=dicom_date, utc_text=utc_text, state_words=state_words)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"notice": NOTICE}

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> Any:
        return _error(400, "The form expired or was not sent by this site; reload and retry.")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        logger.exception("unhandled error on %s", request.path)
        return _error(500, "Internal error; it has been logged.")

    return app


def _error(code: int, message: str) -> Any:
    if request.path.startswith("/api/"):
        return jsonify(error=message), code
    return render_template("error.html", code=code, message=message), code


def run_web(settings: Settings) -> int:
    """``covidct web``: the dashboard on waitress, each part of a request bounded
    (web/server.py)."""
    from web.server import serve

    app = create_app(settings)
    print(f"covidct dashboard: http://{settings.web_host}:{settings.web_port}/", flush=True)
    return serve(app, settings)
