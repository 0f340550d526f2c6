"""Webhooks (worker/notify.py): a signed JSON POST per study event to a real HTTP receiver,
through the outbox with its retries."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from classifier.inference import Classifier
from core import lifecycle
from core.db import session_scope, upgrade
from core.models import Delivery, Study, StudyState, utcnow
from core.settings import Settings, SettingsError, load_settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import spool_study
from worker.delivery import deliver
from worker.pipeline import analyse_study

pytestmark = pytest.mark.integration
SECRET = "a shared secret of the hospital"


class Receiver:
    """An HTTP server that keeps each POST and answers the next status of ``answers``
    (then 200)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append((dict(self.headers.items()), body))
                self.send_response(outer.answers.pop(0) if outer.answers else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/covidct"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def make_settings(tmp_path: Path, url: str) -> Settings:
    settings = load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_WEBHOOK_URLS": url,
            "COVIDCT_WEBHOOK_SECRET": SECRET,
            "COVIDCT_PUBLIC_URL": "https://covidct.hospital.example/",
            "COVIDCT_MIN_SERIES_SLICES": "5",
        }
    )
    upgrade(settings.database_url)
    return settings


def notifications(settings: Settings) -> list[Delivery]:
    with session_scope(settings.database_url) as s:
        rows = s.scalars(select(Delivery).where(Delivery.event != "")).all()
        for r in rows:
            s.expunge(r)
        return list(rows)


def verified(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The body, after checking its signature as a receiver would."""
    want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Covidct-Signature"], want)
    return json.loads(body)  # type: ignore[no-any-return]


def test_a_finished_study_is_announced_signed(tmp_path: Path, receiver: Receiver) -> None:
    settings = make_settings(tmp_path, receiver.url)
    study = make_study([SeriesSpec(slices=12)], patient_id="HOOK01")
    study_id = spool_study(settings, study)
    assert analyse_study(settings, study_id, Classifier(settings.model_path)).state == "done"
    (row,) = notifications(settings)
    assert row.event == "done" and row.report_id is not None and row.destination == receiver.url
    assert deliver(settings, row.id) == "delivered"
    (headers, body) = receiver.posts[0]
    payload = verified(headers, body)
    uid = str(study[0].StudyInstanceUID)
    assert headers["X-Covidct-Event"] == "study.done"
    assert headers["X-Covidct-Delivery"] == str(row.id)
    with session_scope(settings.database_url) as s:
        st = s.get(Study, study_id)
        assert st is not None
        assert payload["verdict"] == st.verdict and payload["probability"] == st.probability
    assert payload["study_instance_uid"] == uid and payload["patient_id"] == "HOOK01"
    assert payload["study_url"] == f"https://covidct.hospital.example/studies/{uid}"
    assert "not a diagnosis" in payload["notice"]


def test_not_analysable_and_failed_studies_are_announced(
    tmp_path: Path, receiver: Receiver
) -> None:
    from worker.tasks import _fail_study

    settings = make_settings(tmp_path, receiver.url)
    localizers = spool_study(settings, make_study([SeriesSpec(kind="localizer")]))
    analyse_study(settings, localizers, Classifier(settings.model_path))
    broken = spool_study(settings, make_study([SeriesSpec(slices=6)]))
    with session_scope(settings.database_url) as s:
        assert lifecycle.claim_study(s, broken, utcnow(), utcnow())
    _fail_study(settings, broken, "internal error: the disk went away")
    _fail_study(settings, broken, "a second failure of the same run")  # not a second event
    rows = {r.event: r for r in notifications(settings)}
    assert set(rows) == {"not_analysable", "failed"} and len(notifications(settings)) == 2
    for row in rows.values():
        assert deliver(settings, row.id) == "delivered"
    events = {h["X-Covidct-Event"]: verified(h, b) for h, b in receiver.posts}
    assert "localizer" in events["study.not_analysable"]["reason"]
    assert events["study.failed"]["reason"] == "internal error: the disk went away"
    assert events["study.failed"]["state"] == StudyState.FAILED


def test_a_receiver_that_fails_gets_the_same_bytes_again(tmp_path: Path) -> None:
    receiver = Receiver(answers=[503])
    try:
        settings = make_settings(tmp_path, receiver.url)
        study_id = spool_study(settings, make_study([SeriesSpec(slices=8)]))
        analyse_study(settings, study_id, Classifier(settings.model_path))
        (row,) = notifications(settings)
        assert deliver(settings, row.id) == "pending"
        (row,) = notifications(settings)
        assert "answered HTTP 503" in row.last_error and row.attempts == 1
        assert deliver(settings, row.id) == "delivered"
        (first_headers, first), (second_headers, second) = receiver.posts
        assert first == second
        assert first_headers["X-Covidct-Signature"] == second_headers["X-Covidct-Signature"]
    finally:
        receiver.stop()


def test_webhooks_need_a_secret(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="COVIDCT_WEBHOOK_SECRET"):
        load_settings(
            {
                "COVIDCT_DATA_DIR": str(tmp_path / "var"),
                "COVIDCT_WEBHOOK_URLS": "https://ris.example/hooks",
            }
        )
