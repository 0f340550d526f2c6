"""Keeping one received instance, whichever port it came by (C-STORE in ingest/handlers.py,
STOW-RS in ingest/stow.py): the disk floor, the durable write, the record, and a note for the
sweeper when the results store cannot take the record.  Each port turns the outcome into its
own answer."""

from __future__ import annotations

import logging

from core.health import free_disk_mb
from core.settings import Settings
from ingest import completeness
from ingest.records import InstanceHeader, record_instance
from ingest.spool import instance_path, write_durable

logger = logging.getLogger(__name__)


class NotKept(Exception):
    """Why an instance was not kept.  ``written``: its file is on disk and only the record
    failed; ``noted``: the sweeper records it from a note (else the next start-up does)."""

    def __init__(self, reason: str, written: bool = False, noted: bool = False) -> None:
        super().__init__(reason)
        self.written, self.noted = written, noted


def keep(settings: Settings, header: InstanceHeader, data: bytes, sender: str) -> bool:
    """Write ``data`` durably and record it; True when new, False for a duplicate.  Raises
    :class:`NotKept` with the reason (logged here)."""
    uid = header.sop_uid
    floor = settings.min_free_disk_mb / 2
    try:
        if floor and free_disk_mb(settings.spool_dir) < floor:
            logger.error("free disk below %.0f MB: refusing %s", floor, uid)
            raise NotKept("free disk below the floor")
        path = instance_path(settings.spool_dir, header.study_uid, header.series_uid, uid)
        write_durable(path, data, direct=settings.spool_direct_io)
    except OSError as exc:
        logger.exception("cannot write instance %s", uid)
        raise NotKept(f"write failed ({exc.strerror})") from None
    try:
        return record_instance(settings.database_url, header, path, len(data), sender)
    except Exception:
        logger.exception("cannot record instance %s", uid)
        try:  # the file stays; the sweeper records it from the note
            completeness.write_note(
                settings, {"kind": "instance", "path": str(path), "calling_ae": sender}
            )
        except OSError:
            logger.exception("cannot note instance %s; the next start-up records it", path)
            raise NotKept("the results store is down", written=True) from None
        raise NotKept("the results store is down", written=True, noted=True) from None
