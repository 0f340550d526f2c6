"""Backfill from the PACS: studies from before the service was installed, analysed as if they
had been sent.

C-FIND (Study Root, STUDY level) on the source for a date range and a modality, then C-MOVE of
each study not known here yet to the service's own AE title: the source C-STOREs it to the
listener, which assembles and queues it like any other (the source must know the service as a
move destination: docs/operations.md says how for Orthanc and dcm4chee).  A study already here
(received, analysed or in progress) is skipped, so an interrupted backfill is run again as it
was; instances moved twice are recorded once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from core.db import session_scope
from core.models import Study
from core.settings import Settings
from core.values import Destination
from worker.delivery import requester

logger = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


class BackfillError(RuntimeError):
    """The source could not be asked (association refused, C-FIND failed); says why."""


@dataclass
class Found:
    study_uid: str
    study_date: str
    modalities: str
    instances: int | None


@dataclass
class Summary:
    found: int = 0
    known: int = 0  # already here: skipped
    moved: int = 0
    instances: int = 0
    failed: list[str] = field(default_factory=list)  # "uid: reason"

    def line(self) -> str:
        return (
            f"{self.found} studies found, {self.known} already here, {self.moved} moved"
            f" ({self.instances} instances), {len(self.failed)} failed"
        )


def find(
    settings: Settings, source: Destination, since: date, until: date | None, modality: str
) -> list[Found]:
    """The source's studies in the date range holding ``modality``."""
    ae = requester(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = f"{since:%Y%m%d}-{until:%Y%m%d}" if until else f"{since:%Y%m%d}-"
    query.ModalitiesInStudy = modality
    query.NumberOfStudyRelatedInstances = ""
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise BackfillError(f"{source} refused the association (C-FIND)")
    out: list[Found] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise BackfillError(f"{source} stopped answering the C-FIND")
            if code in PENDING and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid:
                    n = identifier.get("NumberOfStudyRelatedInstances")
                    out.append(
                        Found(
                            uid,
                            str(identifier.get("StudyDate", "") or ""),
                            str(identifier.get("ModalitiesInStudy", "") or ""),
                            int(n) if n not in (None, "") else None,
                        )
                    )
            elif code != 0x0000:
                raise BackfillError(f"{source} answered the C-FIND with 0x{code:04X}")
    finally:
        assoc.release()
    return out


def move(settings: Settings, source: Destination, study_uid: str) -> int:
    """C-MOVE one study to this service's AE title; the instances the source says it sent.
    Raises :class:`BackfillError` with the reason when it did not."""
    ae = requester(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise BackfillError(f"{source} refused the association (C-MOVE)")
    completed, failed, code = 0, 0, None
    try:
        for status, _ in assoc.send_c_move(
            query, settings.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise BackfillError("the source stopped answering the C-MOVE")
            completed = int(getattr(status, "NumberOfCompletedSuboperations", completed) or 0)
            failed = int(getattr(status, "NumberOfFailedSuboperations", failed) or 0)
    finally:
        assoc.release()
    if code == 0xA801:
        raise BackfillError(
            f"{source} does not know {settings.ae_title} as a move destination (0xA801)"
        )
    if code not in (0x0000, 0xB000) or failed:
        raise BackfillError(
            f"C-MOVE ended with 0x{(code or 0):04X}, {failed} instance(s) failed, {completed} sent"
        )
    return completed


def known(settings: Settings, uids: list[str]) -> set[str]:
    """The studies among ``uids`` that are here already (any state)."""
    with session_scope(settings.database_url) as s:
        return set(
            s.scalars(select(Study.study_instance_uid).where(Study.study_instance_uid.in_(uids)))
        )


def backfill(
    settings: Settings,
    source: Destination,
    since: date,
    until: date | None = None,
    modality: str = "CT",
    progress: Callable[[int, int, str], None] = lambda i, n, text: None,
) -> Summary:
    """Find, skip what is here, move the rest; ``progress(done, total, line)`` after each."""
    found = find(settings, source, since, until, modality)
    summary = Summary(found=len(found))
    here = set()
    for chunk in _chunks([f.study_uid for f in found], 500):
        here |= known(settings, chunk)
    summary.known = len(here)
    todo = [f for f in found if f.study_uid not in here]
    for i, f in enumerate(todo, start=1):
        try:
            n = move(settings, source, f.study_uid)
            summary.moved += 1
            summary.instances += n
            line = f"{f.study_uid} ({f.study_date}): {n} instances"
        except BackfillError as exc:
            summary.failed.append(f"{f.study_uid}: {exc}")
            line = f"{f.study_uid}: {exc}"
            logger.warning("backfill of study %s failed: %s", f.study_uid, exc)
        progress(i, len(todo), line)
    return summary


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
