"""Leases: a claimed study or delivery is renewed by a thread every ``heartbeat_seconds``.

A thread, not the model's batch loop, renews it: a worker killed with -9 stops renewing at once,
so another worker takes the work over ``task_stale_seconds`` later (10 s by default), while a
long batch, a slow read, a slow PACS or the lungs' segmentation never makes a live worker look
dead.  A study's lease is its claim's attempt number: a worker whose study was taken over finds
out at its next renewal (``lost``) and stores nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

from sqlalchemy import update

from core.db import session_scope
from core.models import Delivery, DeliveryState, Study, utcnow
from core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    study_id: int
    generation: int
    attempt: int  # Study.attempts after the claim: whose lease it is


def renew_study(settings: Settings, claim: Claim) -> bool:
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


def renew_delivery(settings: Settings, delivery_id: int) -> bool:
    """Push the running attempt's claim ``task_stale_seconds`` ahead."""
    with session_scope(settings.database_url) as s:
        return (
            s.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.claimed_until.is_not(None),
                )
                .values(claimed_until=utcnow() + timedelta(seconds=settings.task_stale_seconds))
            ).rowcount
            == 1
        )


class Lease:
    """``with Lease(settings, name, renew) as lease:`` calls ``renew`` until the block ends."""

    def __init__(self, settings: Settings, name: str, renew: Callable[[], bool]) -> None:
        self.settings, self.name, self.renew = settings, name, renew
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {name}", daemon=True)

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
                if not self.renew():
                    self.lost.set()
                    return
            except Exception as exc:  # the store is down: keep trying, the task decides
                logger.warning("%s: lease not renewed: %s", self.name, exc)
