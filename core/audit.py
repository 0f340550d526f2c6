"""The audit log: who did what, when, from where.  Never patient names, only UIDs and ids."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from core.models import AuditEvent

logger = logging.getLogger(__name__)


def record(
    session: Session,
    actor: str,
    action: str,
    obj: str = "",
    *,
    outcome: str = "ok",
    remote: str = "",
    **detail: Any,
) -> AuditEvent:
    """Add an audit event to ``session`` (committed with the caller's transaction)."""
    event = AuditEvent(
        actor=actor[:128],
        action=action[:64],
        object=obj[:128],
        outcome=outcome[:16],
        remote=remote[:64],
        detail={k: v for k, v in detail.items() if v is not None},
    )
    session.add(event)
    logger.info("audit %s %s %s %s %s", actor, action, obj, outcome, remote)
    return event
