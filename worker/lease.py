"""A claimed study's lease: renewed by a thread every ``heartbeat_seconds`` while the task runs.

A thread, not the model's batch loop, renews it: a worker killed with -9 stops renewing at once,
so another worker takes the study over ``task_stale_seconds`` later (10 s by default), while a
long batch, a slow read or the lungs' segmentation never makes a live worker look dead.  The
lease is the claim's attempt number: a worker whose study was taken over finds out at its next
renewal (``lost``) and stores nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import update

from core.db import session_scope
from core.models import Study, utcnow
from core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    study_id: int
    generation: int
    attempt: int  # Study.attempts after the claim: whose lease it is


def renew(settings: Settings, claim: Claim) -> bool:
    """Stamp the heartbeat; False when the study is no longer ours (taken over)."""
    with session_scope(settings.database_url) as s:
        return (
            s.execute(
                update(Study)
                .where(Study.id == claim.study_id, Study.attempts == claim.attempt)
                .values(heartbeat_at=utcnow())
            ).rowcount
            == 1
        )


class Lease:
    """``with Lease(settings, claim) as lease:`` renews until the block ends."""

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.settings, self.claim = settings, claim
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{claim.study_id}", daemon=True
        )

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.heartbeat_seconds + 30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if not renew(self.settings, self.claim):
                    self.lost.set()
                    return
            except Exception as exc:  # the store is down: keep trying, the task decides
                logger.warning("study id %d: lease not renewed: %s", self.claim.study_id, exc)
