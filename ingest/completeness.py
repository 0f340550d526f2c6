"""Whether a study may lack instances its sender meant to send, told per association.

Each association tallies, per study, what it stored and what it refused.  While it is open the
study's ``open_associations`` count keeps the sweeper from queueing it.  When the connection
closes:

- ended without A-RELEASE (an abort, a sender or network that died), or an instance refused
  because it could not be written (disk floor, write error): the study is marked incomplete
  with the reason; the sweeper then waits ``incomplete_grace_seconds`` for the sender's retry;
- released, nothing refused, and it began after the study was marked: the sender's retry
  completed the study; the mark is cleared, and a study already analysed is opened again so
  that a complete analysis supersedes the partial one;
- released, nothing refused, and no other association open for the study: ``released_at``
  is stamped, and the sweeper may queue the study ``released_stable_seconds`` after it instead
  of waiting the whole quiet time (an instance after the release cancels that).

An instance written but not recorded (the store was down) is answered with a failure and noted
in ``pending/``, as is a close the store could not take; the sweeper applies the notes, so
nothing waits for a restart.  At start-up the listener marks studies whose associations were
open when it stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from core import lifecycle
from core.db import session_scope
from core.models import Study, utcnow
from core.settings import Settings
from ingest.records import UnreadableDatasetError, read_header, record_instance
from ingest.spool import InvalidUIDError, write_durable

logger = logging.getLogger(__name__)


@dataclass
class Tally:
    started: datetime
    opened: bool = False  # open_associations was counted up for this association
    stored: int = 0
    refused: int = 0
    refused_reason: str = ""


def tallies(assoc: Any) -> dict[str, Tally]:
    """The per-study tallies kept on a pynetdicom Association."""
    found: dict[str, Tally] | None = getattr(assoc, "covidct_tallies", None)
    if found is None:
        found = {}
        assoc.covidct_tallies = found
    return found


def stored(settings: Settings, assoc: Any, study_uid: str) -> None:
    tally = tallies(assoc).setdefault(study_uid, Tally(started=utcnow()))
    tally.stored += 1
    if not tally.opened:
        with session_scope(settings.database_url) as s:
            s.execute(
                update(Study)
                .where(Study.study_instance_uid == study_uid)
                .values(open_associations=Study.open_associations + 1)
            )
        tally.opened = True


def refused(assoc: Any, study_uid: str, reason: str) -> None:
    tally = tallies(assoc).setdefault(study_uid, Tally(started=utcnow()))
    tally.refused += 1
    tally.refused_reason = reason


_SETTLING = threading.Lock()


def closed(settings: Settings, assoc: Any, released: bool, calling_ae: str) -> None:
    """The association ended: settle each study it touched, once (the first caller wins)."""
    with _SETTLING:
        touched = dict(tallies(assoc))
        tallies(assoc).clear()
    for study_uid, tally in touched.items():
        note = {
            "kind": "close",
            "study_uid": study_uid,
            "released": released,
            "calling_ae": calling_ae,
            "started": tally.started.isoformat(),
            "opened": tally.opened,
            "stored": tally.stored,
            "refused": tally.refused,
            "refused_reason": tally.refused_reason,
        }
        try:
            settle(settings, note)
        except Exception as exc:  # the store is down: the sweeper applies the note later
            logger.warning("study %s: close noted for later (%s)", study_uid, exc)
            write_note(settings, note)


def settle(settings: Settings, note: dict[str, Any]) -> None:
    """Apply one association's outcome to its study (see the module docstring)."""
    now = utcnow()
    problems = []
    if not note["released"]:
        problems.append(
            f"the association from {note['calling_ae'] or '?'} ended without release "
            f"after {note['stored']} instance(s)"
        )
    if note["refused"]:
        problems.append(f"{note['refused']} instance(s) refused: {note['refused_reason']}")
    with session_scope(settings.database_url) as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == note["study_uid"]))
        if study is None:  # every instance was refused: nothing to analyse
            return
        if note["opened"]:
            study.open_associations = max(0, study.open_associations - 1)
        if not problems and study.open_associations == 0 and note["opened"]:
            study.released_at = now  # the sender said it is done: a shorter quiet time
        if problems:
            if not study.incomplete_reason:
                study.incomplete_at = now
            study.incomplete_reason = "; ".join(problems)[:1000]
            logger.warning("study %s may be incomplete: %s", study.study_instance_uid, problems)
        elif (
            study.incomplete_reason
            and study.incomplete_at is not None
            and datetime.fromisoformat(note["started"]) > study.incomplete_at
        ):
            logger.info("study %s completed by its sender", study.study_instance_uid)
            study.incomplete_reason, study.incomplete_at = "", None
            lifecycle.reopen_study(
                s, study.id, now, "the sender completed the study; will be analysed again"
            )


def listener_restarted(settings: Settings) -> int:
    """Mark studies whose associations were open when the listener stopped."""
    with session_scope(settings.database_url) as s:
        n = s.execute(
            update(Study)
            .where(Study.open_associations > 0)
            .values(
                open_associations=0,
                incomplete_reason="the listener stopped while receiving this study",
                incomplete_at=utcnow(),
            )
        ).rowcount
    if n:
        logger.warning("%d studies were being received when the listener stopped", n)
    return n


def write_note(settings: Settings, note: dict[str, Any]) -> Path:
    path = settings.pending_dir / f"{uuid.uuid4().hex}.json"
    write_durable(path, json.dumps(note).encode(), direct=False)
    return path


def apply_notes(settings: Settings) -> int:
    """Record noted instances and settle noted closes, oldest first; return how many."""
    if not settings.pending_dir.is_dir():
        return 0
    done = 0
    notes = sorted(settings.pending_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for path in notes:
        try:
            note = json.loads(path.read_text())
            if note["kind"] == "instance":
                _record_noted(settings, note)
            else:
                settle(settings, note)
        except (OSError, ValueError, KeyError) as exc:
            logger.error("unusable note %s: %s", path.name, exc)
        path.unlink(missing_ok=True)
        done += 1
    return done


def _record_noted(settings: Settings, note: dict[str, Any]) -> None:
    spooled = Path(note["path"])
    try:
        data = spooled.read_bytes()
        header = read_header(data)
    except (OSError, UnreadableDatasetError, InvalidUIDError) as exc:
        logger.error("noted instance %s unreadable: %s", spooled, exc)
        return
    if record_instance(settings.database_url, header, spooled, len(data), note["calling_ae"]):
        logger.warning("recorded instance %s of study %s late", header.sop_uid, header.study_uid)
