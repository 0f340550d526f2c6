"""The durable spool: where received instances live, exactly as their bytes arrived.

A path is built only from UIDs that passed :func:`validate_uid`, so a hostile UID (``../``,
an overlong string, an empty one) never reaches the file system.  Writes go to a temporary
file in the same directory (with O_DIRECT, past the page cache), are fsynced, renamed into
place, and the directory is fsynced, so an instance acknowledged with 0x0000 survives a crash
or power loss.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from ingest.direct_write import open_new, write_parts

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SUFFIX = ".dcm"


class InvalidUIDError(ValueError):
    """A UID that is not a DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters."""


def validate_uid(value: object, what: str) -> str:
    uid = str(value or "").strip().rstrip("\x00").strip()
    if not uid:
        raise InvalidUIDError(f"{what} is empty")
    if len(uid) > 64:
        raise InvalidUIDError(f"{what} is longer than 64 characters")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(f"{what} is not a valid UID")
    return uid


def instance_path(spool: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """spool/<study>/<series>/<sop>.dcm; every part must be a validated UID."""
    for uid, what in (
        (study_uid, "StudyInstanceUID"),
        (series_uid, "SeriesInstanceUID"),
        (sop_uid, "SOPInstanceUID"),
    ):
        validate_uid(uid, what)
    return spool / study_uid / series_uid / (sop_uid + SUFFIX)


def write_durable(path: Path, *parts: bytes | memoryview, direct: bool = True) -> None:
    """Write ``parts`` (one after another) to ``path`` atomically and durably: a temporary
    file in the same directory, fsync, rename, fsync of the directory.

    ``direct``: write with O_DIRECT (:mod:`ingest.direct_write`, which has the figures).
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd, is_direct = open_new(tmp, direct)
    except FileNotFoundError:  # first instance of its series (or its study)
        created = _make_dirs(directory)
        fd, is_direct = open_new(tmp, direct)
    else:
        created = []
    try:
        fd = write_parts(fd, tmp, parts, is_direct)  # closes it itself if it fails
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(directory)
    for parent in created:  # each new directory's own entry must be durable too
        _fsync_dir(parent)


def _make_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return the parents whose entries
    changed (the ones to fsync), nearest first."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    return [m.parent for m in missing]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_spool(spool: Path) -> Iterator[Path]:
    """Every stored instance (temporary files of interrupted writes are skipped)."""
    if not spool.is_dir():
        return
    for study in spool.iterdir():
        if not study.is_dir():
            continue
        for series in study.iterdir():
            if series.is_dir():
                yield from (p for p in series.iterdir() if p.suffix == SUFFIX)


def remove_stale_temporaries(spool: Path) -> int:
    """Delete leftovers of writes interrupted by a crash (never acknowledged)."""
    count = 0
    if spool.is_dir():
        for tmp in spool.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            count += 1
    return count
